"""Run one task in its run folder: the wrapper every task shares (the command line, tests)."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from mim_agg.errors import ConfigError, UserError
from mim_agg.runs.folder import RunContext, RunFolder, global_rank
from mim_agg.runs.preemption import Preempted, SignalWatch
from mim_agg.tasks import TASKS
from mim_agg.utils.files import no_space
from mim_agg.validation import check_declared, check_ranges, check_required

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig, context: RunContext | None = None) -> dict:
    """Run ``cfg.task``; a finished run returns its stored results, a preempted one exits
    non-zero after its checkpoint and status are written (or is requeued by submitit)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task} is no task; the tasks are {', '.join(sorted(TASKS))}.")
    task = TASKS[cfg.task]
    check_declared(cfg)
    check_required(cfg, required_groups(cfg, task))
    check_ranges(cfg)
    watch = SignalWatch()
    try:
        if not task.USES_RUN_FOLDER or global_rank() != 0:  # rank zero alone keeps the folder
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
                summary = run_until_the_disk_fills(task, cfg, watch)
        log.info("Run folder: %s", folder.path)
        return summary
    except (Preempted, SIGTERMException):
        watch.hand_over()
        raise  # hand_over always exits; this keeps type checkers informed
    finally:
        watch.close()


def required_groups(cfg: DictConfig, task) -> tuple[str, ...]:
    """The groups whose ``???`` keys ``task`` must have filled: those it reads where it declares
    them, otherwise every group but the other tasks' own (``evaluate.run`` is no concern of
    ``task=extract``)."""
    if task.USES_RUN_FOLDER:
        return task.reads(cfg)
    others = {getattr(t, "SETTINGS_GROUP", None) for t in TASKS.values() if t is not task}
    return tuple(key for key in cfg if key != "hydra" and key not in others)


class DiskFull(UserError):
    """The disk filled up under a run: nothing the code can fix, one message saying what to do."""


def run_until_the_disk_fills(task, cfg: DictConfig, watch) -> dict:
    """``task.run``, with a full disk (or quota) turned into one message naming the file that
    did not fit; files are written whole or not at all, so the last checkpoint and every
    complete cache shard stay usable and the rerun continues from them."""
    try:
        return task.run(cfg, watch)
    except OSError as error:
        if not no_space(error):
            raise
        where = error.filename2 or error.filename or cfg.paths.output_dir
        raise DiskFull(
            f"No space left on the disk holding {where} ({error.strerror}). Files are written "
            "whole or not at all: the last complete checkpoint and cache shards are kept. Free "
            "some space (or move paths.root_dir / paths.cache_dir to a larger disk) and run the "
            "same command again to continue."
        ) from error
