"""Sweep reports: read run folders (``runs``), tabulate (``table``), plot (``figure``)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepEnd(Callback):
    """A Hydra callback on every sweep (``conf/hydra/default.yaml``): says where the sweep
    goes when it starts; when every job has ended, writes the report if ``report`` is set
    (experiments that end with a table set it: ``hydra.callbacks.sweep.report=true``), says
    how each job ended and how to tabulate the sweep, and exits 1 if any job failed (the
    jobs record their failures instead of stopping the sweep)."""

    def __init__(self, report: bool) -> None:
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        log.info("Sweep folder: %s (links to each job's run folder)", config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from mim_agg.report.runs import read_sweep
        from mim_agg.tasks import TASKS
        from mim_agg.tasks.report import report

        sweep_dir = Path(config.hydra.sweep.dir)
        if self.report:
            report([sweep_dir], sweep_dir)
        jobs = read_sweep(sweep_dir)
        if TASKS[config.task].USES_RUN_FOLDER:  # extractions keep no run folder to count
            log.info("Sweep ended: %s. %s", how_jobs_ended(jobs), next_step(config.task, sweep_dir))
        failed = [job for job in jobs if job.status == "failed"]
        for job in failed:
            log.error("Failed: %s: %s", job.name or "(no overrides)", job.error)
        if failed:
            raise SystemExit(1)


def how_jobs_ended(jobs) -> str:
    """``3 done, 1 failed``."""
    statuses = [job.status for job in jobs]
    return ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))


def next_step(task: str, sweep_dir: Path) -> str:
    """What to run on a finished sweep: its table, or for analyses the overlay figure."""
    if task == "analyze":
        return f"Its figure: python scripts/compare_attention.py {sweep_dir}"
    return f"Its table: python run.py task=report report.sweep_dir={sweep_dir}"
