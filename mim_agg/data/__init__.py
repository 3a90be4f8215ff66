"""Labeled image sources, the paper's transforms and the train / held-out / test splits."""

from mim_agg.data.datamodule import ProbeDataModule
from mim_agg.data.sources import SOURCES, build_source
from mim_agg.data.transfer import TRANSFER

__all__ = ["SOURCES", "TRANSFER", "ProbeDataModule", "build_source"]
