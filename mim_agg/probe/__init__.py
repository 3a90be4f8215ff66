"""Probe heads, their optimizer and schedule, and the multi-head LightningModule."""

from mim_agg.probe.head import ProbeHead
from mim_agg.probe.lars import LARS
from mim_agg.probe.module import LinearProbe
from mim_agg.probe.schedule import warmup_cosine

__all__ = ["LARS", "LinearProbe", "ProbeHead", "warmup_cosine"]
