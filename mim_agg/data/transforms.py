"""The paper's transforms, built by timm.

Train: RandomResizedCrop(img_size, bicubic) + horizontal flip, nothing else (no colour jitter).
Eval: Resize(img_size / crop_pct) + CenterCrop(img_size), i.e. Resize(256) + CenterCrop(224).
"""

from __future__ import annotations

from timm.data import create_transform
from torchvision import transforms as T

from mim_agg.data.sources import to_rgb


def build_transform(train: bool, img_size: int, mean, std, crop_pct: float = 0.875) -> T.Compose:
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
    return T.Compose([T.Lambda(_to_rgb), timm_transform])


def _to_rgb(image):
    """Grayscale sets (Fashion-MNIST, digits) enter ViTs as three identical channels."""
    return to_rgb(image)
