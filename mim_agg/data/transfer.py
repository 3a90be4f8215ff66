"""The transfer datasets torchvision ships, each with its official splits: ``dataset=<name>``.

torchvision reads each set's own layout and annotation files; what it found is turned into one
``FileList`` per side (``samples`` of (file, label), ``targets``, ``classes``, ``root``), so
every set is read, verified, split and cached like an image folder. Where an official split
has a validation part, it joins the training side: the held-out split is carved from it.

Only torchvision's public API is used: the file lists come from ``__getitem__`` with
``loader=str`` (``files``), and torchvision checks its annotation files' checksums itself. The
one set without that argument, Oxford-IIIT Pets, is read in ``torchvision_private``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision import datasets as tv

from mim_agg.data.sources import DataError, FileList, source
from mim_agg.data.torchvision_private import pet_files


def joined(*parts: FileList) -> FileList:
    return FileList(parts[0].root, [s for part in parts for s in part.samples], parts[0].classes)


def files(dataset) -> list[tuple[str, int]]:
    """``(file, label)`` of every item of a torchvision set made with ``loader=str``: its public
    way (``__getitem__``) then gives each image's file instead of decoding it."""
    return [dataset[index] for index in range(len(dataset))]


def flowers102(root, download: bool):
    sides = {
        s: tv.Flowers102(root, split=s, download=download, loader=str)
        for s in ("train", "val", "test")
    }
    classes = range(102)  # torchvision keeps no names
    lists = {s: FileList(root, files(d), classes) for s, d in sides.items()}
    return joined(lists["train"], lists["val"]), lists["test"]


def food101(root, download: bool):
    sides = [tv.Food101(root, split=s, download=download, loader=str) for s in ("train", "test")]
    return tuple(FileList(root, files(d), d.classes) for d in sides)


def oxford_pets(root, download: bool):
    sides = [tv.OxfordIIITPet(root, split=s, download=download) for s in ("trainval", "test")]
    return tuple(FileList(root, pet_files(d), range(37)) for d in sides)


def stanford_cars(root, download: bool):
    sides = [
        tv.StanfordCars(root, split=s, download=download, loader=str) for s in ("train", "test")
    ]
    return tuple(FileList(root, files(d), d.classes) for d in sides)


def fgvc_aircraft(root, download: bool):
    sides = [
        tv.FGVCAircraft(root, split=s, annotation_level="variant", download=download, loader=str)
        for s in ("trainval", "test")
    ]
    return tuple(FileList(root, files(d), d.classes) for d in sides)


def dtd(root, download: bool):
    sides = {
        s: tv.DTD(root, split=s, partition=1, download=download, loader=str)
        for s in ("train", "val", "test")
    }
    lists = {s: FileList(root, files(d), d.classes) for s, d in sides.items()}
    return joined(lists["train"], lists["val"]), lists["test"]


def sun397(root, download: bool):
    """SUN397 has no split in torchvision; the standard one is the first of the authors' ten
    partitions (50 train and 50 test images per class): ``SUN397/Training_01.txt`` and
    ``SUN397/Testing_01.txt`` from their Partitions.zip, placed beside ``ClassName.txt``."""
    every = tv.SUN397(root, download=download, loader=str)
    data_dir = Path(root) / "SUN397"  # torchvision's layout
    label_of = {Path(path): label for path, label in files(every)}
    sides = []
    for name in ("Training_01.txt", "Testing_01.txt"):
        listing = data_dir / name
        if not listing.is_file():
            raise DataError(
                f"{listing} is missing: SUN397's standard split is the authors' first partition; "
                f"put Training_01.txt and Testing_01.txt from their Partitions.zip in {data_dir}."
            )
        paths = [data_dir / line.strip().lstrip("/") for line in listing.read_text().split()]
        missing = [str(p) for p in paths if p not in label_of]
        if missing:
            raise DataError(f"{listing} lists {len(missing)} missing images, e.g. {missing[0]}.")
        sides.append(FileList(root, [(p, label_of[p]) for p in paths], every.classes))
    return tuple(sides)


def country211(root, download: bool):
    sides = {s: tv.Country211(root, split=s, download=download) for s in ("train", "valid", "test")}
    lists = {s: FileList(root, d.samples, d.classes) for s, d in sides.items()}
    return joined(lists["train"], lists["valid"]), lists["test"]


def places365(root, download: bool):
    sides = [
        tv.Places365(root, split=s, small=True, download=download)
        for s in ("train-standard", "val")
    ]
    return tuple(FileList(root, d.imgs, d.classes) for d in sides)


def inaturalist(root, download: bool):
    """iNaturalist 2021: the mini training set (50 images of each of 10,000 species) and the
    validation set as test, labelled by species."""
    sides = []
    for version in ("2021_train_mini", "2021_valid"):
        data = tv.INaturalist(root, version=version, target_type="full", download=download)
        categories = data.all_categories
        samples = [(Path(data.root, categories[c], name), c) for c, name in data.index]
        sides.append(FileList(root, samples, categories))
    return tuple(sides)


TRANSFER: dict[str, Callable] = {
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


def _registered(name: str, read: Callable) -> Callable:
    def build(num_classes, seed, *, root: str, download: bool = False):
        try:
            return read(root, download)
        except DataError:
            raise
        except (RuntimeError, FileNotFoundError, ValueError) as error:
            raise DataError(
                f"dataset={name} was not found under dataset.root={str(root)!r} ({error}). "
                "Put torchvision's files there (the layout torchvision.datasets reads), or set "
                "dataset.download=true on a machine online (every set but stanford_cars)."
            ) from None

    return build


for _name, _read in TRANSFER.items():
    source(_name)(_registered(_name, _read))
