"""Run one task in its run folder: the wrapper every task shares (the command line, tests)."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from mim_agg.runs.folder import RunContext, RunFolder, global_rank
from mim_agg.runs.preemption import Preempted, SignalWatch
from mim_agg.tasks import TASKS
from mim_agg.validation import check_ranges

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig, context: RunContext | None = None) -> dict:
    """Run ``cfg.task``; a finished run returns its stored results, a preempted one exits
    non-zero after its checkpoint and status are written (or is requeued by submitit)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {sorted(TASKS)}.")
    check_ranges(cfg)
    task = TASKS[cfg.task]
    if not task.USES_RUN_FOLDER:
        return task.run(cfg)
    watch = SignalWatch()
    try:
        if global_rank() != 0:  # rank zero alone keeps the folder; the others just compute
            return task.run(cfg, watch)
        folder = RunFolder(Path(cfg.paths.output_dir))
        with folder.attempt(cfg, context) as record:
            log.info("Run folder: %s", folder.path)
            if record.get("status") == "done":
                log.info(
                    "This run finished before; its results are not recomputed (options outside "
                    "its identity, such as callbacks or logging, change nothing now; resume=false "
                    "trains it again)."
                )
                summary = task.finished(folder.path)
            else:
                log.info("Overrides: %s", " ".join(record["overrides"]) or "(none)")
                summary = task.run(cfg, watch)
        log.info("Run folder: %s", folder.path)
        return summary
    except (Preempted, SIGTERMException):
        watch.hand_over()
        raise  # hand_over always exits; this keeps type checkers informed
    finally:
        watch.close()
