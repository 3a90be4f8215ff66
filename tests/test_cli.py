"""The command line as users type it, in subprocesses."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import FAST, PROJECT_ROOT


def run_cli(*args: str, root) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MIM_AGG_ROOT": str(root),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "2",
    }
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "run.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )


def test_help_lists_groups_and_options(tmp_path):
    result = run_cli("--help", root=tmp_path)
    assert result.returncode == 0, result.stderr
    for expected in ("backbone: ", "aggregator: ", "abmilp", "topk_attn", "mae_vitb", "digits"):
        assert expected in result.stdout


def test_cfg_job_shows_the_composed_config(tmp_path):
    result = run_cli("--cfg", "job", "aggregator=topk_attn", "backbone=mae_vitb", root=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "name: topk_attn" in result.stdout and "weights: vit_base_patch16_224.mae" in result.stdout
    )


def test_unknown_option_fails_with_hydras_message(tmp_path):
    result = run_cli("aggregator=nope", root=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'aggregator/nope'" in result.stderr and "abmilp" in result.stderr


def test_missing_dataset_folder_fails_before_training(tmp_path):
    result = run_cli(
        *FAST,
        "dataset=image_folder",
        f"dataset.root={tmp_path}/none",
        "dataset.num_classes=3",
        root=tmp_path,
    )
    assert result.returncode != 0
    assert "has no train/ folder" in result.stderr


@pytest.mark.slow
def test_quickstart(tmp_path):
    result = run_cli("experiment=quickstart", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "outputs").glob("*/runs/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test/acc1"] > 0.4  # 10 classes: chance is 0.1
    assert "test acc1" in result.stdout  # the result table


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_folder(tmp_path):
    result = run_cli("-m", *FAST, "probe.epochs=1", "aggregator=cls,mean", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = sorted((tmp_path / "outputs" / "multirun").glob("*/*/metrics.json"))
    assert [m.parent.name.split("_", 1)[0] for m in metrics] == ["0", "1"]
    winners = [json.loads(m.read_text())["winner"] for m in metrics]
    assert winners == ["cls", "mean"]
    sweep = metrics[0].parent.parent
    collected = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "collect_results.py"), str(sweep)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert collected.returncode == 0, collected.stderr
    assert len((sweep / "results.csv").read_text().splitlines()) == 3  # header + 2 heads
