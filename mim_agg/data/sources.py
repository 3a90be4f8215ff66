"""Where labeled images come from: one builder per ``dataset.name``.

Every builder takes ``(root, download, num_classes, seed)`` and returns ``(train, test)``
datasets of ``(PIL image, int label)`` with a ``targets`` sequence, untransformed: the data
module applies train or eval transforms per split.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from mim_agg.errors import ConfigError, UserError

SOURCES: dict[str, Callable] = {}


class DataError(UserError, FileNotFoundError):
    """Data that cannot give honest labels: the message names the folder or file."""


def source(name: str):
    def add(builder):
        SOURCES[name] = builder
        return builder

    return add


def build_source(name: str, root, download: bool, num_classes: int, seed: int, **options):
    """``(train, test)`` of source ``name``. ``options`` (e.g. ``split_file``) go to the sources
    that take them; one set for a source that does not is refused, never ignored."""
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; available: {', '.join(sorted(SOURCES))}.")
    builder = SOURCES[name]
    accepted = inspect.signature(builder).parameters
    given = {k: v for k, v in options.items() if v is not None}  # None: the source's default
    ignored = [k for k in given if k not in accepted]
    if ignored:
        option = ignored[0]
        takers = sorted(n for n, b in SOURCES.items() if option in inspect.signature(b).parameters)
        raise ConfigError(
            f"dataset.{option} does not apply to dataset {name!r}; it is an option of "
            f"{' / '.join(takers)}. Remove it."
        )
    return builder(root, download, num_classes, seed, **given)


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
def digits(root, download, num_classes, seed, test_fraction: float = 0.3):
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
def synthetic(root, download, num_classes, seed, per_class=(50, 20), image_size: int = 32):
    """Deterministic, learnable images: a per-class smooth colour template plus noise.

    ``per_class`` images per class for train and test; ``dataset.train_size`` subsamples."""
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


@source("image_folder")
def image_folder(root, download, num_classes, seed, test_split=None, split_file=None):
    """``root/train/<class>/<image>`` and ``root/<test_split>/<class>/<image>`` (ImageNet), or
    the images listed by ``split_file``.

    Both splits must hold the same class folders: labels are indices into their sorted names,
    so a class missing from one split would shift every later label of that split."""
    root = Path(root)
    test_split = test_split or "val"
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


SOURCES["imagenet"] = image_folder


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
    """``split_file`` with ``{split}`` replaced (``lists/{split}.txt``): one ``path label``
    line per image, the path relative to ``root`` (or absolute), the label an integer."""
    listing = Path(split_file.format(split=split))
    if "{split}" not in split_file:
        raise ConfigError(
            f"dataset.split_file={split_file!r} must contain {{split}}, e.g. lists/{{split}}.txt: "
            f"it names one file per split (train and {split})."
        )
    if not listing.is_file():
        raise DataError(f"dataset.split_file: {listing} does not exist (the {split} split).")
    samples = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.lstrip("-").isdigit():
            raise DataError(f"{listing}:{number}: expected '<path> <integer label>', got {line!r}.")
        samples.append((root / path, int(label)))
    missing = [str(path) for path, _ in samples if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images listed in {listing} do not exist, e.g. {missing[0]}; paths "
            "are taken relative to dataset.root."
        )
    return FileList(root, samples, classes=None)


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


def _torchvision(cls, folder_name: str, split_kwargs: tuple[dict, dict]):
    def build(root, download, num_classes, seed):
        try:
            return tuple(cls(str(root), download=download, **kwargs) for kwargs in split_kwargs)
        except (RuntimeError, OSError) as error:
            raise FileNotFoundError(
                f"{cls.__name__} not found under {str(Path(root) / folder_name)!r} ({error}). "
                f"Put the torchvision files there, or set dataset.download=true on a machine "
                "with internet access."
            ) from error

    return build


TRAIN_TEST = ({"train": True}, {"train": False})
SOURCES["cifar10"] = _torchvision(torchvision.datasets.CIFAR10, "cifar-10-batches-py", TRAIN_TEST)
SOURCES["cifar100"] = _torchvision(torchvision.datasets.CIFAR100, "cifar-100-python", TRAIN_TEST)
SOURCES["fashion_mnist"] = _torchvision(
    torchvision.datasets.FashionMNIST, "FashionMNIST/raw", TRAIN_TEST
)
SOURCES["stl10"] = _torchvision(
    torchvision.datasets.STL10, "stl10_binary", ({"split": "train"}, {"split": "test"})
)
