"""A run's life: its identity (what its task reads, never renamed by a new group), and how it
ends when it cannot go on: bad input leaves no folder behind, a full disk and a damaged record
end in one message, and the record never stays "running"."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import pytest
import torch

from mim_agg.errors import UserError
from mim_agg.runs.folder import RunFolder
from mim_agg.runs.runner import DiskFull, run_task
from tests.helpers import FAST, compose_config


def test_bad_input_refused_before_any_work_leaves_no_run_folder(tmp_path):
    cfg = compose_config([*FAST, "backbone.block=99"], tmp_path)
    with pytest.raises(UserError, match="backbone.block=99 is out of range"):
        run_task(cfg)
    assert not (tmp_path / "run").exists()


def full_disk_once_running(monkeypatch):
    """From the moment the run has recorded its start, every file write meets a full disk."""
    real_start, real_fsync = RunFolder._start, os.fsync
    started = []

    def start(self, *args):
        record = real_start(self, *args)
        started.append(True)
        return record

    def fsync(fd):
        if started:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(RunFolder, "_start", start)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_ends_the_run_with_one_message_and_a_failed_record(tmp_path, monkeypatch):
    full_disk_once_running(monkeypatch)
    cfg = compose_config([*FAST, "aggregator=mean"], tmp_path)
    with pytest.raises(DiskFull, match=r"No space left on the disk .* run the same command again"):
        run_task(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("DiskFull: No space left")
    assert record["attempts"][-1]["status"] == "failed"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_damaged_record_is_named_and_left_as_it_is(tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean", "probe.epochs=1"], tmp_path)
    run_task(cfg)
    record = tmp_path / "run" / "run.json"
    record.write_text(record.read_text()[:40])  # cut short
    with pytest.raises(UserError, match=r"run\.json is damaged .* move it away and rerun"):
        run_task(cfg)
    assert len(record.read_text()) == 40


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(
    "overrides,fix",
    [
        (["probe.epochs=2"], "for a short run add probe.warmup_epochs=0"),
        (["trainer=ddp"], "trainer=ddp_sim runs the DDP code on two CPU processes"),
    ],
)
def test_a_newcomers_first_mistakes_name_their_fix(tmp_path, overrides, fix):
    if "trainer=ddp" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has the GPUs trainer=ddp asks for")
    cfg = compose_config(overrides, tmp_path)  # the defaults: probe.warmup_epochs=10
    with pytest.raises(UserError, match=re.escape(fix)):
        run_task(cfg)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("task", ["probe", "knn", "analyze"])
def test_a_new_config_group_renames_no_existing_run(task):
    """A run's identity is what its task reads: a group added (for a protocol to come) enters
    no other task's hash, so no finished run is found under another name and trained again."""
    from omegaconf import open_dict

    from mim_agg.runs.identity import config_hash, result_config

    cfg = compose_config([f"task={task}"])
    before = config_hash(result_config(cfg))
    with open_dict(cfg):
        cfg.logreg = {"C": [0.1, 1.0], "max_iter": 1000}
    assert config_hash(result_config(cfg)) == before
    with open_dict(cfg):
        cfg.dataset.name = "another"  # a group it reads does count
    assert config_hash(result_config(cfg)) != before


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_disk_that_fills_while_a_checkpoint_is_written_leaves_no_half_checkpoint(tmp_path):
    """A real full disk (a 60 KB tmpfs): the checkpoint that does not fit is never left
    half-written, so the rerun is not told to delete a truncated last.ckpt."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60k", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        cfg = compose_config(
            ["debug=fast", "dataset=digits", "probe.epochs=1", "probe.warmup_epochs=0"], disk
        )
        with pytest.raises(DiskFull, match="No space left"):
            run_task(cfg)
        checkpoint = disk / "run" / "checkpoints" / "last.ckpt"
        assert not checkpoint.exists() or torch.load(checkpoint, weights_only=True)
        assert json.loads((disk / "run" / "run.json").read_text())["status"] == "failed"
    finally:
        subprocess.run(["umount", str(disk)])
