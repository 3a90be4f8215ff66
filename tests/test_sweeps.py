"""A sweep on submitit's local executor, interrupted the way SLURM interrupts jobs: a failing
job is recorded and the others finish; a signalled job is requeued once and resumes in its
own folder; the report lists everything."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FAST, run_cli
from tests.signals import signal_once

pytestmark = pytest.mark.slow


def test_local_sweep_with_a_failure_and_a_requeue_then_the_report(tmp_path):
    sweep = run_cli(
        "-m",
        "hydra/launcher=local",
        *FAST,
        "aggregator=mean",
        "seed=0,1",
        "backbone.block=-1,99",  # block 99 does not exist: those two jobs fail
        signal_once("SIGUSR2", "train_batch", 3, tmp_path / "fired"),  # submitit's signal
        root=tmp_path,
    )
    assert sweep.returncode != 0  # a sweep with failed jobs is no success
    runs = {
        p.name: json.loads((p / "run.json").read_text())
        for p in (tmp_path / "outputs" / "runs").iterdir()
    }
    statuses = sorted(r["status"] for r in runs.values())
    assert statuses == ["done", "done", "failed", "failed"]
    attempts = sorted([a["status"] for a in r["attempts"]] for r in runs.values())
    assert attempts == [["done"], ["failed"], ["failed"], ["preempted", "done"]]  # requeued once
    for name, record in runs.items():
        if record["status"] == "failed":
            error = (tmp_path / "outputs" / "runs" / name / "error.txt").read_text()
            assert "Traceback" in error and "backbone.block=99 is out of range" in error

    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    report = run_cli("task=report", f"report.sweep_dir={sweep_dir}", root=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep_dir / "results.md").read_text()
    assert " ± " in text and "(2) |" in text  # two seeds averaged
    for seed in (0, 1):
        assert (
            f"- **failed** `seed={seed} backbone.block=99`: ConfigError: backbone.block=99" in text
        )


def test_quick_sweep_ends_with_the_report(tmp_path):
    done = run_cli(
        "experiment=quick_sweep", "probe.epochs=1", "dataset.heldout_fraction=0.2", root=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    text = (sweep_dir / "results.md").read_text()
    assert "| head | backbone.block=5 | backbone.block=11 |" in text
    assert text.count("(2) |") >= 4  # two seeds in every cell of the four heads
    assert (sweep_dir / "results.png").is_file() and (sweep_dir / "results.csv").is_file()
    assert (sweep_dir / "results_blocks.png").is_file()  # backbone.block varies
