"""``trainer=ddp_sim``: two CPU processes over gloo run the distributed code paths for real."""

from __future__ import annotations

import copy
import json
import re
import signal

import pytest
import torch
from torch.utils.data import DataLoader

from mim_agg.builders import build_datamodule, build_probe
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import read_predictions
from tests.helpers import FAST, compose_config, run_cli
from tests.signals import signal_once

# 75 test and about 37 held-out images: odd counts, which a padding sampler would repeat.
# About 113 training images: 4 batches of 16 per rank and epoch.
DATA = ["dataset.train_size=150", "dataset.test_size=75", "+aggregator@heads.mean=mean"]
TWO_PROCESSES = [*FAST, *DATA, "trainer=ddp_sim"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The run folder of one uninterrupted ``trainer=ddp_sim`` run, shared by the tests."""
    root = tmp_path_factory.mktemp("two_processes")
    result = run_cli(*TWO_PROCESSES, root=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    return run_dir


@pytest.mark.slow
def test_two_processes_count_every_test_image_exactly_once(two_processes, tmp_path):
    run_dir = two_processes
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"

    # The last and the held-out-selected heads of the checkpoint, evaluated again in one
    # process on the whole test split.
    cfg = compose_config([*FAST, *DATA], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    probe = build_probe(cfg, datamodule.num_classes)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    missing = probe.load_state_dict(checkpoint["state_dict"], strict=False).missing_keys
    assert not [k for k in missing if k.startswith("heads.")]
    heads = {}
    for name, head in probe.heads.items():
        heads[(name, "test/acc1_last")] = head.eval()
        selected = copy.deepcopy(head)
        selected.load_state_dict(checkpoint["head_selection"][name]["state"])
        heads[(name, "test/acc1")] = selected.eval()
    correct = dict.fromkeys(heads, 0)
    predicted = {key: [] for key in heads}
    test = datamodule.splits["test"]
    with torch.no_grad():
        for images, targets in DataLoader(test, batch_size=32):
            tokens = probe.source(images)
            for key, head in heads.items():
                classes = head(tokens).argmax(-1)
                predicted[key] += classes.tolist()
                correct[key] += int((classes == targets).sum())
    assert {name for name, _ in correct} == {"cls", "mean"}
    for (name, metric), count in correct.items():
        assert metrics["heads"][name][metric] == pytest.approx(count / len(test), abs=1e-6)
    # both ranks' predictions, merged in image order: the selected heads' argmax per image
    stored = read_predictions(run_dir / PREDICTIONS)
    assert stored.image_index.tolist() == list(range(len(test)))
    for name in ("cls", "mean"):
        assert stored.predicted[name].tolist() == predicted[(name, "test/acc1")]


def results(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith(("_per_s", "_time_s"))}


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_one_step_and_the_rerun_ends_equal(
    two_processes, tmp_path
):
    """SIGTERM to rank 1 alone: both ranks agree on the step, one checkpoint is written, both
    exit 128 + SIGTERM (rank zero first: Lightning's launcher kills it when a child exits
    non-zero first); the rerun resumes and ends as the run never interrupted."""
    command = [*TWO_PROCESSES, signal_once("SIGTERM", "train_batch", 1, tmp_path / "fired", 1)]
    first = run_cli(*command, root=tmp_path)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    log = first.stdout + first.stderr
    stops = dict(re.findall(r"Rank (\d) stops at step (\d+)", log))
    assert stops.keys() == {"0", "1"} and len(set(stops.values())) == 1  # one step for both
    assert log.count("Exiting with status 143 (SIGTERM)") == 2  # both ranks
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "preempted"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]

    second = run_cli(*command, root=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in (run_dir / "cli.log").read_text()
    assert results(run_dir) == results(two_processes)
