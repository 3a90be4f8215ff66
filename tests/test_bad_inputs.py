"""Bad input found while running, not at composition: one message naming the file or key and
the fix, exit status 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from mim_agg.errors import ConfigError
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, compose_config, run_cli


def jpeg_folder(root, per_class: int = 4):
    """``root/{train,val}/{a,b}/<k>.jpg``: small real JPEGs, two classes."""
    for split in ("train", "val"):
        for index, name in enumerate("ab"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                colour = (index * 200, k * 40, 60)
                Image.new("RGB", (24, 24), colour).save(folder / f"{k}.jpg", quality=90)


@pytest.mark.slow
def test_a_truncated_jpeg_read_by_a_loader_worker_is_one_message(tmp_path):
    images = tmp_path / "images"
    jpeg_folder(images)
    broken = images / "train" / "b" / "2.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    result = run_cli(
        *FAST,
        "dataset=image_folder",
        f"dataset.root={images}",
        "dataset.num_workers=1",
        "dataset.heldout_fraction=0",
        root=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert f"Cannot read image {str(broken)!r}" in message
    assert "dataset.verify=true" in message and "worker" not in message
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("task", ["probe", "extract"])
def test_a_mandatory_key_left_unset_is_refused_by_name(task, tmp_path):
    cfg = compose_config([*FAST, "dataset=image_folder", f"task={task}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^dataset.root has no value, and task=.* set it on"):
        run_task(cfg)


def test_a_mandatory_key_of_one_task_is_no_concern_of_another(tmp_path):
    with pytest.raises(ConfigError, match=r"^evaluate.run has no value, and task=evaluate needs"):
        run_task(compose_config([*FAST, "task=evaluate"], tmp_path))
    assert OmegaConf.is_missing(compose_config([*FAST, "task=extract"], tmp_path).evaluate, "run")
    assert run_task(compose_config([*FAST, "task=extract"], tmp_path))["complete"]


def test_an_effective_batch_that_is_no_multiple_of_the_batch_is_refused(tmp_path):
    cfg = compose_config([*FAST, "probe.effective_batch=24"], tmp_path)  # batch 16
    with pytest.raises(ConfigError, match=r"probe.effective_batch=24 is invalid: .*multiple of"):
        run_task(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder
