"""End to end, in process: real timm model, real Lightning training, real files."""

import csv
import json

import pytest
import torch
from lightning import Trainer

from mim_agg.builders import build_datamodule, build_probe
from mim_agg.runs.folder import RunFolderError
from mim_agg.runs.runner import run_task as run
from tests.helpers import FAST, compose_config


def read_csv_log(output_dir, attempt=0):
    with open(output_dir / "csv" / f"version_{attempt}" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("probe")
    cfg = compose_config([*FAST, "aggregator=abmilp", "probe.epochs=4"], tmp_path)
    return cfg, run(cfg), tmp_path / "run"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_run_writes_sane_metrics(finished_run):
    cfg, summary, output_dir = finished_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    for key in ("test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test/acc1"] > 0.5  # 4 classes: chance is 0.25
    assert 0 <= metrics["best_epoch"] < 4
    assert metrics["trainable_params"] == (192 + 1) + (192 * 4 + 4)  # scorer + linear (BN has none)
    assert metrics["backbone_images_per_s"] > 0 and metrics["train_images_per_s"] > 0
    assert metrics["wall_time_s"] > 0 and metrics["winner"] == "abmilp"
    assert (output_dir / "config.yaml").is_file()
    assert (output_dir / "checkpoints" / "last.ckpt").is_file()


def test_best_epoch_is_chosen_on_heldout_never_on_test(finished_run):
    _, summary, output_dir = finished_run
    rows = [r for r in read_csv_log(output_dir) if r.get("val/abmilp/acc1")]
    heldout = [float(r["val/abmilp/acc1"]) for r in rows]
    assert len(heldout) == 4
    assert summary["best_epoch"] == heldout.index(max(heldout))
    assert summary["val/acc1_best"] == pytest.approx(max(heldout))


def test_checkpoint_holds_heads_not_the_frozen_backbone(finished_run):
    _, _, output_dir = finished_run
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert keys and all(k.startswith("heads.") for k in keys)
    assert checkpoint["head_selection"]["abmilp"]["epoch"] >= 0


def test_a_finished_run_is_not_recomputed(finished_run):
    cfg, first, output_dir = finished_run
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    before = checkpoint.stat().st_mtime_ns
    again = run(cfg)
    assert again == json.loads(json.dumps(first))
    assert checkpoint.stat().st_mtime_ns == before  # nothing trained
    assert not (output_dir / "csv" / "version_1").exists()
    record = json.loads((output_dir / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["done"]


def test_another_config_never_resumes_this_runs_checkpoint(finished_run):
    cfg, _, output_dir = finished_run
    files = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    changed = cfg.copy()
    changed.probe.blr = 0.01
    changed.probe.epochs = 5
    with pytest.raises(RunFolderError, match=r"differing: probe\.blr, probe\.epochs, "):
        run(changed)
    assert {p: p.read_bytes() for p in files} == files  # left untouched
    assert sorted(files) == sorted(
        p for p in output_dir.rglob("*") if p.is_file() and p.name != ".lock"
    )


def test_backbone_stays_frozen_through_fit(tmp_path):
    cfg = compose_config([*FAST, "aggregator=mean"], tmp_path)
    model = build_probe(cfg)
    before = {k: v.clone() for k, v in model.source.backbone.state_dict().items()}
    trainer = Trainer(
        max_epochs=cfg.probe.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=build_datamodule(cfg))
    backbone = model.source.backbone
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert model.heads.training  # Lightning's switch still reaches the heads
    for key, value in model.source.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key])
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(1.0 * 16 / 256)  # blr x batch / 256
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at zero


def test_attention_aggregator_and_no_heldout_split(tmp_path):
    cfg = compose_config(
        [*FAST, "aggregator=topk_attn", "aggregator.k=2", "dataset.heldout_fraction=0"], tmp_path
    )
    summary = run(cfg)
    assert summary["val/acc1_best"] is None and summary["best_epoch"] is None
    assert summary["test/acc1"] == summary["test/acc1_last"]  # nothing held out: last epoch


def test_callbacks_lr_monitor_logs_each_heads_learning_rate_by_name(tmp_path):
    overrides = ["callbacks=lr_monitor", "+aggregator@heads.mean=mean", "probe.epochs=1"]
    cfg = compose_config([*FAST, *overrides], tmp_path)
    run(cfg)
    columns = read_csv_log(tmp_path / "run")[0].keys()
    assert {"lr-SGD/cls", "lr-SGD/mean"} <= set(columns)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_scoring_test_each_epoch_adds_the_best_epoch_figure_and_changes_nothing_else(
    finished_run, tmp_path
):
    cfg, summary, _ = finished_run
    tracked = compose_config(
        [*FAST, "aggregator=abmilp", "probe.epochs=4", "probe.test_each_epoch=true"], tmp_path
    )
    result = run(tracked)
    scores = [float(r["test_epoch/abmilp/acc1"]) for r in read_csv_log(tmp_path / "run")
              if r.get("test_epoch/abmilp/acc1")]  # fmt: skip
    assert len(scores) == 4  # one per epoch, none from the sanity check
    assert result["test/acc1_best_epoch"] == pytest.approx(max(scores))
    assert result["best_test_epoch"] == scores.index(max(scores))
    assert scores[-1] == pytest.approx(result["test/acc1_last"])  # the last epoch's weights
    for key in ("test/acc1", "test/acc1_last", "val/acc1_best", "best_epoch"):
        assert result[key] == summary[key], key  # the same run, the same choice
    assert "test/acc1_best_epoch" not in summary  # only when asked for
