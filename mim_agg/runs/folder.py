"""A run folder: one run's config, status, log, results and checkpoint, safe to reuse.

An attempt locks the folder (a second process there refuses at once; the lock of a dead
process is free again), refuses a config whose results would differ from the stored one
(naming the keys, touching nothing), and records how it ended in ``run.json``: running, done,
failed (with ``error.txt``), preempted or interrupted. A finished run is never recomputed.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mim_agg.errors import UserError, one_line
from mim_agg.runs.identity import config_hash, differing_keys, result_config
from mim_agg.runs.preemption import Preempted
from mim_agg.utils.files import no_space, read_json, strict_json, write_atomic, write_json

log = logging.getLogger(__name__)

RECORD = "run.json"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunFolderError(UserError):
    """The folder cannot host this run; nothing in it was changed."""


@dataclass
class RunContext:
    """What the launcher knows about a job: its overrides and, in a sweep, the sweep folder."""

    overrides: list[str] = field(default_factory=list)
    sweep_dir: Path | None = None  # set for the jobs of a multirun
    job_num: int | None = None
    label: str = ""  # in a sweep: the overrides in which its jobs differ


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 outside distributed runs)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class RunFolder:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def record(self) -> dict:
        return read_json(self.path / RECORD, default={})

    def _write_record(self, record: dict) -> None:
        """Atomically; on a full disk, in place (the old record's own blocks hold the new
        one), so a run never stays "running" because its ending did not fit."""
        try:
            write_json(self.path / RECORD, record)
        except OSError as error:
            if not no_space(error):
                raise
            with open(self.path / RECORD, "r+") as file:
                file.truncate(0)
                file.write(json.dumps(strict_json(record), indent=2) + "\n")

    @contextlib.contextmanager
    def attempt(self, cfg: DictConfig, context: RunContext | None = None):
        """Hold the folder for one attempt of ``cfg``; yields the run record (a dict).

        ``record["status"] == "done"`` on entry means the run finished before: the caller
        returns its results instead of recomputing them.
        """
        context = context or RunContext()
        self.path.mkdir(parents=True, exist_ok=True)
        with self._locked():
            record = self._check(cfg)
            if context.sweep_dir is not None:
                self._join_sweep(record, context)
            if record.get("status") == "done":
                self._write_record(record)
                yield record
                return
            record = self._start(cfg, record, context)
            handler = self._log_to_file()
            try:
                yield record
            except BaseException as error:
                if self._holds_nothing_but_a_refusal(record, error):
                    self._remove(context)
                else:
                    self._end(record, *self._classify(error))
                raise
            else:
                self._end(record, "done")
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()

    @contextlib.contextmanager
    def _locked(self):
        lock_path = self.path / ".lock"
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise RunFolderError(
                    f"Run folder {self.path} is in use by another process ({lock.read().strip()}). "
                    "Wait for it to finish, or give this run another folder (hydra.run.dir=...)."
                ) from None
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
            lock.flush()
            try:
                yield
            finally:
                lock.truncate(0)
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check(self, cfg: DictConfig) -> dict:
        """The stored record, after making sure the stored config gives the same results."""
        stored_config = self.path / "config.yaml"
        record = self.record
        if not stored_config.is_file():
            return record
        stored = result_config(OmegaConf.load(stored_config))
        differing = differing_keys(stored, result_config(cfg))
        if differing:
            shown = ", ".join(differing[:12]) + (" ..." if len(differing) > 12 else "")
            raise RunFolderError(
                f"Run folder {self.path} holds a run of another config (differing: {shown}); "
                "it was left untouched. Rerun without hydra.run.dir to get this config's own "
                "folder, or give it a new one."
            )
        if not cfg.resume:
            record = {key: record[key] for key in ("wandb_id", "sweeps") if key in record}
        return record

    def _start(self, cfg: DictConfig, record: dict, context: RunContext) -> dict:
        if record.get("status") == "running":
            last = record["attempts"][-1]
            log.warning(
                "The last attempt in %s (pid %s on %s) ended without a word (killed?); "
                "taking over.",
                self.path,
                last.get("pid"),
                last.get("host"),
            )
            last["status"] = "killed"
        OmegaConf.save(cfg, self.path / "config.yaml", resolve=True)
        record.setdefault("run_id", secrets.token_hex(4))  # the W&B run id of every attempt
        record.setdefault("group", context.sweep_dir.name if context.sweep_dir else self.path.name)
        record.setdefault("label", context.label or " ".join(context.overrides) or self.path.name)
        record.update(
            name=self.path.name,
            config_hash=config_hash(result_config(cfg)),
            task=cfg.task,
            status="running",
            overrides=list(context.overrides),
        )
        record.setdefault("attempts", []).append(
            {
                "started": now(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            }
        )
        self._write_record(record)
        return record

    def _join_sweep(self, record: dict, context: RunContext) -> None:
        """Link the run into its sweep folder, where reports find it."""
        sweep_dir = Path(context.sweep_dir).resolve()
        link = sweep_dir / f"{context.job_num}-{self.path.name}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(self.path.resolve(), sweep_dir))
        sweeps = record.setdefault("sweeps", [])
        if str(sweep_dir) not in sweeps:
            sweeps.append(str(sweep_dir))

    def _log_to_file(self) -> logging.Handler:
        """``cli.log``: the text log of every attempt, appended."""
        handler = logging.FileHandler(self.path / "cli.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        return handler

    BOOKKEEPING = frozenset({".lock", RECORD, "config.yaml", "cli.log", "error.txt"})

    def _holds_nothing_but_a_refusal(self, record: dict, error: BaseException) -> bool:
        """Bad input refused in a folder made by this attempt, before anything was written
        beside our own bookkeeping: the message says everything, and a folder would only
        pile up (one per mistyped value)."""
        first = len(record.get("attempts", [])) == 1
        names = {entry.name for entry in self.path.iterdir()}
        return isinstance(error, UserError) and first and names <= self.BOOKKEEPING

    def _remove(self, context: RunContext) -> None:
        if context.sweep_dir is not None:
            (Path(context.sweep_dir) / f"{context.job_num}-{self.path.name}").unlink(True)
        shutil.rmtree(self.path)
        log.info("Nothing was computed; the run folder %s was removed.", self.path)

    @staticmethod
    def _classify(error: BaseException) -> tuple[str, BaseException | None]:
        if isinstance(error, Preempted | SIGTERMException):
            return "preempted", None
        if isinstance(error, KeyboardInterrupt | SystemExit):
            return "interrupted", None
        return "failed", error

    def _end(self, record: dict, status: str, error: BaseException | None = None) -> None:
        record["status"] = status
        record["attempts"][-1].update(ended=now(), status=status)
        if error is not None:
            record["error"] = one_line(error)
            try:
                text = "".join(traceback.format_exception(error))
                where = f"traceback in {write_atomic(self.path / 'error.txt', text)}"
            except OSError as unwritten:  # a full disk: the record says why, at least
                where = f"no traceback file: {unwritten.strerror}"
            log.error("Run failed: %s (%s)", record["error"], where)
        else:
            record.pop("error", None)
        self._write_record(record)
        log.info("Run %s: %s (%s)", status, self.path, RECORD)
