"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol)."""

from mim_agg.knn.neighbours import NearestNeighbours
from mim_agg.knn.vote import weighted_vote

__all__ = ["NearestNeighbours", "weighted_vote"]
