"""The paper's transforms, built by timm.

Train: RandomResizedCrop(img_size, bicubic) + horizontal flip, nothing else (no colour jitter).
Eval: Resize(img_size / crop_pct) + CenterCrop(img_size), i.e. Resize(256) + CenterCrop(224).
The first step makes 8-bit RGB of what the source gives: a PIL image (``dataset.decode=pil``)
or a file that ``TurboDecode`` decodes (``turbo``, ``turbo_dct``: see ``decode.py``). Under
``gpu`` the worker reads the file and draws the random steps (``ReadForDevice``), and the
device computes the same steps on tensors (``device_decode.py``).
"""

from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T

from mim_agg.data.decode import DEFAULT_DECODE, TurboDecode
from mim_agg.data.device_decode import ReadForDevice
from mim_agg.data.sources import to_rgb


def build_transform(
    train: bool, img_size: int, mean, std, crop_pct: float = 0.875, decode: str = DEFAULT_DECODE
) -> T.Compose:
    timm_transform = create_transform(
        input_size=img_size,
        is_training=train,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
        hflip=0.5,
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )
    if decode == DEFAULT_DECODE:
        return T.Compose([T.Lambda(_to_rgb), timm_transform])
    if decode == "gpu":
        return T.Compose([ReadForDevice(timm_transform)])
    dct_side = resize_side(timm_transform) if decode == "turbo_dct" else None
    return T.Compose([TurboDecode(dct_side), timm_transform])


def resize_side(transform: T.Compose) -> int | None:
    """The shorter side the eval transform resizes to (``Resize(256)``); None for a transform
    without a resize (a training crop)."""
    sides = [step.size for step in transform.transforms if isinstance(step, T.Resize)]
    return int(sides[0]) if sides else None


def _to_rgb(image):
    """Grayscale sets (Fashion-MNIST, digits) enter ViTs as three identical channels."""
    return to_rgb(image)
