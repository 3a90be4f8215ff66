"""Low-shot subsets: stratified (exactly N per class, or proportional), drawn from their own
seed, the same for every head and protocol, held-out taken from inside, listed in the run."""

from __future__ import annotations

import numpy as np
import pytest

from mim_agg.builders import build_datamodule
from mim_agg.data.sources import DataError
from mim_agg.errors import ConfigError
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, compose_config


def subset(overrides, tmp_path):
    datamodule = build_datamodule(compose_config([*FAST, "dataset=digits", *overrides], tmp_path))
    datamodule.setup()
    return datamodule


def chosen(datamodule) -> np.ndarray:
    return np.sort(np.concatenate([datamodule.splits[s].indices for s in ("train", "heldout")]))


def labels(datamodule) -> np.ndarray:
    return np.concatenate([datamodule.splits[s].targets for s in ("train", "heldout")])


def test_shots_take_exactly_n_per_class_and_hold_out_from_inside(tmp_path):
    datamodule = subset(["dataset.shots=10", "dataset.heldout_fraction=0.2"], tmp_path)
    assert np.bincount(labels(datamodule)).tolist() == [10] * 10
    assert np.bincount(datamodule.splits["heldout"].targets).tolist() == [2] * 10
    assert len(datamodule.splits["train"]) == 80
    few = subset(["dataset.shots=2"], tmp_path)  # one held out per class even at 10 %
    assert np.bincount(few.splits["heldout"].targets).tolist() == [1] * 10
    assert len(datamodule.splits["test"]) == 540  # the test split is never subsampled


def test_fraction_is_proportional_per_class(tmp_path):
    full = subset(["dataset.heldout_fraction=0"], tmp_path)
    part = subset(["dataset.fraction=0.1", "dataset.heldout_fraction=0"], tmp_path)
    per_class = np.bincount(full.splits["train"].targets)
    assert np.bincount(labels(part)).tolist() == np.maximum(1, np.round(0.1 * per_class)).tolist()


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_the_subset_depends_on_subset_seed_only(tmp_path):
    base = ["dataset.shots=5", "dataset.heldout_fraction=0.2"]
    first = chosen(subset([*base, "seed=0"], tmp_path))
    assert np.array_equal(first, chosen(subset([*base, "seed=0"], tmp_path)))
    assert not np.array_equal(first, chosen(subset([*base, "seed=1"], tmp_path)))  # default: seed
    held = chosen(subset([*base, "seed=1", "dataset.subset_seed=0"], tmp_path))
    assert np.array_equal(first, held)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_impossible_subsets_are_refused_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="dataset.shots=500, but class 0 .* has only"):
        subset(["dataset.shots=500"], tmp_path)
    with pytest.raises(DataError, match="of class 0's 1 low-shot images leaves none to train on"):
        subset(["dataset.shots=1"], tmp_path)
    with pytest.raises(ConfigError, match="both choose a low-shot subset"):
        subset(["dataset.shots=1", "dataset.fraction=0.1"], tmp_path)


def test_a_low_shot_subset_is_not_trained_on_more_classes_than_it_holds(tmp_path):
    """Each shot is drawn from the classes present: the declared extra ones stay empty."""
    with pytest.raises(DataError, match=r"no image of class\(es\) 10, 11 .*num_classes=10"):
        subset(["dataset.shots=2", "dataset.num_classes=12"], tmp_path)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_probe_and_knn_share_the_subset_and_list_it(tmp_path):
    low_shot = ["dataset=digits", "dataset.shots=4", "dataset.heldout_fraction=0.25"]
    run_task(compose_config([*FAST, *low_shot, "aggregator=mean"], tmp_path / "probe"))
    run_task(compose_config([*FAST, *low_shot, "task=knn", "knn.k=[3]"], tmp_path / "knn"))
    listings = [(tmp_path / r / "run" / "subset.txt").read_text() for r in ("probe", "knn")]
    assert listings[0] == listings[1]
    rows = [line.split("\t") for line in listings[0].splitlines()[1:]]
    assert len(rows) == 40 and {split for split, *_ in rows} == {"train", "heldout"}


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_low_shot_runs_show_their_shots_in_the_run_name():
    from mim_agg.runs.identity import run_name

    choices = {"backbone": "vit_tiny", "aggregator": "cls", "dataset": "digits"}
    names = {
        extra: run_name(compose_config(["dataset=digits", *extra]), choices)
        for extra in [(), ("dataset.shots=5",), ("dataset.fraction=0.1",)]
    }
    assert names[()].startswith("probe-vit_tiny-cls-digits-") and "shot" not in names[()]
    assert names[("dataset.shots=5",)].startswith("probe-vit_tiny-cls-digits-5shot-")
    assert names[("dataset.fraction=0.1",)].startswith("probe-vit_tiny-cls-digits-frac0.1-")
