"""The training progress bar: the heads' mean loss and the best held-out accuracy so far,
without Lightning's logger version (``v_num``), which says nothing about the run."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProbeProgressBar(RichProgressBar):
    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
