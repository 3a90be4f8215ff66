"""Bad numbers never become results: diverged heads, non-finite features, strict files."""

from __future__ import annotations

import csv
import json
import math

import pytest
from safetensors.torch import save_file

from mim_agg.cache import extract
from mim_agg.errors import UserError
from mim_agg.runs.runner import run_task
from mim_agg.utils.files import write_atomic, write_json
from tests.helpers import FAST, compose_config


def test_a_diverged_head_is_reported_and_never_wins(tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean", "probe.blrs=[1.0,1e38]"], tmp_path)
    summary = run_task(cfg)
    assert summary["winner"] == "mean_blr1"
    diverged = summary["heads"]["mean_blr1e+38"]
    assert diverged["diverged_at_step"] is not None and diverged["test/acc1"] is None
    text = (tmp_path / "run" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    with open(tmp_path / "run" / "heads.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert (
        rows["mean_blr1e+38"]["diverged_at_step"] != "" and rows["mean_blr1e+38"]["test/acc1"] == ""
    )
    assert rows["mean_blr1"]["diverged_at_step"] == ""


def test_every_head_diverging_fails_the_run_with_rates_to_try(tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean", "probe.blr=1e38"], tmp_path)
    with pytest.raises(UserError, match=r"Every head diverged .* \[1e\+38\]; try smaller ones"):
        run_task(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and not (tmp_path / "run" / "metrics.json").exists()


def test_non_finite_normalisation_is_refused_before_anything_runs(tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean", "backbone.mean=[nan,nan,nan]"], tmp_path)
    with pytest.raises(UserError, match=r"backbone.mean=\[nan, nan, nan\] is invalid"):
        run_task(cfg)
    cfg = compose_config([*FAST, "aggregator=mean", "backbone.std=[1,0,1]"], tmp_path)
    with pytest.raises(UserError, match=r"backbone.std=\[1.0, 0.0, 1.0\] is invalid"):
        run_task(cfg)


@pytest.fixture
def nan_weights(tmp_path, tiny_state_dict):
    """The tiny ViT's weights with three NaNs in one MLP, as a damaged file would hold them."""
    tiny_state_dict["blocks.5.mlp.fc1.weight"][0, :3] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file(tiny_state_dict, str(path))
    return path


def test_a_weights_file_holding_nans_is_refused_as_it_loads(nan_weights, tmp_path):
    """NaNs in a weights file are refused before anything runs: some never reach the tokens
    (an attention kernel can absorb them), and a number computed from a broken file is none."""
    overrides = [*FAST, "task=knn", "knn.k=[5]", f"backbone.weights={nan_weights}"]
    with pytest.raises(UserError, match=r"weights in .*nan\.safetensors' are non-finite"):
        run_task(compose_config(overrides, tmp_path))


@pytest.fixture
def overflowing_weights(tmp_path, tiny_state_dict) -> str:
    """Finite weights whose tokens are not: one MLP scaled past float32's range."""
    tiny_state_dict["blocks.5.mlp.fc2.weight"] *= 1e37
    path = tmp_path / "overflow.safetensors"
    save_file(tiny_state_dict, str(path))
    return f"backbone.weights={path}"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("task", ["probe", "knn", "extract", "analyze"])
def test_nan_tokens_give_no_number_and_no_cache_in_any_task(task, overflowing_weights, tmp_path):
    overrides = [*FAST, f"task={task}", "aggregator=mean", overflowing_weights]
    overrides += ["knn.k=[5]", "analysis.num_images=8", "analysis.batch_size=8"]
    with pytest.raises(UserError, match=r"non-finite \(NaN or inf\).*backbone.weights"):
        run_task(compose_config(overrides, tmp_path))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no NaN shard written
    for result in ("metrics.json", "attention_stats.json"):
        assert not (tmp_path / "run" / result).exists()


@pytest.mark.parametrize(
    "task,setting,features",
    [("knn", "knn.k=[5]", "k-NN"), ("logreg", "logreg.c_steps=1", "logreg")],
)
def test_the_nan_features_of_a_cache_filled_before_that_was_checked_are_refused(
    task, setting, features, overflowing_weights, tmp_path, monkeypatch
):
    """Caches filled before extraction refused NaN tokens may hold them: k-NN and logistic
    regression read them as features and refuse."""
    monkeypatch.setattr(extract, "require_finite", lambda *args, **kwargs: None)
    overrides = [*FAST, f"task={task}", setting, "aggregator=mean", overflowing_weights]
    with pytest.raises(UserError, match=rf"{features} features of head 'mean'.*non-finite"):
        run_task(compose_config(overrides, tmp_path))
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # the NaN cache was read


def test_result_files_are_strict_and_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"acc": math.nan, "nested": [math.inf, 1.0]})
    assert json.loads(path.read_text()) == {"acc": None, "nested": [None, 1.0]}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "x" * 1000)
    assert json.loads(path.read_text()) == {"acc": None, "nested": [None, 1.0]}  # intact
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(
    "override,message",
    [
        ("probe.epochs=0", "probe.epochs=0 is invalid: it must be an integer >= 1"),
        (
            "probe.warmup_epochs=5",
            "probe.warmup_epochs=5.0 is invalid: it must be in [0, probe.epochs=2]",
        ),
        ("probe.batch_size=0", "probe.batch_size=0 is invalid"),
        ("probe.blr=-0.1", "probe.blr=-0.1 is invalid: it must be finite and > 0"),
        ("probe.blrs=[0.1,0]", "probe.blrs=[0.1, 0.0] is invalid"),
        ("probe.momentum=1.5", "probe.momentum=1.5 is invalid: it must be in [0, 1)"),
        ("dataset.heldout_fraction=1.0", "dataset.heldout_fraction=1.0 is invalid"),
        (
            "backbone.img_size=40",
            "backbone.img_size=40 is no multiple of vit_tiny_patch16_224's patch size 16",
        ),
    ],
)
def test_values_out_of_range_fail_before_training(override, message, tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean", override], tmp_path)
    with pytest.raises(UserError) as error:
        run_task(cfg)
    assert message in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_backbone_requirements_are_checked_before_any_download(tmp_path):
    """I-JEPA ViT-H has no [cls]: refused by the architecture alone (offline, nothing cached)."""
    cfg = compose_config(["backbone=ijepa_vith", "aggregator=cls", "dataset=synthetic"], tmp_path)
    with pytest.raises(UserError, match=r"reads the \[cls\] token, but this backbone has none"):
        run_task(cfg)


def test_an_uncached_timm_tag_offline_says_how_to_go_on(tmp_path):
    cfg = compose_config(
        ["backbone=dino_vits", "backbone.img_size=32", "aggregator=mean", "dataset=synthetic"],
        tmp_path,
    )
    with pytest.raises(UserError) as error:
        run_task(cfg)
    message = str(error.value)
    assert "backbone.weights='vit_small_patch16_224.dino'" in message
    assert "hub is unreachable" in message and "backbone.weights=/path/to" in message
