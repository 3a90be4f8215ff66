"""k-NN: the streamed top-k and DINO's weighted vote equal scikit-learn's neighbour search with
the same weighting, and the task's accuracy equals that computation on the cached features."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors as SklearnNeighbours

from mim_agg.cache import TokenCache
from mim_agg.errors import ConfigError, UserError
from mim_agg.knn import NearestNeighbours, weighted_vote
from mim_agg.runs.runner import run_task
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import read_predictions
from tests.helpers import FAST, cached_features, compose_config, run_cli
from tests.test_cache_parts import cache_files


def independent_predictions(bank, bank_labels, queries, k, temperature, num_classes):
    """scikit-learn's exact cosine neighbours, then exp(sim / T) votes, in float64 NumPy.
    Each class's vote is kept as its logarithm, log(sum exp(sim / T)) (``np.logaddexp``):
    the same argmax, and no overflow at any T (exp(1 / 0.001) overflows even float64)."""
    search = SklearnNeighbours(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank)
    distances, indices = search.kneighbors(queries.astype(np.float64))
    log_votes = np.full((len(queries), num_classes), -np.inf)
    for row, (dist, idx) in enumerate(zip(distances, indices, strict=True)):
        np.logaddexp.at(log_votes[row], bank_labels[idx], (1.0 - dist) / temperature)
    return log_votes.argmax(1)


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # the bank arrives in chunks of any size
def test_streamed_vote_equals_scikit_learn(chunk):
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=generator, dtype=torch.float64).float()
    labels = torch.randint(5, (300,), generator=generator)
    queries = torch.randn(40, 16, generator=generator)
    found = NearestNeighbours(queries, k=20, query_block=16)
    for start in range(0, len(bank), chunk):
        found.add(bank[start : start + chunk], labels[start : start + chunk])
    for k, temperature in [(1, 0.07), (10, 0.07), (20, 0.5), (10, 0.001), (20, 0.001)]:
        ours = weighted_vote(found.sims, found.labels, 5, k, temperature).argmax(1)
        expected = independent_predictions(
            bank.numpy(), labels.numpy(), queries.numpy(), k, temperature, 5
        )
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_knn_task_accuracy_equals_an_independent_computation(tmp_path):
    overrides = [*FAST, "task=knn", "aggregator=mean", "+aggregator@heads.cls=cls"]
    overrides += ["knn.k=[3,10]", "knn.temperatures=[0.07,1.0]", "cache.dtype=float32"]
    summary = run_task(compose_config(overrides, tmp_path))
    (folder,) = (tmp_path / "cache").iterdir()
    cache = TokenCache(folder)
    assert (
        cache.manifest["identity"]["views"]["train"] == 1
    )  # the centre crop, whatever augment says
    for name, key in (("mean", "mean()"), ("cls", "cls()")):
        result = summary["heads"][name]
        heldout = {}
        bank, bank_labels = cached_features(cache, "train", key)
        for k in (3, 10):
            for temperature in (0.07, 1.0):
                queries, targets = cached_features(cache, "heldout", key)
                predicted = independent_predictions(bank, bank_labels, queries, k, temperature, 4)
                heldout[(k, temperature)] = (predicted == targets).mean()
        assert result["val/acc1_best"] == pytest.approx(max(heldout.values()), abs=1e-6)
        assert heldout[(result["k"], result["temperature"])] == max(heldout.values())
        queries, targets = cached_features(cache, "test", key)
        heldout_bank, heldout_labels = cached_features(cache, "heldout", key)
        predicted = independent_predictions(  # test neighbours: among all training images
            np.concatenate([bank, heldout_bank]),
            np.concatenate([bank_labels, heldout_labels]),
            queries,
            result["k"],
            result["temperature"],
            4,
        )
        assert result["test/acc1"] == pytest.approx((predicted == targets).mean(), abs=1e-6)
        stored = read_predictions(tmp_path / "run" / PREDICTIONS)  # per test image, in order
        np.testing.assert_array_equal(stored.predicted[name], predicted)
        np.testing.assert_array_equal(stored.targets, targets)
    assert (tmp_path / "run" / "heads.csv").read_text().startswith("head,aggregator,k,temperature")


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_learned_aggregators_need_a_trained_probe_and_k_fits_the_bank(tmp_path):
    cfg = compose_config([*FAST, "task=knn", "aggregator=abmilp", "knn.k=[5]"], tmp_path)
    with pytest.raises(ConfigError, match="knn.probe_ckpt=<that run>"):
        run_task(cfg)
    cfg = compose_config([*FAST, "task=knn", "aggregator=cls", "knn.k=[10,500]"], tmp_path / "k")
    with pytest.raises(ConfigError, match=r"knn.k=\[10, 500\] asks for more neighbours"):
        run_task(cfg)


def with_probe(ckpt: Path) -> list[str]:
    return [*FAST, "task=knn", "aggregator=cls", "knn.k=[5]", f"knn.probe_ckpt={ckpt}"]


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_trained_probes_head_is_evaluated_beside_the_grid(probe_ckpt, tmp_path, caplog):
    summary = run_task(compose_config(with_probe(probe_ckpt), tmp_path))
    assert set(summary["heads"]) == {"cls", "probe_abmilp"}
    assert 0 < summary["heads"]["probe_abmilp"]["test/acc1"] <= 1
    assert "another dataset" not in caplog.text


def test_a_probe_of_another_seeds_random_backbone_is_refused(probe_ckpt, tmp_path):
    """backbone.weights=null: the seed draws the backbone, so seed=1 tokens are other tokens."""
    with pytest.raises(UserError, match=r"trained on other tokens than these \(seed: 0 vs 1"):
        run_task(compose_config([*with_probe(probe_ckpt), "seed=1"], tmp_path))


def test_a_checkpoint_copied_into_another_runs_folder_is_refused(probe_ckpt, tmp_path):
    """Checkpoints carry their run's config hash: a last.ckpt moved into another run's folder
    is not read as that run's, neither by k-NN (or logreg, analysis, evaluate) nor on resume."""
    import json

    from mim_agg.builders import build_probe

    run_dir = Path(shutil.copytree(probe_ckpt.parent.parent, tmp_path / "probe"))
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "config_hash": "0123456789"}))
    copied = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"last.ckpt' was written by another run \(config hash"):
        run_task(compose_config(with_probe(copied), tmp_path / "knn"))
    state = torch.load(probe_ckpt, map_location="cpu", weights_only=True)
    other_run = build_probe(compose_config([*FAST, "aggregator=abmilp", "seed=1"]), 4)
    with pytest.raises(UserError, match=r"^The run's checkpoints/last.ckpt was written by another"):
        other_run.on_load_checkpoint(state)


def test_a_probe_of_another_dataset_is_used_with_a_note(probe_ckpt, tmp_path, caplog):
    """A pooling trained on one dataset and applied to another is a transfer: allowed, said."""
    digits = ["dataset=digits", "dataset.shots=3", "dataset.test_fraction=0.05"]  # 30 + 90
    summary = run_task(compose_config([*with_probe(probe_ckpt), *digits], tmp_path))
    assert 0 < summary["heads"]["probe_abmilp"]["test/acc1"] <= 1
    assert "trained on another dataset (dataset.name: synthetic vs digits, classes: 4 vs 10)" in (
        caplog.text
    )


def test_a_probe_checkpoint_with_nan_pooling_weights_is_refused(probe_ckpt, tmp_path):
    run_dir = Path(shutil.copytree(probe_ckpt.parent.parent, tmp_path / "probe"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    selected = state["head_selection"]["abmilp"]["state"]
    pooling = next(v for k, v in selected.items() if k.startswith("aggregator.") and v.ndim > 1)
    pooling.view(-1)[:3] = math.nan
    torch.save(state, ckpt)
    with pytest.raises(UserError, match=r"head 'abmilp' in '.*last.ckpt' are non-finite"):
        run_task(compose_config(with_probe(ckpt), tmp_path))


def test_knn_without_heldout_needs_a_single_k_and_t(tmp_path, caplog):
    caplog.set_level("INFO", logger="mim_agg")
    overrides = [*FAST, "task=knn", "dataset.heldout_fraction=0"]
    with pytest.raises(ConfigError, match="needs held-out data"):
        run_task(compose_config(overrides, tmp_path / "grid"))
    summary = run_task(compose_config([*overrides, "knn.k=[5]"], tmp_path / "one"))
    assert summary["heads"]["cls"]["val/acc1_best"] is None and summary["heads"]["cls"]["k"] == 5
    assert "Result of cls: test acc1" in caplog.text and "chosen on held-out" not in caplog.text


@pytest.mark.slow  # two processes
def test_under_ddp_every_rank_extracts_and_rank_zero_alone_scores_what_one_process_does(
    tmp_path,
):
    """``task=knn trainer=ddp_sim``: both ranks extract their parts of every split, the cache
    is the one a single process writes, and rank zero's k-NN (the one run folder) scores as
    the same task on one process does, on the same cache."""
    overrides = [*FAST, "task=knn", "knn.k=[3,10]", "dataset.train_size=48"]
    overrides += ["dataset.test_size=16", "cache.shard_size=8", "cache.batch_size=8"]
    (tmp_path / "ddp").mkdir()
    result = run_cli(*overrides, "trainer=ddp_sim", root=tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stdout + result.stderr
    (distributed,) = (tmp_path / "ddp" / "outputs" / "runs").iterdir()

    run_task(
        compose_config([*overrides, "task=extract", "dataset.augment=false"], tmp_path / "one")
    )
    (ddp_cache,) = (tmp_path / "ddp" / "cache").iterdir()
    (one_cache,) = (tmp_path / "one" / "cache").iterdir()
    assert cache_files(ddp_cache) == cache_files(one_cache)

    run_task(compose_config(overrides, tmp_path / "one"))  # reads the one-process cache
    single = tmp_path / "one" / "run"
    assert (distributed / "heads.csv").read_text() == (single / "heads.csv").read_text()
