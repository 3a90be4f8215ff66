"""The Hydra entry point: ``python run.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mim_agg.config import register_configs
from mim_agg.errors import UserError, one_line
from mim_agg.report.runs import job_label, launched_overrides
from mim_agg.runs.folder import RECORD, RunContext
from mim_agg.runs.runner import run_task
from mim_agg.utils.console import quiet_third_party
from mim_agg.utils.files import write_atomic

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def import_plugins() -> None:
    """Import the modules named in ``$MIM_AGG_PLUGINS`` (comma-separated, e.g.
    ``my_lab.poolers,my_lab.datasets``) before configs are registered: an aggregator, dataset
    source, checkpoint format or task of your own, kept in your own package, registers itself
    exactly as the project's do (CONTRIBUTING.md). A name that does not import is one message."""
    for name in filter(None, (n.strip() for n in os.environ.get("MIM_AGG_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            print(
                f"Error: MIM_AGG_PLUGINS names {name!r}, which does not import: {error}. "
                "Put its folder on PYTHONPATH or fix the name.",
                file=sys.stderr,
            )
            raise SystemExit(2) from None


import_plugins()
register_configs()
quiet_third_party()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the configured task; return the held-out accuracy for Hydra sweepers (never test).

    A user error ends a single run with its message alone (exit status 2). In a sweep, a
    failing job is recorded and the others run on; the sweep ends with its summary (and
    report) and a non-zero exit status (``mim_agg.report.SweepEnd``).
    """
    context = launcher_context()
    try:
        summary = run_task(cfg, context)
    except UserError as error:
        remove_empty_run_folder(cfg)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if context.sweep_dir is None:
            print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        record_failure(context, cfg, error)
        return None
    except Exception as error:  # a bug: the traceback is in the job's log and error.txt
        if context.sweep_dir is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.exception("Job %s failed", context.job_num)
        record_failure(context, cfg, error)
        return None
    return summary.get("val/acc1_best")


def remove_empty_run_folder(cfg: DictConfig) -> None:
    """The run folder Hydra made for a run refused before it wrote anything (never a report's
    sweep folder or a cache folder, which are not Hydra's to make)."""
    folder = Path(cfg.paths.output_dir).resolve()
    if folder.parent == Path(cfg.paths.output_root, "runs").resolve():
        with contextlib.suppress(OSError):  # not empty: the run folder records the failure
            folder.rmdir()


def record_failure(context: RunContext, cfg: DictConfig, error: Exception) -> None:
    """One line in the job's log; and where no run folder records it (bad input refused
    before anything was computed leaves none), ``<sweep>/<job>.error`` for the report."""
    print(f"Error in job {context.job_num} ({context.label}): {error}", file=sys.stderr)
    if not (Path(cfg.paths.output_dir) / RECORD).is_file():
        write_atomic(Path(context.sweep_dir) / f"{context.job_num}.error", one_line(error) + "\n")


def launcher_context() -> RunContext:
    """The job's overrides and, in a multirun, its sweep folder and number."""
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("hydra")]
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return RunContext(overrides)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    label = job_label(launched_overrides(sweep_dir))(overrides)
    return RunContext(overrides, sweep_dir, hydra_cfg.job.num, label)
