"""ImageNet's robustness and re-labelled test sets, in the layouts of their official archives,
labelled in a trained probe's class space (``task=evaluate`` scores a probe run on them).

A probe trained on ImageNet predicts the classes of its training folders, sorted: ImageNet-1k's
wnids in their standard order (timm's list, ``timm.data.ImageNetInfo``), or, for a probe trained
on a subset, the wnids listed in ``dataset.wnids`` (one per line, in label order). Each set's
own labels (class folders named by wnid, or by ImageNet-1k index for ImageNet-V2, or ReaL's
ImageNet-1k indices) are mapped into that list; images of classes the probe lacks are left out.

- ImageNet-V2 (``imagenet_v2``): ``root/imagenetv2-<variant>-format-val/<0..999>/*``, the three
  variants ``matched-frequency``, ``threshold0.7``, ``top-images``.
- ImageNet-Sketch (``imagenet_sketch``): ``root/<wnid>/*`` (the archive's ``sketch/``).
- ImageNet-R and ImageNet-A (``imagenet_r``, ``imagenet_a``): ``root/<wnid>/*``, 200 classes
  each. Only those classes are scored: a prediction is the argmax of the probe's logits
  restricted to them, as the DINOv2 and CLIP evaluations do. The folder must hold exactly the
  archive's 200 class folders (``imagenet_r_wnids.txt``, ``imagenet_a_wnids.txt``), each with
  images: a copy cut short, or the other set, would otherwise be scored as if whole.
- ImageNet-ReaL (``imagenet_real``): ImageNet's validation images (``root/val/**/
  ILSVRC2012_val_<n>.*``, in class folders or flat) with ``real.json``'s label sets (entry
  ``n - 1`` for image ``n``); a prediction is right if it is in the image's set, and images
  whose set is empty are skipped.

These are test sets only: their train split is empty (``task=probe`` refuses them).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from timm.data import ImageNetInfo

from mim_agg.data.sources import DataError, FileList, listed, source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})$")


class EvaluationImages(FileList):
    """A test set in the probe's class space. ``title``: the folder its results go to;
    ``class_names``: the probe's classes (wnids) in label order; ``scored_classes``: the
    classes a prediction is chosen among (None: all the probe's); ``label_sets``: per image,
    every right answer (ReaL), else None (the label alone)."""

    def __init__(
        self, root, samples, title, class_names, scored_classes=None, label_sets=None
    ) -> None:
        super().__init__(root, samples, classes=None)
        self.title = title
        self.class_names = list(class_names)
        self.scored_classes = scored_classes
        self.label_sets = label_sets


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 wnids by class index (sorted: the order of its class folders)."""
    return list(ImageNetInfo().label_names())


def probe_classes(wnids: str | None) -> dict[str, int]:
    """wnid -> the probe's label: ``dataset.wnids``' file, or ImageNet-1k's list."""
    if wnids is None:
        names = imagenet_wnids()
    else:
        listing = Path(wnids).expanduser()
        if not listing.is_file():
            raise DataError(f"dataset.wnids={wnids!r} does not exist (one wnid per line).")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        unknown = sorted(set(names) - set(imagenet_wnids()))
        if unknown or len(set(names)) != len(names) or not names:
            raise DataError(
                f"dataset.wnids={wnids!r} must list distinct ImageNet-1k wnids, one per line "
                f"(unknown: {listed(unknown)}); it is the probe's classes in label order."
            )
    return {name: label for label, name in enumerate(names)}


def folder_of(root: str, *parts: str) -> Path:
    folder = Path(root).expanduser().joinpath(*parts)
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; set dataset.root to the extracted archive.")
    return folder


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def class_folder_set(folder: Path, title: str, classes: dict, wnid_of, restrict: bool):
    """``folder/<class>/<image>`` with ``wnid_of(class folder name)`` the folder's wnid; the
    classes the probe lacks are left out (named in none of the results)."""
    samples, present = [], set()
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        wnid = wnid_of(class_dir.name)
        if wnid not in classes:
            continue
        present.add(classes[wnid])
        samples += [(path, classes[wnid]) for path in images_in(class_dir)]
    if not samples:
        raise DataError(
            f"{folder} holds no image of the probe's classes; expected {folder}/<class>/<image> "
            "with class folders of the probe's classes (dataset.wnids)."
        )
    scored = sorted(present) if restrict else None
    return empty(folder), EvaluationImages(folder, samples, title, classes, scored_classes=scored)


def empty(root: Path) -> FileList:
    """The train split of a test-only set."""
    return FileList(root, [], classes=None)


def v2_wnid(folder_name: str) -> str | None:
    index = int(folder_name) if folder_name.isdigit() else -1
    return imagenet_wnids()[index] if 0 <= index < 1000 else None


@source("imagenet_v2")
def imagenet_v2(
    num_classes, seed, *, root: str, variant: str = "matched-frequency", wnids: str | None = None
):
    """ImageNet-V2's ``variant`` (``matched-frequency``, ``threshold0.7``, ``top-images``)."""
    if variant not in V2_VARIANTS:
        raise DataError(f"dataset.variant={variant!r} is none of {', '.join(V2_VARIANTS)}.")
    folder = folder_of(root, f"imagenetv2-{variant}-format-val")
    title = f"imagenet_v2-{variant}"
    return class_folder_set(folder, title, probe_classes(wnids), v2_wnid, restrict=False)


@source("imagenet_sketch")
def imagenet_sketch(num_classes, seed, *, root: str, wnids: str | None = None):
    folder = folder_of(root)
    return class_folder_set(folder, "imagenet_sketch", probe_classes(wnids), str, restrict=False)


@source("imagenet_r")
def imagenet_r(num_classes, seed, *, root: str, wnids: str | None = None):
    folder = official_classes(folder_of(root), "imagenet_r")
    return class_folder_set(folder, "imagenet_r", probe_classes(wnids), str, restrict=True)


@source("imagenet_a")
def imagenet_a(num_classes, seed, *, root: str, wnids: str | None = None):
    folder = official_classes(folder_of(root), "imagenet_a")
    return class_folder_set(folder, "imagenet_a", probe_classes(wnids), str, restrict=True)


def official_wnids(name: str) -> list[str]:
    """The 200 wnids of ``name``'s archive (``imagenet_r`` or ``imagenet_a``): our package
    data, from the authors' lists (their sources in the files' comments)."""
    text = resources.files("mim_agg.data").joinpath(f"{name}_wnids.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def official_classes(folder: Path, name: str) -> Path:
    """``folder``, if its class folders are exactly ``name``'s 200 and each holds images (as
    in the archive, where every class has some): a partial copy would score a few classes as
    if they were the set, another set's folder the wrong classes."""
    expected = set(official_wnids(name))
    present = {p.name for p in folder.iterdir() if p.is_dir()}
    empty_classes = sorted(w for w in expected & present if not images_in(folder / w))
    missing, foreign = sorted(expected - present), sorted(present - expected)
    if missing or foreign or empty_classes:
        raise DataError(
            f"dataset={name}: {folder} is not the archive's {len(expected)} class folders, each "
            f"with images (missing: {listed(missing, 5)}; not of {name}: {listed(foreign, 5)}; "
            f"without images: {listed(empty_classes, 5)}); set dataset.root to the whole "
            "extracted archive."
        )
    return folder


@source("imagenet_real")
def imagenet_real(
    num_classes,
    seed,
    *,
    root: str,
    test_split: str = "val",
    real_labels: str = "real.json",
    wnids: str | None = None,
):
    """``real_labels`` (relative to ``root``): the ReaL file, a list of ImageNet-1k label lists,
    entry ``n - 1`` for ``ILSVRC2012_val_<n>``."""
    folder = folder_of(root, test_split)
    labels_file = Path(root).expanduser() / real_labels
    try:
        real = json.loads(labels_file.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"dataset.real_labels: cannot read {labels_file} ({error}).") from None
    if not is_real_labels(real):
        raise DataError(
            f"dataset.real_labels: {labels_file} is no ReaL label file: expected a JSON list "
            "holding, per validation image in order, a list of ImageNet-1k class indices "
            "(0-999), as github.com/google-research/reassessed-imagenet's real.json."
        )
    classes, wnid = probe_classes(wnids), imagenet_wnids()
    samples, label_sets = [], []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        number = VAL_NUMBER.match(path.stem)
        if number is None:
            raise DataError(f"{path} is no ImageNet validation image (ILSVRC2012_val_<n>).")
        n = int(number.group(1))
        if not 1 <= n <= len(real):
            raise DataError(f"{labels_file} has no entry for {path.name} ({len(real)} entries).")
        right = sorted({classes[wnid[i]] for i in real[n - 1] if wnid[i] in classes})
        if right:  # no label (or none of the probe's): skipped, as ReaL does
            samples.append((path, right[0]))
            label_sets.append(right)
    if not samples:
        raise DataError(f"No image under {folder} has a ReaL label of the probe's classes.")
    return empty(folder), EvaluationImages(
        folder, samples, "imagenet_real", classes, label_sets=label_sets
    )


def is_real_labels(real) -> bool:
    """A list of lists of ImageNet-1k indices (``real.json``'s format)."""
    return isinstance(real, list) and all(
        isinstance(labels, list)
        and all(type(index) is int and 0 <= index < 1000 for index in labels)
        for labels in real
    )
