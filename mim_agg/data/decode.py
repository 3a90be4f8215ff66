"""How image files become pixels: ``dataset.decode``.

- ``pil`` (the default, the reference): the source decodes every file with Pillow at full size,
  the transform resizes.
- ``turbo``: libjpeg-turbo through ``simplejpeg`` decodes JPEGs at full size: the same pixels
  as Pillow's (Pillow's wheels decode with libjpeg-turbo too, with the same IDCT and
  upsampling; ``tests/test_decode.py`` checks equality), for less CPU time (README, "Data path").
- ``turbo_dct``: as ``turbo``, and for the eval transform the IDCT itself downscales: each
  JPEG is decoded at the smallest of libjpeg-turbo's n/8 scales whose shorter side still
  reaches the eval resize (256 for 224 at crop_pct 0.875), so the bicubic resize filters fewer
  pixels. It changes pixels (measured against Pillow in ``scripts/benchmark.py``), so it is an
  option, never a default. Training crops are decoded at full size (a random-resized crop's
  scale is not known before decoding).

Under ``turbo*`` a file source's items stay encoded (``EncodedFiles``) and the transform's first
step decodes them (``TurboDecode``), at the size that transform needs (under ``gpu`` they stay
encoded until the device decodes them: ``device_decode.py``). A file whose RGB Pillow
computes its own way (a CMYK JPEG), that is no JPEG (a PNG under a .JPEG name) or that
libjpeg-turbo refuses (damaged) goes to Pillow, which decodes it as under ``pil`` or names it as
unreadable. Every value but ``pil`` names runs and caches; ``pil``
names neither, so runs and caches made before this option keep their names.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset

from mim_agg.data.sources import load_image, targets_of
from mim_agg.errors import ConfigError

DECODERS = ("pil", "turbo", "turbo_dct", "gpu")  # gpu: device_decode.py
DEFAULT_DECODE = "pil"
# The JPEG colour spaces whose RGB libjpeg-turbo computes as Pillow does; CMYK and YCCK (Adobe
# files, 22 of ImageNet's training images) Pillow converts its own way, so it decodes them.
PILLOWS_PIXELS = ("YCbCr", "Gray")


@dataclass(frozen=True)
class ImageFile:
    """An image file not decoded yet: the transform decodes it at the size it needs."""

    path: str


class EncodedFiles(Dataset):
    """A file source's images left encoded: ``(ImageFile, label)``. Its ``samples``, ``root``,
    ``targets`` and ``classes`` are the source's, so splits, checks and cache keys read it as
    they read the source."""

    def __init__(self, files: Dataset) -> None:
        self.samples = files.samples
        self.root = getattr(files, "root", "")
        self.targets = targets_of(files)
        self.classes = getattr(files, "classes", None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[ImageFile, int]:
        path, label = self.samples[index]
        return ImageFile(path), int(label)


def encoded(source: Dataset, decode: str, name: str) -> Dataset:
    """``source`` as ``decode`` needs it: itself under ``pil``, its files left encoded under
    ``turbo*`` and ``gpu``; a source without files (in-memory pixels) is refused by name."""
    if decode == "pil":
        return source
    if getattr(source, "samples", None) is None:
        raise ConfigError(
            f"dataset.decode={decode} decodes image files, but dataset {name!r} holds its "
            "images in memory (no files to decode); remove dataset.decode."
        )
    return EncodedFiles(source)


class TurboDecode:
    """The first step of a transform under ``dataset.decode=turbo*``: ``ImageFile`` -> 8-bit
    RGB PIL image. ``min_side``: decode at the smallest libjpeg-turbo scale whose shorter side
    is at least this (``turbo_dct``'s eval transform); None: full size."""

    def __init__(self, min_side: int | None = None) -> None:
        if importlib.util.find_spec("simplejpeg") is None:
            raise ConfigError(
                "dataset.decode=turbo and turbo_dct decode with libjpeg-turbo through the "
                "simplejpeg package, which is not installed: pip install simplejpeg (or pip "
                "install -e '.[fastjpeg]'), or use dataset.decode=pil."
            )
        self.min_side = min_side

    def __call__(self, image: ImageFile) -> Image.Image:
        import simplejpeg  # optional: imported where it decodes (a loader worker)

        side = self.min_side or 0
        try:
            with open(image.path, "rb") as handle:
                data = handle.read()
            if simplejpeg.decode_jpeg_header(data)[2] not in PILLOWS_PIXELS:
                return load_image(image.path)
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
        except (OSError, ValueError):  # unreadable, or not a JPEG: Pillow decodes it (a PNG
            return load_image(image.path)  # under a .JPEG name) or names it and the fix
        return Image.fromarray(pixels)

    def __repr__(self) -> str:  # enters the cache key through the transform's repr
        return f"TurboDecode(min_side={self.min_side})"
