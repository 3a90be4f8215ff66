"""The Hydra entry point: ``python run.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mim_agg.config import register_configs
from mim_agg.errors import ConfigError, UserError, one_line
from mim_agg.report.runs import job_label, launched_overrides
from mim_agg.runs.folder import RECORD, RunContext
from mim_agg.runs.runner import run_task
from mim_agg.utils.console import quiet_third_party
from mim_agg.utils.files import write_atomic

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
FULL_ERROR = "HYDRA_FULL_ERROR"  # "1": Hydra raises instead of printing (and so do we)
USERS_FULL_ERROR = "MIM_AGG_USERS_HYDRA_FULL_ERROR"  # the user's own, while ours is set
HYDRAS_ADVICE = "To append to your config use"  # "+key=value": nothing would read that key


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


def main() -> None:
    """``python run.py``: Hydra's entry point, its composition errors (an unknown key, option or
    value on the command line) answered as every other bad input is: one message naming the
    key and the fix, exit status 2. Hydra prints those itself and exits 1 unless
    ``HYDRA_FULL_ERROR=1`` lets them through to us, so it is set for the composition alone:
    ``run_configured_task`` puts the user's own value back before anything runs."""
    users_choice = os.environ.setdefault(USERS_FULL_ERROR, os.environ.get(FULL_ERROR, ""))
    os.environ[FULL_ERROR] = "1"
    try:
        run_configured_task()
    except CompactHydraException as error:
        if users_choice == "1":
            raise
        print(f"Error: {composition_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OmegaConfBaseException as error:  # a value Hydra met naming the run folder
        if users_choice == "1":
            raise
        print(f"Error: {unresolvable_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def composition_message(error: CompactHydraException) -> str:
    """A refused command line in one message: Hydra's lines less its ``+key`` advice, the
    cause, and for an unknown key or option what its group has (the nearest first)."""
    if isinstance(error, MissingConfigException) and error.options:  # group=<no such option>
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return f"{group}={option}: no such option. {choices(option, error.options, group, '=')}"
    lines = [line for line in str(error).splitlines() if not line.startswith(HYDRAS_ADVICE)]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key:
            parent = cause.parent_node
            keys = [k for k in parent if k != "hydra"] if OmegaConf.is_dict(parent) else []
            if keys:
                lines.append(choices(str(cause.key), keys, cause.full_key.rpartition(".")[0], "."))
    return " ".join(sentence(line.strip()) for line in lines if line.strip())


def unresolvable_message(error: OmegaConfBaseException) -> str:
    """A value its key's type refuses, met where Hydra resolves the config to name the run
    folder, before any check of ours runs (``seed=abc`` reaches ``dataset.subset_seed``
    through ``${seed}``): OmegaConf's first line, the key, and the fix."""
    where = f" (resolving {error.full_key})" if getattr(error, "full_key", None) else ""
    return (
        f"{sentence(str(error).splitlines()[0] + where)} Give that key, or the one its "
        "interpolation names, a value of its type."
    )


def choices(name: str, names: list[str], group: str, joiner: str) -> str:
    """``Did you mean dataset.root? The choices of dataset: name, root, ...``."""
    nearest = difflib.get_close_matches(name, names, n=1)
    guess = f"Did you mean {group + joiner if group else ''}{nearest[0]}? " if nearest else ""
    return f"{guess}The choices of {group or 'the config'}: {', '.join(sorted(names))}."


def sentence(line: str) -> str:
    return line if line.endswith((".", "?", ":")) else f"{line}."


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def run_configured_task(cfg: DictConfig) -> float | None:
    """Run the configured task; return the held-out accuracy for Hydra sweepers (never test).

    A user error ends a single run with its message alone (exit status 2). In a sweep, a
    failing job is recorded and the others run on; the sweep ends with its summary (and
    report) and a non-zero exit status (``mim_agg.report.SweepEnd``).
    """
    os.environ[FULL_ERROR] = os.environ.get(USERS_FULL_ERROR, "")  # composed: Hydra's way again
    context = launcher_context()
    try:
        check_root_keys(cfg, HydraConfig.get().runtime.choices)
        summary = run_task(cfg, context)
    except UserError as error:
        remove_empty_run_folder(cfg)
        if os.environ[FULL_ERROR] == "1":
            raise
        if context.sweep_dir is None:
            print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        record_failure(context, cfg, error)
        return None
    except Exception as error:  # a bug: the traceback is in the job's log and error.txt
        if context.sweep_dir is None or os.environ[FULL_ERROR] == "1":
            raise
        log.exception("Job %s failed", context.job_num)
        record_failure(context, cfg, error)
        return None
    return summary.get("val/acc1_best")


def check_root_keys(cfg: DictConfig, choices_made: DictConfig) -> None:
    """Refuse a key that ``+`` added at the top of the config (``+sed=1`` meaning ``seed=1``):
    nothing reads it, and the run would go on as if it had been set. The top holds the keys of
    ``conf/config.yaml`` and the groups Hydra composed (``choices_made``, Hydra's record of
    them: those a plugin adds included)."""
    known = set(OmegaConf.load(CONFIG_DIR / "config.yaml")) - {"defaults"}
    for choice in choices_made:  # group, group@package, hydra/launcher
        known.add(re.split(r"[./]", choice.partition("@")[2] or choice)[0])
    for key in cfg:
        if key not in known:
            raise ConfigError(
                f"{key} is no option: a '+' on the command line added it at the top of the "
                f"config, and nothing reads it. {choices(str(key), sorted(known), '', '')}"
            )


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
