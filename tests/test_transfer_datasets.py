"""Every transfer set reads a tiny fake copy laid out exactly as torchvision expects it (built by
tests/fake_datasets.py from torchvision's own readers), with its official splits."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets as tv

from mim_agg.builders import build_datamodule
from mim_agg.cli import CONFIG_DIR
from mim_agg.data import TRANSFER
from mim_agg.data.sources import DataError
from mim_agg.data.torchvision_private import pet_files
from mim_agg.data.transfer import files
from tests.fake_datasets import fake_checksums, make_fake
from tests.helpers import FAST, compose_config

OFFICIAL_CLASSES = {
    "flowers102": 102,
    "food101": 101,
    "oxford_pets": 37,
    "stanford_cars": 196,
    "fgvc_aircraft": 100,
    "dtd": 47,
    "sun397": 397,
    "country211": 211,
    "places365": 365,
    "inaturalist": 10000,
}


@pytest.fixture(autouse=True)
def _fake_checksums():
    with fake_checksums():
        yield


def test_every_transfer_set_has_a_config_with_its_official_class_count():
    assert set(TRANSFER) == set(OFFICIAL_CLASSES)
    for name, classes in OFFICIAL_CLASSES.items():
        assert OmegaConf.load(CONFIG_DIR / "dataset" / f"{name}.yaml").num_classes == classes


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", sorted(OFFICIAL_CLASSES))
def test_a_fake_copy_in_torchvisions_layout_gives_both_splits(name, tmp_path):
    info = make_fake(name, tmp_path / name)
    overrides = [f"dataset={name}", f"dataset.root={tmp_path / name}", "dataset.num_workers=0"]
    overrides += ["dataset.num_classes=null", "dataset.heldout_fraction=0"]  # the fake's classes
    datamodule = build_datamodule(compose_config([*FAST, *overrides], tmp_path))
    datamodule.setup()
    splits = datamodule.splits
    assert (len(splits["train"]), len(splits["test"])) == (info.train, info.test)
    assert set(splits["test"].targets) <= set(splits["train"].targets)
    image, label = splits["test"][0]
    assert image.shape == (3, 32, 32) and 0 <= label < datamodule.num_classes


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("name", ["flowers102", "sun397", "inaturalist"])
def test_a_missing_set_names_the_dataset_and_its_root(name, tmp_path):
    overrides = [f"dataset={name}", f"dataset.root={tmp_path / 'nowhere'}"]
    datamodule = build_datamodule(compose_config([*FAST, *overrides], tmp_path))
    with pytest.raises(DataError, match=rf"dataset={name} was not found under dataset.root="):
        datamodule.setup()


def test_sun397_without_its_partition_files_says_where_they_go(tmp_path):
    make_fake("sun397", tmp_path / "sun")
    (tmp_path / "sun" / "SUN397" / "Testing_01.txt").unlink()
    overrides = ["dataset=sun397", f"dataset.root={tmp_path / 'sun'}", "dataset.num_classes=null"]
    datamodule = build_datamodule(compose_config([*FAST, *overrides], tmp_path))
    with pytest.raises(DataError, match="Testing_01.txt is missing"):
        datamodule.setup()


# name -> (the class, its constructor's split arguments) of every set read with loader=str
LOADED_BY_PATH = {
    "flowers102": (tv.Flowers102, {"split": "test"}),
    "food101": (tv.Food101, {"split": "test"}),
    "stanford_cars": (tv.StanfordCars, {"split": "test"}),
    "fgvc_aircraft": (tv.FGVCAircraft, {"split": "test", "annotation_level": "variant"}),
    "dtd": (tv.DTD, {"split": "test", "partition": 1}),
    "sun397": (tv.SUN397, {}),
}


@pytest.mark.parametrize("name", sorted(LOADED_BY_PATH))
def test_loader_str_gives_each_items_file_and_label(name, tmp_path):
    """``files`` reads torchvision's public ``__getitem__`` with ``loader=str``: the files and
    labels are those of the decoded items, in the same order."""
    make_fake(name, tmp_path)
    cls, kwargs = LOADED_BY_PATH[name]
    listed = files(cls(tmp_path, loader=str, **kwargs))
    decoded = cls(tmp_path, loader=lambda path: (path, Image.open(path).size), **kwargs)
    assert listed == [(str(path), label) for (path, _), label in decoded]


def test_the_torchvision_private_reach_in_still_holds(tmp_path):
    """``pet_files`` reads OxfordIIITPet's private ``_images`` / ``_labels``: an upgrade that
    renames them, reorders them or adds a public way fails here, not in a user's run."""
    make_fake("oxford_pets", tmp_path)
    pets = tv.OxfordIIITPet(tmp_path, split="test", target_types="category")
    assert "loader" not in inspect.signature(tv.OxfordIIITPet).parameters, (
        "OxfordIIITPet takes a loader now: read it with files() like the other sets"
    )
    listed = pet_files(pets)
    assert [label for _, label in listed] == [pets[i][1] for i in range(len(pets))]
    assert all(Path(path).is_file() for path, _ in listed) and len(listed) == len(pets)
