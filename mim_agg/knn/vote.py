"""DINO's weighted vote: neighbour ``i`` adds ``exp(sim_i / T)`` to its label's score."""

from __future__ import annotations

import torch


def weighted_vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Class scores ``[Q, C]`` from each query's ``k`` nearest neighbours (sorted, descending).

    Each query's scores are divided by ``exp(max sim / T)``, that is its largest similarity is
    subtracted before exponentiating: the ranking of classes is unchanged, and ``exp`` never
    overflows, which plain ``exp(sim / T)`` does in float32 for T below about 0.011 (every
    neighbour then weighs ``inf`` and the vote is a tie).
    """
    sims = sims[:, :k]
    weights = ((sims - sims.amax(dim=1, keepdim=True)) / temperature).exp()
    scores = torch.zeros(len(sims), num_classes, device=sims.device)
    return scores.scatter_add_(1, labels[:, :k], weights)


def accuracy(scores: torch.Tensor, targets: torch.Tensor, top: int = 1) -> float:
    top = min(top, scores.shape[1])
    hits = (scores.topk(top, dim=1).indices == targets.to(scores.device)[:, None]).any(dim=1)
    return hits.float().mean().item()
