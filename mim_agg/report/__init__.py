"""Sweep reports: read run folders (``runs``), tabulate (``table``), plot (``figure``)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ReportWhenSweepEnds(Callback):
    """A Hydra callback: ``task=report`` on the sweep folder once every job has ended
    (``hydra.callbacks.report._target_=mim_agg.report.ReportWhenSweepEnds``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from mim_agg.tasks.report import report

        sweep_dir = Path(config.hydra.sweep.dir)
        report([sweep_dir], sweep_dir)
