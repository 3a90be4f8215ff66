"""Bad input found while running, not at composition: one message naming the file or key and
the fix, exit status 2, never a traceback."""

from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf
from PIL import Image

from mim_agg.cli import check_root_keys, composition_message
from mim_agg.errors import ConfigError
from mim_agg.runs.runner import run_task
from mim_agg.validation import check_declared, check_ranges
from tests.helpers import CONFIG_DIR, FAST, compose_config, run_cli


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


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["dataset=image_folder", "dataset.rooot=/data"],
            "Could not override 'dataset.rooot'. Key 'rooot' not in 'DatasetConfig'. "
            "Did you mean dataset.root? The choices of dataset: augment, decode,",
        ),
        (["seeed=1"], "Did you mean seed? The choices of the config: aggregator, analysis,"),
        (
            ["aggregator=abmilp", "aggregator.dept=2"],
            "Did you mean aggregator.depth? The choices of aggregator: activation, depth,",
        ),
        (
            ["probe.epochs=ten"],
            "Error merging override probe.epochs=ten. Value 'ten' of type 'str' could not be "
            "converted to Integer.",
        ),
    ],
)
def test_a_command_line_hydra_cannot_compose_is_one_message(overrides, expected, tmp_path):
    with pytest.raises(CompactHydraException) as refused:
        compose_config(overrides, tmp_path)
    message = composition_message(refused.value)
    assert expected in message and "\n" not in message
    assert "+" not in message  # never Hydra's advice to add the key: nothing would read it


def test_a_key_added_with_a_plus_to_a_group_with_a_schema_is_refused(tmp_path):
    cfg = compose_config([*FAST, "+probe.blrs_=[0.1]"], tmp_path)
    refusal = r"^probe.blrs_ is no option of probe: .* Did you mean probe.blrs\? The options of"
    with pytest.raises(ConfigError, match=refusal):
        run_task(cfg)
    head = compose_config([*FAST, "+aggregator@heads.abmilp=abmilp", "+heads.abmilp.dept=2"])
    with pytest.raises(ConfigError, match=r"^heads.abmilp.dept is no option of heads.abmilp"):
        check_declared(head)
    free = [
        "+backbone.arch_kwargs.depth=1",
        "+callbacks.lr._target_=x.Y",
        "+aggregator@heads.m=max",
    ]
    check_declared(compose_config([*FAST, *free], tmp_path))  # free-form dicts take any key


@pytest.mark.parametrize(
    "override",
    [
        "probe.blr=inf", "probe.blrs=[0.1,nan]", "probe.wds=[0,inf]", "probe.weight_decay=nan",
        "logreg.c_max=inf", "logreg.c_min=nan", "logreg.tol=inf", "knn.temperatures=[inf]",
        "evaluate.batch_size=0",
    ],
)  # fmt: skip
def test_a_non_finite_rate_decay_or_tolerance_is_refused_before_anything_runs(override, tmp_path):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* is invalid: it must be "):
        check_ranges(compose_config([*FAST, override], tmp_path))


def test_an_effective_batch_that_is_no_multiple_of_the_batch_is_refused(tmp_path):
    cfg = compose_config([*FAST, "probe.effective_batch=24"], tmp_path)  # batch 16
    with pytest.raises(ConfigError, match=r"probe.effective_batch=24 is invalid: .*multiple of"):
        run_task(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder


@pytest.mark.parametrize(
    "preset",
    [f"{group}={path.stem}" for group in ("experiment", "debug")
     for path in sorted((CONFIG_DIR / group).glob("*.yaml"))],
)  # fmt: skip
def test_a_key_added_with_a_plus_at_the_top_is_refused_and_no_preset_adds_one(preset):
    """``+sed=1`` (for ``seed=1``) is refused naming ``seed``; what the shipped presets and a
    ``+group@package`` head put at the top of the config is known there."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", [preset, "+aggregator@heads.x=cls"], return_hydra_config=True)
        typo = compose("config", [preset, "+sed=1"], return_hydra_config=True)
    check_root_keys(cfg, cfg.hydra.runtime.choices)
    with pytest.raises(ConfigError, match="sed is no option: a '\\+' .* Did you mean seed\\?"):
        check_root_keys(typo, typo.hydra.runtime.choices)


@pytest.mark.parametrize("seed", ["abc", "1.5"])
def test_a_seed_that_is_no_integer_is_refused_by_name(seed, tmp_path):
    """The root has no schema: without this, ``seed=abc`` surfaced as OmegaConf's traceback
    wherever ``${seed}`` was first resolved (``dataset.subset_seed``), exit 1."""
    with pytest.raises(ConfigError, match=f"seed={seed} is invalid: it must be an integer"):
        run_task(compose_config([*FAST, f"seed={seed}"], tmp_path))
