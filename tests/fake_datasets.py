"""Tiny on-disk fakes of the torchvision transfer datasets, for offline tests.

Each builder writes, under the root that would be given to the torchvision class, exactly the
files and folders the installed class reads (annotation files in their own formats and small
real JPEGs), so the class constructs and decodes offline. Every fake has three classes, each
present in every official split it writes, with a distinct colour per class.

``make_fake(name, root)`` builds one and returns its ``FakeInfo``: the number of classes and the
image counts of the train side (the union of two official splits where the project joins them)
and of the test side. Flowers102 and Places365 check their annotation files' MD5 sums, which
no fake can match: read them inside ``fake_checksums()``. Run this file to check every fake
against torchvision.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

NUM_CLASSES = 3
TRAIN_PER_CLASS = 3  # train side; 2 + 1 where it joins two official splits
TEST_PER_CLASS = 2
_COLOURS = [(200, 30, 30), (30, 160, 50), (40, 60, 210)]


@dataclass
class FakeInfo:
    num_classes: int
    train: int  # images on the train side (both official splits where the project joins two)
    test: int  # images in the test split


def _jpeg(path: Path, label: int, index: int = 0) -> None:
    """Write a 16x16 RGB JPEG in the colour of ``label``, a little lighter for each ``index``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(min(c + 12 * index, 255) for c in _COLOURS[label % len(_COLOURS)])
    Image.new("RGB", (16, 16), colour).save(path, format="JPEG")


def _splits(*train_side: str, test: str) -> dict[str, int]:
    """Images per class of each official split: ``train_side`` shares TRAIN_PER_CLASS."""
    if len(train_side) == 1:
        return {train_side[0]: TRAIN_PER_CLASS, test: TEST_PER_CLASS}
    first, second = train_side
    return {first: TRAIN_PER_CLASS - 1, second: 1, test: TEST_PER_CLASS}


def _info(classes: int = NUM_CLASSES) -> FakeInfo:
    return FakeInfo(classes, classes * TRAIN_PER_CLASS, classes * TEST_PER_CLASS)


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def flowers102(root: Path) -> FakeInfo:
    """torchvision.datasets.Flowers102 reads ``flowers-102/imagelabels.mat`` (``labels``: the
    1-based class of image id i at position i-1), ``flowers-102/setid.mat`` (``trnid``, ``valid``,
    ``tstid``: 1-based image ids) and ``flowers-102/jpg/image_{id:05d}.jpg``. Its 102 classes
    are fixed, so every one gets images (a class without any would be refused)."""
    from scipy.io import savemat

    base = root / "flowers-102"
    labels: list[int] = []
    set_ids: dict[str, list[int]] = {}
    for key, per_class in _splits("trnid", "valid", test="tstid").items():
        set_ids[key] = []
        for label in range(102):
            for k in range(per_class):
                labels.append(label + 1)
                image_id = len(labels)
                set_ids[key].append(image_id)
                _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", label, k)
    # 1-D arrays are saved as 1xN rows; loadmat(squeeze_me=True) gives them back as 1-D arrays
    # (each list has several ids: a single one would squeeze to a scalar).
    savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in set_ids.items()})
    return _info(102)


def food101(root: Path) -> FakeInfo:
    """torchvision.datasets.Food101 reads ``food-101/meta/{train,test}.json`` (class name ->
    ["class/image_id", ...]; classes are the sorted keys) and
    ``food-101/images/<class>/<image_id>.jpg``. The official ``classes.txt``, ``labels.txt`` and
    ``{train,test}.txt`` beside them are written too."""
    base = root / "food-101"
    names = ["apple_pie", "baby_back_ribs", "baklava"]
    image_id = 1000000
    for split, per_class in _splits("train", test="test").items():
        meta: dict[str, list[str]] = {name: [] for name in names}
        for label, name in enumerate(names):
            for k in range(per_class):
                image_id += 1
                meta[name].append(f"{name}/{image_id}")
                _jpeg(base / "images" / name / f"{image_id}.jpg", label, k)
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        _lines(base / "meta" / f"{split}.txt", [rel for rels in meta.values() for rel in rels])
    _lines(base / "meta" / "classes.txt", names)
    _lines(base / "meta" / "labels.txt", [name.replace("_", " ").capitalize() for name in names])
    return _info()


def oxford_pets(root: Path) -> FakeInfo:
    """torchvision.datasets.OxfordIIITPet reads ``oxford-iiit-pet/annotations/{trainval,test}.txt``
    (lines "<Breed>_<n> <class id, 1-based> <species: 1 cat, 2 dog> <breed id in species>") and
    ``oxford-iiit-pet/images/<Breed>_<n>.jpg``; class names come from the image ids (cat breeds
    are capitalised, dog breeds lower case, as in the official files). All 37 breeds get images:
    torchvision names 37 classes, and a class without any would be refused."""
    base = root / "oxford-iiit-pet"
    cats = [(f"Cat{i}", 1, i + 1) for i in range(12)]
    breeds = [("Abyssinian", 1, 1), *cats[1:], *[(f"dog{i}", 2, i + 1) for i in range(25)]]
    number = 0
    for split, per_class in _splits("trainval", test="test").items():
        lines = []
        for label, (breed, species, breed_id) in enumerate(breeds):
            for k in range(per_class):
                number += 1
                lines.append(f"{breed}_{number} {label + 1} {species} {breed_id}")
                _jpeg(base / "images" / f"{breed}_{number}.jpg", label, k)
        _lines(base / "annotations" / f"{split}.txt", lines)
    return _info(len(breeds))


def _annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    """A MATLAB struct array like Stanford Cars' ``annotations`` (``class`` is 1-based)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    records = np.zeros(len(rows), dtype=[(f, object) for f in fields])
    for i, (fname, label) in enumerate(rows):
        records[i] = (1, 1, 16, 16, label + 1, fname)
    return records


def stanford_cars(root: Path) -> FakeInfo:
    """torchvision.datasets.StanfordCars reads ``stanford_cars/devkit/cars_meta.mat``
    (``class_names``, a cell row), ``stanford_cars/devkit/cars_train_annos.mat`` and
    ``stanford_cars/cars_test_annos_withlabels.mat`` (``annotations``: struct rows with bbox_*,
    1-based ``class`` and ``fname``), with images in ``stanford_cars/cars_{train,test}/``."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    splits = _splits("train", test="test")
    annotation_files = {
        "train": base / "devkit" / "cars_train_annos.mat",
        "test": base / "cars_test_annos_withlabels.mat",
    }
    for split, per_class in splits.items():
        rows = []
        for label in range(NUM_CLASSES):
            for k in range(per_class):
                fname = f"{len(rows) + 1:05d}.jpg"
                rows.append((fname, label))
                _jpeg(base / f"cars_{split}" / fname, label, k)
        savemat(annotation_files[split], {"annotations": _annotations(rows)[np.newaxis]})
    return _info()


def fgvc_aircraft(root: Path) -> FakeInfo:
    """torchvision.datasets.FGVCAircraft (variant level) reads
    ``fgvc-aircraft-2013b/data/variants.txt`` (one class per line, in file order),
    ``fgvc-aircraft-2013b/data/images_variant_<split>.txt`` (lines "<image id> <variant>",
    split at the first space, so variants may hold spaces) and ``data/images/<image id>.jpg``.
    ``train`` and ``val`` are written too; ``trainval`` is their union, as officially."""
    data = root / "fgvc-aircraft-2013b" / "data"
    names = ["707-320", "A300B4", "Cessna 172"]
    _lines(data / "variants.txt", names)
    image_id = 1000000
    for split, per_class in _splits("train", "val", test="test").items():
        lines = []
        for label, name in enumerate(names):
            for k in range(per_class):
                image_id += 1
                lines.append(f"{image_id:07d} {name}")
                _jpeg(data / "images" / f"{image_id:07d}.jpg", label, k)
        _lines(data / f"images_variant_{split}.txt", lines)
    train = (data / "images_variant_train.txt").read_text()
    val = (data / "images_variant_val.txt").read_text()
    (data / "images_variant_trainval.txt").write_text(train + val)
    return _info()


def dtd(root: Path) -> FakeInfo:
    """torchvision.datasets.DTD (partition 1) reads ``dtd/dtd/labels/{train,val,test}1.txt``
    (lines "<class>/<class>_<nnnn>.jpg"; each split's classes are the sorted classes it lists)
    and ``dtd/dtd/images/<class>/<file>``. The ``dtd/`` level is the class name lower-cased."""
    data = root / "dtd" / "dtd"
    names = ["banded", "blotchy", "braided"]
    number = 0
    for split, per_class in _splits("train", "val", test="test").items():
        lines = []
        for label, name in enumerate(names):
            for k in range(per_class):
                number += 1
                lines.append(f"{name}/{name}_{number:04d}.jpg")
                _jpeg(data / "images" / lines[-1], label, k)
        _lines(data / "labels" / f"{split}1.txt", lines)
    return _info()


def sun397(root: Path) -> FakeInfo:
    """torchvision.datasets.SUN397 reads ``SUN397/ClassName.txt`` (lines "/a/abbey"; the class
    is the line without its first 3 characters) and rglobs ``SUN397/**/sun_*.jpg``, labelled by
    the folders between the letter and the file ("apartment_building/outdoor" has two). The
    official first partition, ``SUN397/Training_01.txt`` and ``SUN397/Testing_01.txt`` (lines
    "/a/abbey/sun_<16 letters>.jpg"), gives the train and test sides."""
    data = root / "SUN397"
    names = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
    _lines(data / "ClassName.txt", names)
    number = 0
    for split, per_class in {"Training_01": TRAIN_PER_CLASS, "Testing_01": TEST_PER_CLASS}.items():
        lines = []
        for label, name in enumerate(names):
            for k in range(per_class):
                number += 1
                letters = "".join(chr(ord("a") + (number * 7 + i) % 26) for i in range(16))
                lines.append(f"{name}/sun_{letters}.jpg")
                _jpeg(data / lines[-1].lstrip("/"), label, k)
        _lines(data / f"{split}.txt", lines)
    return _info()


def country211(root: Path) -> FakeInfo:
    """torchvision.datasets.Country211 is an ImageFolder on ``country211/{train,valid,test}/``
    with one folder per ISO country code (classes are the sorted folders of that split; an
    empty class folder is an error)."""
    base = root / "country211"
    names = ["AD", "AE", "AF"]
    number = 0
    for split, per_class in _splits("train", "valid", test="test").items():
        for label, name in enumerate(names):
            for k in range(per_class):
                number += 1
                _jpeg(base / split / name / f"{number}.jpg", label, k)
    return _info()


def places365(root: Path) -> FakeInfo:
    """torchvision.datasets.Places365 (small images) reads ``categories_places365.txt`` (lines
    "/a/airfield 0"; classes are the sorted names), ``places365_train_standard.txt`` (lines
    "/a/airfield/00000001.jpg 0", images in ``data_256_standard/``) and ``places365_val.txt``
    (lines "Places365_val_00000001.jpg 0", images in ``val_256/``), all at the root."""
    names = ["/a/airfield", "/a/apartment_building/outdoor", "/b/bedroom"]
    _lines(root / "categories_places365.txt", [f"{name} {i}" for i, name in enumerate(names)])
    lines = []
    for label, name in enumerate(names):
        for k in range(TRAIN_PER_CLASS):
            lines.append(f"{name}/{k + 1:08d}.jpg {label}")
            _jpeg(root / "data_256_standard" / lines[-1].split()[0].lstrip("/"), label, k)
    _lines(root / "places365_train_standard.txt", lines)
    lines = []
    for label in range(NUM_CLASSES):
        for k in range(TEST_PER_CLASS):
            lines.append(f"Places365_val_{len(lines) + 1:08d}.jpg {label}")
            _jpeg(root / "val_256" / lines[-1].split()[0], label, k)
    _lines(root / "places365_val.txt", lines)
    return _info()


def inaturalist(root: Path) -> FakeInfo:
    """torchvision.datasets.INaturalist (2021 versions) lists ``<version>/`` under the root:
    category folders "<5-digit index>_<kingdom>_<phylum>_<class>_<order>_<family>_<genus>_
    <species>", whose sorted position must equal the index, so every version holds every
    category. Every file in a folder is an image; the target "full" is that index."""
    species = [
        "Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris",
        "Animalia_Arthropoda_Insecta_Coleoptera_Cleridae_Trichodes_ornatus",
        "Plantae_Tracheophyta_Magnoliopsida_Asterales_Asteraceae_Bellis_perennis",
    ]
    number = 0
    for version, per_class in _splits("2021_train_mini", test="2021_valid").items():
        for label, name in enumerate(species):
            for k in range(per_class):
                number += 1
                # the official files are named by UUID
                uuid = f"{number:08x}-0000-4000-8000-{label:012x}"
                _jpeg(root / version / f"{label:05d}_{name}" / f"{uuid}.jpg", label, k)
    return _info()


FAKES: dict[str, Callable[[Path], FakeInfo]] = {
    "flowers102": flowers102,
    "food101": food101,
    "oxford_pets": oxford_pets,
    "stanford_cars": stanford_cars,
    "fgvc_aircraft": fgvc_aircraft,
    "dtd": dtd,
    "sun397": sun397,
    "country211": country211,
    "places365": places365,
    "inaturalist": inaturalist,
}


@contextlib.contextmanager
def fake_checksums():
    """Flowers102 and Places365 accept an annotation file that exists, whatever its MD5 sum.
    ``mock.patch`` fails if torchvision no longer looks the check up by this name."""

    def exists(path, md5=None) -> bool:
        return Path(path).is_file()

    with (
        mock.patch("torchvision.datasets.flowers102.check_integrity", exists),
        mock.patch("torchvision.datasets.places365.check_integrity", exists),
    ):
        yield


def make_fake(name: str, root: Path) -> FakeInfo:
    """Build the fake ``name`` under ``root`` (created if missing) and describe it."""
    if name not in FAKES:
        raise KeyError(f"No fake dataset {name!r}; available: {', '.join(FAKES)}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return FAKES[name](root)


def _self_check() -> None:
    """Build every fake in a temporary folder and read it back with torchvision."""
    import tempfile

    from torchvision import datasets as tv

    # name -> (open one official split of the fake at root, train-side splits, test split)
    readers: dict[str, tuple[Callable, tuple[str, ...], str]] = {
        "flowers102": (lambda r, s: tv.Flowers102(r, split=s), ("train", "val"), "test"),
        "food101": (lambda r, s: tv.Food101(r, split=s), ("train",), "test"),
        "oxford_pets": (
            lambda r, s: tv.OxfordIIITPet(r, split=s, target_types="category"),
            ("trainval",),
            "test",
        ),
        "stanford_cars": (lambda r, s: tv.StanfordCars(r, split=s), ("train",), "test"),
        "fgvc_aircraft": (
            lambda r, s: tv.FGVCAircraft(r, split=s, annotation_level="variant"),
            ("trainval",),
            "test",
        ),
        "dtd": (lambda r, s: tv.DTD(r, split=s, partition=1), ("train", "val"), "test"),
        "country211": (lambda r, s: tv.Country211(r, split=s), ("train", "valid"), "test"),
        "places365": (
            lambda r, s: tv.Places365(r, split=s, small=True),
            ("train-standard",),
            "val",
        ),
        "inaturalist": (
            lambda r, s: tv.INaturalist(r, version=s, target_type="full"),
            ("2021_train_mini",),
            "2021_valid",
        ),
    }

    def declared_classes(dataset) -> int | None:
        """How many classes torchvision declares (Flowers102's 102 names are fixed)."""
        if isinstance(dataset, tv.Flowers102):
            return None
        if isinstance(dataset, tv.INaturalist):
            return len(dataset.all_categories)
        return len(dataset.classes)

    def labels_of(dataset) -> list[int]:
        """Every item's label, decoding every image and checking its colour is its label's."""
        labels = []
        for index in range(len(dataset)):
            image, label = dataset[index]
            mean = np.asarray(image.convert("RGB"), dtype=float).mean(axis=(0, 1))
            nearest = int(np.argmin([np.abs(mean - c).sum() for c in _COLOURS]))
            assert nearest == label % len(_COLOURS), f"{type(dataset).__name__}[{index}]: {label}"
            labels.append(int(label))
        return labels

    def sun397_sides(root: Path) -> tuple[list[int], list[int], set]:
        """Labels of the Training_01 and Testing_01 images, read through torchvision's SUN397."""
        every = tv.SUN397(root)
        paths = [Path(path) for path, _ in tv.SUN397(root, loader=str)]
        label_of = dict(zip(paths, labels_of(every), strict=True))
        assert len(every) == len(label_of), "SUN397 found an image twice"
        found = []
        for split in ("Training_01", "Testing_01"):
            listing = (root / "SUN397" / f"{split}.txt").read_text().splitlines()
            assert all(line.startswith("/") for line in listing), listing
            found.append([label_of[root / "SUN397" / line.lstrip("/")] for line in listing])
        assert len(found[0]) + len(found[1]) == len(every), "partition does not cover SUN397"
        return found[0], found[1], {len(every.classes)}

    with tempfile.TemporaryDirectory() as folder, fake_checksums():
        for name in FAKES:
            root = Path(folder) / name
            info = make_fake(name, root)
            if name == "sun397":
                train, test, declared = sun397_sides(root)
            else:
                read, train_splits, test_split = readers[name]
                train_sets = [read(root, split) for split in train_splits]
                test_set = read(root, test_split)
                train = [label for d in train_sets for label in labels_of(d)]
                test = labels_of(test_set)
                declared = {declared_classes(d) for d in [*train_sets, test_set]}
            classes = set(range(info.num_classes))
            assert len(train) == info.train, (name, len(train), info)
            assert len(test) == info.test, (name, len(test), info)
            assert set(train) == classes and set(test) == classes, (name, train, test)
            assert declared <= {None, info.num_classes}, (name, declared, info)
            print(f"{name:14s} ok: {info}; classes torchvision declares: {declared}")


if __name__ == "__main__":
    _self_check()
