"""Where labeled images come from: one registered builder per ``dataset.name``.

A builder is ``builder(num_classes, seed, *, <its options>) -> (train, test)``: every source is
given ``dataset.num_classes`` (null: not known yet) and ``dataset.seed``; its keyword-only
arguments are its own options, with their types and defaults, and nothing else (a source that
reads no files takes no ``root``). ``mim_agg.config.dataset_schema`` turns them into the source's
config schema, so an option of another source fails at composition. It returns ``(train, test)``
datasets of ``(PIL image, int label)`` with a ``targets`` sequence, untransformed: the data
module applies train or eval transforms per split.

Source options stay flat under ``dataset.`` (``dataset.split_file``, not
``dataset.source.split_file``): users write the keys they always wrote, one dataset is one
namespace whatever part of the code reads a key, and flat costs no safety, since each dataset's
YAML composes its own schema (the shared keys plus its source's), so another source's key is
refused at composition as a typo is. A nested group would buy only a visible boundary, at the
price of every command and sweep that sets a source option.

A new source is one module in ``mim_agg/data/`` (imported by the package, so ``@source`` runs),
its YAML in ``conf/dataset/`` and one test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from mim_agg.errors import ConfigError, UserError

SOURCES: dict[str, Callable] = {}


class DataError(UserError, FileNotFoundError):
    """Data that cannot give honest labels: the message names the folder or file."""


def source(*names: str):
    """Register a builder under one or more ``dataset.name`` values."""

    def add(builder):
        for name in names:
            SOURCES[name] = builder
        return builder

    return add


def source_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of source ``name``: its builder's keyword-only arguments."""
    if name not in SOURCES:
        raise ConfigError(f"Unknown dataset {name!r}; available: {', '.join(sorted(SOURCES))}.")
    parameters = inspect.signature(SOURCES[name]).parameters.values()
    return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class Source:
    """A registered source and the options given to it; checked as it is made, so an option of
    another source (or a required one left out) is refused before anything is read."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = source_options(self.name)
        for option in self.options:
            if option not in accepted:
                takers = sorted(n for n in SOURCES if option in source_options(n))
                owner = f"it is an option of {' / '.join(takers)}" if takers else "no source has it"
                raise ConfigError(
                    f"dataset.{option} does not apply to dataset {self.name!r}; {owner}. Remove it."
                )
        for option, parameter in accepted.items():
            if parameter.default is inspect.Parameter.empty and option not in self.options:
                raise ConfigError(f"dataset={self.name} needs dataset.{option}.")

    def load(self, num_classes: int | None, seed: int) -> tuple[Dataset, Dataset]:
        """``(train, test)``, untransformed."""
        return SOURCES[self.name](num_classes, seed, **self.options)


def classes_of(dataset: Dataset) -> int | None:
    """How many classes the source itself declares (class folders, torchvision's ``classes``)."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


def targets_of(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # torchvision's STL10
    return np.asarray(labels, dtype=np.int64)


class ArrayImages(Dataset):
    """In-memory uint8 images ``[n, H, W]`` or ``[n, H, W, 3]`` with integer labels."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index]), int(self.targets[index])


@source("digits")
def digits(num_classes, seed, *, test_fraction: float = 0.3):
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 real images, no download.

    The train/test split is stratified and fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return ArrayImages(train_x, train_y), ArrayImages(test_x, test_y)


@source("synthetic")
def synthetic(num_classes, seed, *, per_class: tuple[int, int] = (50, 20), image_size: int = 32):
    """Deterministic, learnable images: a per-class smooth colour template plus noise.

    ``per_class``: images per class for train and test (``dataset.train_size`` subsamples);
    ``image_size``: their side before the transform resizes them."""
    if num_classes is None:  # the data cannot say how many: it is made from this number
        raise ConfigError(
            "dataset=synthetic makes dataset.num_classes classes; set it to a number (e.g. 4)."
        )
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3)).astype(np.uint8)
    templates = np.stack(
        [np.asarray(Image.fromarray(t).resize((image_size, image_size))) for t in coarse]
    ).astype(np.float32)

    def make(count: int, offset: int) -> ArrayImages:
        labels = np.arange(count) % num_classes
        noise = np.random.default_rng(seed + offset).normal(
            0, 40, (count, image_size, image_size, 3)
        )
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        return ArrayImages(images, labels)

    return make(per_class[0] * num_classes, 1), make(per_class[1] * num_classes, 2)


@source("image_folder", "imagenet")
def image_folder(
    num_classes, seed, *, root: str, test_split: str = "val", split_file: str | None = None
):
    """``root/train/<class>/<image>`` and ``root/<test_split>/<class>/<image>`` (ImageNet), or
    the images listed by ``split_file`` (see ``listed_images``).

    Both splits must hold the same class folders: labels are indices into their sorted names,
    so a class missing from one split would shift every later label of that split."""
    root = Path(root).expanduser()
    if split_file is not None:
        return tuple(listed_images(root, split_file, split) for split in ("train", test_split))
    for split in ("train", test_split):
        if not (root / split).is_dir():
            raise DataError(
                f"dataset.root={str(root)!r} has no {split}/ folder. Expected the ImageNet layout "
                f"root/train/<class>/<image> and root/{test_split}/<class>/<image>; "
                "set dataset.root (or MIM_AGG_DATA_DIR) to such a folder."
            )
    classes = {split: class_folders(root / split) for split in ("train", test_split)}
    only_train = sorted(set(classes["train"]) - set(classes[test_split]))
    only_test = sorted(set(classes[test_split]) - set(classes["train"]))
    if only_train or only_test:
        raise DataError(
            f"The splits of dataset.root={str(root)!r} hold different classes: only in train/: "
            f"{listed(only_train)}; only in {test_split}/: {listed(only_test)}. Every split needs "
            "the same class folders (labels are their sorted positions)."
        )
    return tuple(_image_folder(root / split) for split in ("train", test_split))


def class_folders(folder: Path) -> list[str]:
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not names:
        raise DataError(f"{folder} holds no class folders; expected {folder}/<class>/<image>.")
    return names


def _image_folder(folder: Path) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(folder), loader=load_image)
    except FileNotFoundError as error:  # a class folder without a single image file
        raise DataError(f"In {folder}: {error}") from None


def listed(names: list, limit: int = 10) -> str:
    """The first ``limit`` names, and how many more."""
    shown = ", ".join(str(name) for name in names[:limit]) or "none"
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


class FileList(Dataset):
    """Labeled image files, decoded by ``load_image`` (8-bit RGB, the file named on error)."""

    def __init__(self, root: Path | str, samples: list[tuple[str, int]], classes) -> None:
        self.root = str(root)
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.targets = [label for _, label in self.samples]
        self.classes = None if classes is None else list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return load_image(path), label


def listed_images(root: Path, split_file: str, split: str) -> FileList:
    """The images that ``split_listing`` names for ``split``: one ``path label`` line per image,
    the path relative to ``root`` (or absolute), the label an integer; blank lines are skipped."""
    listing = split_listing(root, split_file, split)
    samples = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.lstrip("-").isdigit():
            raise DataError(f"{listing}:{number}: expected '<path> <integer label>', got {line!r}.")
        samples.append((root / path, int(label)))
    if not samples:
        raise DataError(f"dataset.split_file: {listing} lists no images (the {split} split).")
    missing = [str(path) for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images listed in {listing} do not exist, e.g. {missing[0]}; paths "
            "are taken relative to dataset.root."
        )
    return FileList(root, samples, classes=None)


def split_listing(root: Path, split_file: str, split: str) -> Path:
    """``split_file`` with ``{split}`` replaced (``lists/{split}.txt``): one file per split. A
    relative one is taken from ``dataset.root``, as the image paths in it are, so a dataset
    folder carries its own lists and the command works from any folder."""
    if "{split}" not in split_file:
        empty = "is empty" if not split_file.strip() else f"={split_file!r} lacks {{split}}"
        raise ConfigError(
            f"dataset.split_file {empty}: it names one file per split (train and {split}), e.g. "
            "'dataset.split_file=\"lists/{split}.txt\"' (relative to dataset.root); null reads "
            "the class folders root/train/<class>/ instead."
        )
    listing = root / Path(split_file.format(split=split)).expanduser()
    if not listing.is_file():
        raise DataError(
            f"dataset.split_file: {listing} does not exist (the {split} split; a relative "
            "split_file is taken from dataset.root)."
        )
    return listing


class UnreadableImage(DataError):
    """An image file that cannot be decoded, found while training or extracting.

    Raised in a loader worker, it reaches the main process rebuilt by torch from the worker's
    formatted traceback (only the type and that text travel), a message dozens of lines long
    whose last line is this error's own: the constructor keeps that line alone, so the command
    line still shows one message."""

    def __init__(self, message: str) -> None:
        own_line = f"{type(self).__module__}.{type(self).__qualname__}: "
        super().__init__(message.rsplit(own_line, 1)[-1].strip())


def load_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB, naming the file and the fix when it cannot be decoded."""
    try:
        with open(path, "rb") as handle:
            return to_rgb(Image.open(handle))
    except OSError as error:
        raise UnreadableImage(
            f"{unreadable(path, error)}; replace or remove the file. dataset.verify=true "
            "decodes every image before training and names all unreadable ones; the run folder "
            "keeps what was trained, and the same command continues from there."
        ) from error


def unreadable(path: str, error: OSError) -> str:
    return f"Cannot read image {path!r} ({error})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. 16-bit and float images are rescaled from their full range
    (PIL's own conversion would clip them to 255, i.e. white); palette images with
    transparency go through RGBA; CMYK, grayscale and RGBA convert directly."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and values.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(values.max()), 1e-12)
        gray = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


TRAIN_TEST = ({"train": True}, {"train": False})


def torchvision_set(name: str, cls, folder_name: str, split_kwargs=TRAIN_TEST) -> None:
    """Register torchvision's ``cls`` as source ``name``: train and test by ``split_kwargs``."""

    @source(name)
    def build(num_classes, seed, *, root: str, download: bool = False):
        try:
            return tuple(cls(str(root), download=download, **kwargs) for kwargs in split_kwargs)
        except (RuntimeError, OSError) as error:
            raise DataError(
                f"{cls.__name__} not found under {str(Path(root) / folder_name)!r} ({error}). "
                f"Put the torchvision files there, or set dataset.download=true on a machine "
                "with internet access."
            ) from error


torchvision_set("cifar10", torchvision.datasets.CIFAR10, "cifar-10-batches-py")
torchvision_set("cifar100", torchvision.datasets.CIFAR100, "cifar-100-python")
torchvision_set("fashion_mnist", torchvision.datasets.FashionMNIST, "FashionMNIST/raw")
torchvision_set(
    "stl10", torchvision.datasets.STL10, "stl10_binary", ({"split": "train"}, {"split": "test"})
)
