"""A sweep on submitit's local executor, interrupted the way SLURM interrupts jobs: a failing
job is recorded and the others finish; a signalled job is requeued once and resumes in its
own folder; the report lists everything."""

from __future__ import annotations

import json

import pytest

from mim_agg.runs.runner import run_task
from tests.helpers import FAST, compose_config, run_cli
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
    assert sweep.returncode == 1 and "Traceback" not in sweep.stderr  # failed jobs: no success
    runs = {
        p.name: json.loads((p / "run.json").read_text())
        for p in (tmp_path / "outputs" / "runs").iterdir()
    }
    # the refused jobs (block 99) computed nothing and left no run folder, only their error
    assert sorted([a["status"] for a in r["attempts"]] for r in runs.values()) == [
        ["done"],
        ["preempted", "done"],  # requeued once
    ]
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))  # in-process
    text = (sweep_dir / "results.md").read_text()
    assert " ± " in text and " (2)" in text  # two seeds averaged
    for seed in (0, 1):
        assert (
            f"- **failed** `seed={seed} backbone.block=99`: ConfigError: backbone.block=99" in text
        )


def test_quick_sweep_says_where_it_goes_and_reports_whatever_failed(tmp_path):
    done = run_cli(
        "experiment=quick_sweep",
        "probe.epochs=1",
        "probe.warmup_epochs=0,5",  # 5 > probe.epochs: those four jobs are refused
        "dataset.heldout_fraction=0.2",
        root=tmp_path,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    assert f"Sweep folder: {sweep_dir}" in done.stdout.splitlines()[0]
    assert f"python run.py task=report report.sweep_dir={sweep_dir}" in done.stdout
    text = (sweep_dir / "results.md").read_text()
    assert "| head | backbone.block=5 | backbone.block=11 |" in text
    assert text.count(" (2)") == 8  # two seeds in every cell of the four heads
    assert "## Not in the table: 4 of 8 jobs" in text
    assert "- **failed** `backbone.block=5 seed=0 probe.warmup_epochs=5`: ConfigError: " in text
    assert (sweep_dir / "results.png").is_file() and (sweep_dir / "results.csv").is_file()
    assert (sweep_dir / "results_blocks.png").is_file()  # backbone.block varies
    assert len(list((tmp_path / "outputs" / "runs").iterdir())) == 4  # none for the refused
