"""What a report reads: the jobs of one or more sweep folders, from their run folders alone.

A sweep folder holds ``multirun.yaml`` (the sweep Hydra launched) and one link per started job
(``<job number>-<run name>``) to that job's run folder. A job is ``done`` (its ``heads.csv``
counts), ``failed`` (in its run folder, or refused before it had one: ``<job number>.error``),
``preempted``, ``interrupted``, ``killed``, ``running`` or ``missing`` (launched but never
started: no link).
"""

from __future__ import annotations

import csv
import fcntl
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mim_agg.errors import UserError
from mim_agg.runs.folder import RECORD
from mim_agg.runs.identity import result_config
from mim_agg.utils.files import read_json


@dataclass
class Job:
    name: str  # the overrides that tell it from the sweep's other jobs
    status: str
    path: Path | None = None
    config: dict = field(default_factory=dict)  # result_config of the run
    heads: list[dict] = field(default_factory=list)  # heads.csv rows of a finished run
    error: str | None = None
    settings: dict = field(default_factory=dict)  # its whole config.yaml, resolved as it ran


def backbone_name(job: Job) -> str:
    """The backbone's config name, from the run folder ``<task>-<backbone>-...``."""
    parts = job.path.name.split("-") if job.path else []
    return parts[1] if len(parts) > 2 else str((job.config.get("backbone") or {}).get("arch"))


def read_sweeps(sweep_dirs: list[Path]) -> list[Job]:
    """Every job of every sweep folder, in job order; a folder without a sweep is refused."""
    jobs = []
    for sweep_dir in sweep_dirs:
        sweep_dir = Path(sweep_dir)
        if not (sweep_dir / "multirun.yaml").is_file():
            what = (
                "is no sweep folder (no multirun.yaml)" if sweep_dir.is_dir() else "does not exist"
            )
            raise UserError(
                f"report.sweep_dir={str(sweep_dir)!r} {what}; give the folder a sweep printed as "
                "'Sweep folder: ...' (outputs/multirun/<time>; a relative path is taken from "
                "paths.root_dir: MIM_AGG_ROOT, else the folder run.py is started in)."
            )
        jobs += read_sweep(sweep_dir)
    return jobs


def read_sweep(sweep_dir: Path) -> list[Job]:
    """The sweep's jobs, named by the overrides that tell them apart."""
    expected = launched_overrides(sweep_dir)
    name = job_label(expected)
    links = {}
    for link in sweep_dir.iterdir():
        number, _, _ = link.name.partition("-")
        if link.is_symlink() and number.isdigit():
            links[int(number)] = link
    started = {n: read_job(linked_run(link, len(links)), name) for n, link in links.items()}
    jobs = [started.get(n) or refused(sweep_dir, n, name(o)) for n, o in enumerate(expected)]
    return jobs + [job for n, job in sorted(started.items()) if n >= len(expected)]


def linked_run(link: Path, links: int) -> Path:
    """The run folder a sweep's job link points to, refused by name where it is not one: a
    sweep folder copied or moved without its runs keeps relative links to nowhere."""
    path = link.resolve()
    if not path.is_dir():
        raise UserError(
            f"{link} (one of the sweep's {links} job links) points to {os.readlink(link)}, "
            f"that is {path}, which is no folder. The links are relative to "
            "the sweep folder: one copied or moved without outputs/runs beside it points "
            "nowhere. Report the sweep folder where the sweep wrote it, or copy it together "
            "with the run folders its links name."
        )
    return path


def refused(sweep_dir: Path, number: int, name: str) -> Job:
    """A job without a run folder: refused before computing anything (its ``<n>.error``,
    written by the job), or launched and never started."""
    error = sweep_dir / f"{number}.error"
    if error.is_file():
        return Job(name, "failed", error=error.read_text().strip())
    return Job(name, "missing")


def job_label(jobs: list[list[str]]):
    """A function naming a job of ``jobs`` by the overrides in which the jobs differ."""
    swept = {_key(o) for o in {o for job in jobs for o in job} if _varies(o, jobs)}
    return lambda overrides: " ".join(o for o in overrides if _key(o) in swept)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _varies(override: str, jobs: list[list[str]]) -> bool:
    return not all(override in job for job in jobs)


def launched_overrides(sweep_dir: Path) -> list[list[str]]:
    """The overrides of each job Hydra's basic sweeper launches for ``multirun.yaml``, in its
    order: the product of every key's values, keys in order of first appearance, a later
    value of a key replacing an earlier one (an experiment's ``params``, then the CLI's)."""
    config = OmegaConf.load(sweep_dir / "multirun.yaml")
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def read_job(path: Path, name=" ".join) -> Job:
    record = read_json(path / RECORD, default={})
    status = record.get("status", "running")
    if status == "running" and not _locked(path):
        status = "killed"  # its process is gone without a word
    name = name(record.get("overrides", [])) or path.name
    if not (path / "config.yaml").is_file():  # linked, its attempt not yet begun (or killed)
        if status in ("running", "killed"):
            return Job(name, status, path)
        return Job(name, "failed", path, error=f"{path / 'config.yaml'} is missing")
    full = OmegaConf.load(path / "config.yaml")
    config = result_config(full)
    if "backbone" in config:  # a label, not part of the run's identity: columns group by it
        config["backbone"]["family"] = OmegaConf.select(full, "backbone.family")
    heads = []
    if status == "done" and (path / "heads.csv").is_file():  # an analysis trains no heads
        with open(path / "heads.csv") as handle:
            heads = list(csv.DictReader(handle))
    settings = OmegaConf.to_container(full)
    return Job(name, status, path, config, heads, record.get("error"), settings)


def _locked(path: Path) -> bool:
    """Whether a live process holds the run folder's lock."""
    lock_path = path / ".lock"
    if not lock_path.is_file():
        return False
    with open(lock_path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False
