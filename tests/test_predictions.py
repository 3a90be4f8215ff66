"""``predictions.safetensors``: every head's predicted class per test image, written by a real
probe run, read back checked; damaged or inconsistent files are named."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from mim_agg.errors import UserError
from mim_agg.runs.runner import run_task
from mim_agg.utils.files import DamagedFile
from mim_agg.utils.predictions import FILE, HeadPredictions, read_predictions, write_predictions
from tests.helpers import FAST, compose_config
from tests.test_report import fake_sweep

# Three heads, two learning rates: six heads in one pass over 80 synthetic test images.
PROBE = [
    *FAST,
    "aggregator=mean",
    "heads=none",
    "+aggregator@heads.cls=cls",
    "+aggregator@heads.abmilp=abmilp",
    "probe.blrs=[0.3,3.0]",
]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    run_task(compose_config(PROBE, root))
    return root / "run"


@pytest.mark.slow  # trains for seconds (make test-fast skips it)
def test_a_probe_run_writes_every_heads_prediction_per_test_image(probe_run):
    predictions = read_predictions(probe_run / FILE)
    with open(probe_run / "heads.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert set(predictions.predicted) == set(rows) and len(rows) == 6
    assert np.array_equal(predictions.image_index, np.arange(80))  # the test split, in order
    assert predictions.predicted["cls_blr3"].dtype == np.int16
    for head, row in rows.items():  # the held-out-selected weights' test accuracy
        assert predictions.accuracy(head) == pytest.approx(float(row["test/acc1"]), abs=1e-6)


@pytest.mark.slow  # reads the run above
def test_the_report_of_the_run_marks_heads_as_the_paired_tests_decide(probe_run, tmp_path):
    """The run as a one-job sweep: its table's marks follow McNemar's exact test and Holm,
    computed here from the predictions file with integers."""
    from mim_agg.report.significance import ALPHA

    sweep = fake_sweep(tmp_path, [])
    (sweep / f"0-{probe_run.name}").symlink_to(probe_run)
    run_task(compose_config(["task=report", f"report.sweep_dir={sweep}"]))
    text = (sweep / "results.md").read_text()
    predictions = read_predictions(probe_run / FILE)
    with open(probe_run / "heads.csv") as handle:
        rows = list(csv.DictReader(handle))
    chosen = {}  # each aggregator at its held-out-selected rate, as the report chooses
    for row in rows:
        best = chosen.get(row["aggregator"])
        if best is None or float(row["val/acc1_best"]) > float(best["val/acc1_best"]):
            chosen[row["aggregator"]] = row
    winner = max(chosen, key=lambda a: float(chosen[a]["val/acc1_best"]))
    right = {a: predictions.correct(row["head"]) for a, row in chosen.items()}
    others = sorted(
        (a for a in chosen if a != winner), key=lambda a: exact_p(right[winner], right[a])
    )
    adjusted, running = {}, 0.0
    for rank, head in enumerate(others):  # Holm
        running = max(running, min(1.0, (len(others) - rank) * exact_p(right[winner], right[head])))
        adjusted[head] = running
    assert f"| {winner} | " in text and text.split(f"| {winner} | ")[1].split("\n")[0].endswith(
        "★ |"
    )
    for head, p_value in adjusted.items():
        line = text.split(f"| {head} | ")[1].split("\n")[0]
        assert line.endswith("≈ |") == (p_value >= ALPHA), (head, p_value, line)
    assert (sweep / "results_cost.png").stat().st_size > 10_000
    assert (probe_run / "cost.png").stat().st_size > 10_000


def exact_p(first, second) -> float:
    """McNemar's exact two-sided p from the discordant counts, in integers."""
    b, c = int((first & ~second).sum()), int((second & ~first).sum())
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** (b + c))


@pytest.mark.slow  # reads the run above
def test_the_targets_are_the_test_splits_labels(probe_run):
    from mim_agg.builders import build_datamodule

    datamodule = build_datamodule(compose_config(PROBE))
    datamodule.setup()
    labels = [int(label) for _, label in datamodule.splits["test"]]
    assert read_predictions(probe_run / FILE).targets.tolist() == labels


def constructed(num_classes=4) -> HeadPredictions:
    return HeadPredictions.in_image_order(
        [3, 1, 2, 0], [0, 1, 2, 3], {"a": [0, 1, 1, 3], "b": [2, 2, 2, 2]}, num_classes
    )


def test_predictions_are_stored_in_image_order_and_read_back(tmp_path):
    predictions = constructed()
    assert predictions.image_index.tolist() == [0, 1, 2, 3]
    assert predictions.targets.tolist() == [3, 1, 2, 0]  # each label went with its image
    write_predictions(tmp_path / FILE, predictions)
    back = read_predictions(tmp_path / FILE)
    assert back.predicted["a"].tolist() == [3, 1, 1, 0] and back.accuracy("a") == 0.75
    assert back.num_classes == 4 and list(back.predicted) == ["a", "b"]


def test_classes_beyond_int16_are_stored_as_int32(tmp_path):
    predictions = HeadPredictions.in_image_order([0], [40_000], {"a": [39_999]}, 40_001)
    write_predictions(tmp_path / FILE, predictions)
    assert read_predictions(tmp_path / FILE).predicted["a"].dtype == np.int32


def test_damaged_and_inconsistent_files_are_named(tmp_path):
    path = tmp_path / FILE
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DamagedFile, match=f"{path} is damaged"):
        read_predictions(path)
    repeated = constructed()
    repeated.image_index[1] = 0  # an image twice
    with pytest.raises(ValueError, match="not distinct"):
        write_predictions(path, repeated)
    beyond = constructed(num_classes=3)  # label 3 of 3 classes
    beyond.num_classes = 3
    with pytest.raises(ValueError, match=r"targets holds classes outside \[0, 3\)"):
        write_predictions(path, beyond)
    floats = constructed()
    floats.targets = floats.targets.astype(np.float32)
    with pytest.raises(ValueError, match="float32 values, not class indices"):
        write_predictions(path, floats)
    short = constructed()
    short.predicted["b"] = short.predicted["b"][:2]
    with pytest.raises(ValueError, match=r"b has shape \(2,\)"):
        write_predictions(path, short)
    assert isinstance(DamagedFile("x"), UserError)  # one message, exit status 2


def test_label_sets_count_a_prediction_in_the_image_s_set_and_travel_with_their_images(tmp_path):
    """ImageNet-ReaL's rule, against membership computed here image by image."""
    sets = {3: [1, 2], 1: [0], 2: [2, 3, 0], 0: [3]}  # image -> its right answers
    order = [3, 1, 2, 0]
    predicted = {"a": [2, 0, 3, 3], "b": [1, 1, 0, 3]}  # in ``order``
    predictions = HeadPredictions.in_image_order(
        order, [sets[i][0] for i in order], predicted, 4, [sets[i] for i in order]
    )
    write_predictions(tmp_path / FILE, predictions)
    back = read_predictions(tmp_path / FILE)
    for head, classes in predicted.items():
        by_image = dict(zip(order, classes, strict=True))
        expected = [by_image[i] in sets[i] for i in range(4)]
        assert back.correct(head).tolist() == expected, head
    assert back.accuracy("a") == 1.0 and back.accuracy("b") == 0.75
    predictions.targets[1] = 1  # image 1's target outside its set [0]
    with pytest.raises(ValueError, match="target is not in its label set"):
        write_predictions(tmp_path / FILE, predictions)
