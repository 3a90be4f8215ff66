"""Kill-and-resume with real signals in subprocesses: a resumed run ends exactly like an
uninterrupted one (same accuracies, same selected epochs), wherever the signal came."""

from __future__ import annotations

import json
import signal

import pytest

from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import read_predictions
from tests.helpers import FAST, run_cli
from tests.signals import signal_once

pytestmark = pytest.mark.slow

# 3 epochs of 9 steps (150 training images, batch 16), a checkpoint every 4 steps.
RESUMABLE = [*FAST, "aggregator=abmilp", "probe.epochs=3", "probe.checkpoint_every_n_steps=4"]
TIMING = ("backbone_images_per_s", "train_images_per_s", "wall_time_s")


def results(run_dir) -> dict:
    """``metrics.json`` without its timing fields, and every head's test predictions."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predicted = read_predictions(run_dir / PREDICTIONS).predicted
    return {
        **{k: v for k, v in metrics.items() if k not in TIMING},
        "predictions": {head: classes.tolist() for head, classes in predicted.items()},
    }


def only_run(root, name_part: str = ""):
    (run_dir,) = [p for p in (root / "outputs" / "runs").iterdir() if name_part in p.name]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    done = run_cli(*RESUMABLE, root=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return results(only_run(root))


SCENARIOS = {
    # name: (signal, hook, step, exit status of the interrupted attempt)
    "sigkill_mid_epoch": ("SIGKILL", "train_batch", 7, -signal.SIGKILL),
    "sigkill_after_an_epoch": ("SIGKILL", "train_batch", 19, -signal.SIGKILL),
    "sigkill_before_last_batch": ("SIGKILL", "train_batch", 9, -signal.SIGKILL),
    "sigterm_mid_epoch": ("SIGTERM", "train_batch", 13, 128 + signal.SIGTERM),
    "sigkill_between_epochs": ("SIGKILL", "train_epoch", 1, -signal.SIGKILL),
    "sigusr1_during_heldout": ("SIGUSR1", "validation_batch", 1, 128 + signal.SIGUSR1),
    "sigterm_during_test": ("SIGTERM", "test_batch", 1, 128 + signal.SIGTERM),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resumed_run_equals_uninterrupted(scenario, uninterrupted, tmp_path):
    signum, hook, step, status = SCENARIOS[scenario]
    command = [*RESUMABLE, signal_once(signum, hook, step, tmp_path / "fired")]
    first = run_cli(*command, root=tmp_path)
    assert first.returncode == status, first.stderr[-3000:]
    run_dir = only_run(tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    assert not (run_dir / "metrics.json").exists()
    if signum != "SIGKILL":  # a caught signal leaves a checkpoint and says why it stopped
        assert record["status"] == "preempted"
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    second = run_cli(*command, root=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in (run_dir / "cli.log").read_text()
    assert results(run_dir) == uninterrupted
    assert "not resumable" not in second.stderr  # Lightning restored the loader's position
    assert "exists and is not empty" not in second.stderr  # the checkpoint being resumed
    record = json.loads((run_dir / "run.json").read_text())
    if signum == "SIGKILL":  # the dead process's lock is free: taken over with a message
        assert "ended without a word (killed?); taking over" in second.stdout
    expected_first = "killed" if signum == "SIGKILL" else "preempted"
    assert [a["status"] for a in record["attempts"]] == [expected_first, "done"]


def test_loader_workers_change_nothing(uninterrupted, tmp_path):
    """Two loader workers, interrupted mid-epoch: the same numbers as zero workers, unbroken."""
    command = [
        *RESUMABLE,
        "dataset.num_workers=2",
        signal_once("SIGTERM", "train_batch", 6, tmp_path / "fired"),
    ]
    assert run_cli(*command, root=tmp_path).returncode == 128 + signal.SIGTERM
    second = run_cli(*command, root=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert results(only_run(tmp_path)) == uninterrupted
    assert "not resumable" not in second.stderr
