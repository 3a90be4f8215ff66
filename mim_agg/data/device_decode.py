"""``dataset.decode=gpu``: the loader workers read files, the backbone's device decodes batches.

Decoding and resizing JPEGs costs several CPU milliseconds per image, while a frozen ViT on a
GPU takes thousands of images per second: an online run is bound by the CPUs (README, "Data
path"). Under ``gpu`` a loader worker does only what needs no pixels (``ReadForDevice``): it
reads the file's bytes, reads the JPEG header's size with Pillow, and for a training crop
draws the random-resized crop box and the flip with the timm transform's own steps, under the
sample's random state (``datamodule.TransformedSubset``), so resumed runs draw the same crops
as ``pil`` runs do. ``finish_images`` then decodes the batch on the device
(``torchvision.io.decode_jpeg``, batched: nvJPEG on a GPU) and applies the same transform on
tensors (``torchvision.transforms.v2.functional``): resize (bicubic, antialiased) and centre
crop, or the drawn crop resized and flipped; normalisation. It is the one place a batch of
images reaches the device: Lightning's ``on_after_batch_transfer`` (``ProbeDataModule``), the
extraction, ``task=evaluate`` and ``task=analyze`` call it.

The resize runs in float32 and its values are clamped to [0, 255] but not rounded to 8 bits
as Pillow's are, and on a GPU nvJPEG's IDCT is not libjpeg's: other pixels, a fraction of a
level (README). Files the device decoder may not take as Pillow does (not JPEG, CMYK, damaged
headers) are decoded by Pillow in the worker (``load_image``: its pixels, or the file named
as unreadable); a file whose header reads but whose data the device decoder refuses is decoded
by Pillow in the main process, or named.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch.utils.data import default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from mim_agg.data.decode import ImageFile
from mim_agg.data.sources import load_image

log = logging.getLogger(__name__)

DEVICE_DECODABLE = ("RGB", "L")  # Pillow's modes of YCbCr and grayscale JPEGs; not CMYK/YCCK
FLIP_PROBE = torch.tensor([[[0.0, 1.0]]])  # a two-pixel image the flip step flips or not


@dataclass(frozen=True)
class DeviceSteps:
    """What the device computes after decoding, read from the timm transform's steps.
    ``resize``: ``Resize``'s size (the shorter side, 256 for 224), then a centre crop to
    ``size``; None: a random-resized crop to ``size`` (its box drawn by the worker)."""

    size: tuple[int, int]
    resize: tuple[int, ...] | None
    max_size: int | None
    interpolation: T.InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, image: torch.Tensor, item: PendingImage) -> torch.Tensor:
        """One decoded image ``[3, H, W]`` (uint8) to ``[3, *size]`` in [0, 255], float."""
        image = image.float()
        if self.resize is None:
            top, left, height, width = item.box
            image = F.resized_crop(
                image, top, left, height, width, list(self.size), self.interpolation, antialias=True
            )
        else:
            image = F.resize(image, list(self.resize), self.interpolation, self.max_size, True)
            image = F.center_crop(image, list(self.size))
        if item.flip:
            image = F.horizontal_flip(image)
        return image.clamp_(0, 255)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images / 255, list(self.mean), list(self.std))


@dataclass
class PendingImage:
    """An image as a worker hands it over: the file's bytes (``bytearray``, for the device
    decoder) or Pillow's RGB pixels (``[H, W, 3]`` uint8, for a file it may not take), and the
    random crop box (top, left, height, width) and flip drawn for it; ``steps``: what the
    device does with it."""

    data: bytearray | np.ndarray
    path: str
    steps: DeviceSteps
    box: tuple[int, int, int, int] | None = None
    flip: bool = False


class ReadForDevice:
    """The whole transform of a worker under ``dataset.decode=gpu``: ``ImageFile`` ->
    ``PendingImage``; ``finish_images`` does the rest on the device."""

    def __init__(self, transform: T.Compose) -> None:
        self.crop = self.flip = None
        resize = max_size = None
        for step in transform.transforms:
            if isinstance(step, RandomResizedCropAndInterpolation):
                self.crop, size, interpolation = step, step.size, step.interpolation
            elif isinstance(step, T.RandomHorizontalFlip):
                self.flip = step
            elif isinstance(step, T.Resize):
                resize, max_size, interpolation = step.size, step.max_size, step.interpolation
            elif isinstance(step, T.CenterCrop):
                size = step.size
            elif isinstance(step, T.Normalize):
                mean, std = step.mean, step.std
            elif not isinstance(step, (MaybeToTensor, T.ToTensor)):
                raise ValueError(f"dataset.decode=gpu has no device equivalent of {step}")
        self.steps = DeviceSteps(
            size=tuple(size),
            resize=None if self.crop else tuple(np.atleast_1d(resize).tolist()),
            max_size=max_size,
            interpolation=interpolation,
            mean=tuple(torch.as_tensor(mean).tolist()),
            std=tuple(torch.as_tensor(std).tolist()),
        )

    def __call__(self, image: ImageFile) -> PendingImage:
        with open(image.path, "rb") as handle:
            data = bytearray(handle.read())
        try:
            header = Image.open(io.BytesIO(data))  # reads the header only
            pending = header.format == "JPEG" and header.mode in DEVICE_DECODABLE
        except (UnidentifiedImageError, OSError):
            pending = False
        if not pending:  # Pillow decodes it (a PNG under a .JPEG name, CMYK) or names it
            header = load_image(image.path)
            data = np.array(header)  # writable: the main process wraps it in a tensor
        item = PendingImage(data, image.path, self.steps)
        if self.crop is not None:
            item.box = self.crop.get_params(header, self.crop.scale, self.crop.ratio)
        if self.flip is not None:  # the step's own draw: pil's random stream exactly
            item.flip = bool(self.flip(FLIP_PROBE)[0, 0, 0] == 1)
        return item

    def __repr__(self) -> str:  # enters the cache key through the transform's repr
        return f"ReadForDevice({self.steps}, random_crop={self.crop}, flip={self.flip})"


class PendingBatch:
    """A collated batch of ``PendingImage`` (``views`` per item, or one): what the loader
    yields under ``dataset.decode=gpu``. Deliberately neither a tensor nor a dataclass, so
    Lightning's transfer to the device leaves it whole for ``finish_images``."""

    def __init__(self, items: list[PendingImage], steps: DeviceSteps, views: int | None) -> None:
        self.items, self.steps, self.views = items, steps, views

    def __len__(self) -> int:
        return len(self.items) // (self.views or 1)

    def finish(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            warn_cpu_decoding()
        decoded = decode_on(self.items, device)
        images = torch.stack(
            [self.steps.apply(image, item) for image, item in zip(decoded, self.items, strict=True)]
        )
        images = self.steps.normalize(images)
        return images if self.views is None else images.unflatten(0, (-1, self.views))


def decode_on(items: list[PendingImage], device: torch.device) -> list[torch.Tensor]:
    """Every item's RGB pixels ``[3, H, W]`` (uint8) on ``device``: the files in one batched
    ``decode_jpeg``; Pillow's pixels moved there. If the batch fails, image by image, and an
    image the device decoder refuses goes to Pillow (which decodes it, or names the file)."""
    files = [i for i, item in enumerate(items) if isinstance(item.data, bytearray)]
    encoded = [torch.frombuffer(items[i].data, dtype=torch.uint8) for i in files]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if files else []
    except RuntimeError:
        pairs = zip(files, encoded, strict=True)
        decoded = [decode_one(items[i], data, device) for i, data in pairs]
    pixels = dict(zip(files, decoded, strict=True))
    return [
        pixels[i] if i in pixels else torch.from_numpy(item.data).permute(2, 0, 1).to(device)
        for i, item in enumerate(items)
    ]


def decode_one(item: PendingImage, data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        log.warning("The device decoder refused %s (%s): Pillow decodes it.", item.path, error)
        pixels = np.asarray(load_image(item.path))
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


@functools.cache
def warn_cpu_decoding() -> None:
    log.warning(
        "dataset.decode=gpu on the CPU: the main process decodes and resizes every batch "
        "itself, more slowly than the loader workers of dataset.decode=pil; it is meant for a "
        "CUDA device."
    )


def collate(batch: list):
    """The loaders' ``collate_fn``: ``(PendingImage or its views, label)`` pairs into
    ``(PendingBatch, labels)``; anything else as torch's ``default_collate`` does."""
    first = batch[0][0] if batch and isinstance(batch[0], tuple) else None
    views = len(first) if isinstance(first, list) else None
    if not isinstance(first[0] if views else first, PendingImage):
        return default_collate(batch)
    items = [item for image, _ in batch for item in (image if views else [image])]
    (steps,) = {item.steps for item in items}  # one transform per loader
    labels = default_collate([label for _, label in batch])
    return PendingBatch(items, steps, views), labels


def stack_views(images: Sequence) -> torch.Tensor | list[PendingImage]:
    """The views of one image as one item: stacked tensors, or the pending images' list."""
    if isinstance(images[0], PendingImage):
        return list(images)
    return torch.stack(list(images))


def finish_images(images, device) -> torch.Tensor:
    """A loader's images on ``device``, ready for the backbone: a tensor moved there, or a
    ``PendingBatch`` decoded and transformed there. Every loop over images calls this."""
    if isinstance(images, PendingBatch):
        return images.finish(torch.device(device))
    return images.to(device, non_blocking=True)
