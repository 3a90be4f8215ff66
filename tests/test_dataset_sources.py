"""Dataset sources own their options: each source's schema is the shared one plus its builder's
keyword-only arguments, so an option of another source fails at composition, as a typo does;
and a new source is one builder, its YAML and a test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from mim_agg.builders import build_datamodule
from mim_agg.cli import CONFIG_DIR
from mim_agg.config import DatasetConfig, dataset_schema, register_datasets
from mim_agg.data import SOURCES, source_options, sources
from mim_agg.data.sources import ArrayImages, DataError
from mim_agg.errors import ConfigError
from tests.helpers import FAST, compose_config

DATASETS = sorted(path.stem for path in (CONFIG_DIR / "dataset").glob("*.yaml"))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset=cifar10", "dataset.per_class=[5,5]"], "Key 'per_class' not in 'DatasetConfig'"),
        (["dataset=digits", "dataset.root=/x"], "Key 'root' not in 'DatasetConfig'"),
        (["dataset=synthetic", "dataset.split_file=x"], "Key 'split_file' not in"),
        (["dataset=imagenet", "dataset.download=true"], "Key 'download' not in"),
        (["dataset=imagenet", "dataset.shot=5"], "Key 'shot' not in 'DatasetConfig'"),
        (
            ["dataset=digits", "dataset.test_fraction=null"],
            "field 'dataset.test_fraction' is not Optional",
        ),
    ],
)
def test_an_option_of_another_source_fails_at_composition_as_a_typo_does(overrides, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(overrides)
    assert message in str(error.value) + str(error.value.__cause__)
    assert "full_key: dataset." in str(error.value.__cause__)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", DATASETS)
def test_each_dataset_composes_its_sources_schema_and_says_only_what_differs(name, tmp_path):
    """The keys are the shared ones and the source's own, no other source's; a YAML repeats no
    default of its schema (every default lives in the signatures)."""
    schema = dataset_schema(name)
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml"))
    assert values.pop("defaults") == [f"/schema/dataset/{name}@_here_", "_self_"]
    assert not [k for k, v in values.items() if v == defaults[k]], f"{name} repeats a default"
    cfg = compose_config([f"dataset={name}"], tmp_path).dataset
    shared = {f.name for f in dataclasses.fields(DatasetConfig)}
    assert set(cfg) == shared | set(source_options(name)) and cfg.name == name


def test_the_keys_users_write_reach_the_source_and_the_splits(tmp_path):
    """``dataset.root`` / ``split_file`` (relative: from dataset.root), ``shots``,
    ``heldout_fraction`` as before; no key of another source is left in the config."""
    split_file = listing(tmp_path / "lists", {"train": [0, 1] * 6, "val": [0, 1]})
    overrides = [
        "dataset=image_folder",
        f"dataset.root={tmp_path}",
        'dataset.split_file="lists/{split}.txt"',  # braces: quoted
        "dataset.shots=5",
        "dataset.heldout_fraction=0.2",
    ]
    cfg = compose_config([*FAST, *overrides], tmp_path)
    assert "per_class" not in cfg.dataset and "test_fraction" not in cfg.dataset
    datamodule = build_datamodule(cfg)
    assert datamodule.source.options["split_file"] == "lists/{split}.txt" != split_file
    datamodule.setup()
    assert datamodule.num_classes == 2 and len(datamodule.splits["heldout"]) == 2
    assert len(datamodule.splits["train"]) == 8 and len(datamodule.splits["test"]) == 2


def listing(folder, labels: dict[str, list[int]]) -> str:
    """``folder/{split}.txt`` of small PNGs in ``folder/pictures``, paths relative to the
    folder's parent (the dataset root)."""
    for split, split_labels in labels.items():
        lines = []
        for index, label in enumerate(split_labels):
            path = folder / "pictures" / f"{split}-{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (label * 90, index, 0)).save(path)
            lines.append(f"{folder.name}/pictures/{path.name} {label}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "{split}.txt")


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize(
    "split_file,error,message",
    [
        ("''", ConfigError, "dataset.split_file is empty: it names one file per split"),
        ("lists/train.txt", ConfigError, "='lists/train.txt' lacks {split}"),
        ('"lists/{split}.txt"', DataError, "lists/train.txt lists no images \\(the train split"),
        (
            '"gone/{split}.txt"',
            DataError,
            "gone/train.txt does not exist .*taken from dataset.root",
        ),
    ],
)
def test_a_split_file_that_lists_nothing_is_refused_naming_the_key(
    tmp_path, split_file, error, message
):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("\n")
    overrides = ["dataset=image_folder", f"dataset.root={tmp_path}"]
    cfg = compose_config([*FAST, *overrides, f"dataset.split_file={split_file}"], tmp_path)
    with pytest.raises(error, match=message):
        build_datamodule(cfg).setup()


def test_synthetic_images_need_a_class_count(tmp_path):
    cfg = compose_config([*FAST, "dataset.num_classes=null"], tmp_path)
    with pytest.raises(ConfigError, match="dataset=synthetic makes dataset.num_classes classes"):
        build_datamodule(cfg).setup()


def test_a_new_source_is_one_builder_and_its_yaml(monkeypatch, tmp_path):
    """What a new source costs: a registered builder (here a function; in the project a module
    of ``mim_agg/data/``), a YAML naming its schema, and this test."""

    def stripes(num_classes, seed, *, width: int = 2):
        """Images of vertical stripes ``width`` pixels wide, a grey level per class."""
        labels = np.arange(12 * num_classes) % num_classes
        images = np.zeros((len(labels), 8, 8), dtype=np.uint8)
        images[:, :, ::width] = (labels * 60)[:, None, None]
        return ArrayImages(images, labels), ArrayImages(images, labels)

    monkeypatch.setitem(SOURCES, "stripes", sources.source("stripes")(stripes))
    register_datasets(ConfigStore.instance())
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "stripes.yaml").write_text(
        "defaults:\n  - /schema/dataset/stripes@_here_\n  - _self_\nnum_classes: 3\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose_config([*FAST, search, "dataset=stripes", "dataset.width=4"], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert datamodule.source.options == {"width": 4} and datamodule.num_classes == 3
    with pytest.raises(ConfigCompositionException):
        compose_config([*FAST, search, "dataset=stripes", "dataset.per_class=[1,1]"], tmp_path)
