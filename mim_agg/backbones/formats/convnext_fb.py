"""ConvNeXt in facebookresearch's layout: DINOv3's published ConvNeXts
(``dinov3_convnext_*_pretrain_lvd1689m-*.pth``, the plain state dict of ``ConvNeXt`` in
``dinov3/models/convnext.py``) and the original ConvNeXt's ``{"model": ...}`` files, for
timm's ``convnext_*``.

The authors' stem and downsamplings are ``downsample_layers`` (the stem is the first), a block
is ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``, ``gamma``; their ``norm`` is the final norm,
which DINOv3's model also registers as ``norms.3`` (the same module, saved twice). timm's own
filter reads this layout too, but its final ``norm`` became a head norm our strict load
refused, and it drops ``norms.*`` whatever they hold; here they must repeat the final norm, and
a key not placed keeps its name, so the strict load names it.
"""

from __future__ import annotations

import re

import torch

from mim_agg.backbones.formats import State, checkpoint_format
from mim_agg.errors import ConfigError

_MARKERS = ("downsample_layers.0.0.weight", "stages.0.0.dwconv.weight")
_DOWNSAMPLE = re.compile(r"downsample_layers\.(\d+)\.(.+)")
_BLOCK = re.compile(r"stages\.(\d+)\.(\d+)\.(.+)")
_BLOCK_RENAMED = {"dwconv.": "conv_dw.", "pwconv1.": "mlp.fc1.", "pwconv2.": "mlp.fc2."}


def state_of(checkpoint: dict) -> dict:
    """DINOv3's plain state dict, or the original ConvNeXt's under ``model``."""
    model = checkpoint.get("model")
    return model if isinstance(model, dict) else checkpoint


def is_convnext_fb(checkpoint: dict) -> bool:
    return all(marker in state_of(checkpoint) for marker in _MARKERS)


@checkpoint_format("convnext_fb", is_convnext_fb)
def convert_convnext_fb(checkpoint: dict) -> State:
    """timm's names. The final ``norm`` (the authors' norm of every token and of their pooled
    one) is timm's head norm, after pooling: a frozen encoder probing the last stage's map
    before it never reads it. ``norms.3`` must be that norm again (timm's filter would drop
    any ``norms.*`` unseen)."""
    state = state_of(checkpoint)
    for key, value in state.items():
        final = "norm." + key.split(".", 2)[-1]
        if key.startswith("norms.") and not _same(value, state.get(final)):
            raise ConfigError(
                f"Checkpoint key {key} is not the final norm again ({final}), as in "
                "DINOv3's ConvNeXt, where both name one module: this file is no published "
                "DINOv3 ConvNeXt; convert it with its own code, or pass a published file."
            )
    return {renamed(k): v for k, v in state.items() if not k.startswith("norms.")}


def renamed(key: str) -> str:
    if downsample := _DOWNSAMPLE.fullmatch(key):
        stage, rest = downsample.groups()
        return f"stem.{rest}" if stage == "0" else f"stages.{stage}.downsample.{rest}"
    if block := _BLOCK.fullmatch(key):
        stage, index, rest = block.groups()
        for old, new in _BLOCK_RENAMED.items():
            rest = new + rest.removeprefix(old) if rest.startswith(old) else rest
        return f"stages.{stage}.blocks.{index}.{rest}"
    if key.startswith("norm."):
        return f"head.{key}"  # timm's head norm
    if key.startswith("head."):
        return f"head.fc.{key.removeprefix('head.')}"  # the original ConvNeXt's classifier
    return key


def _same(value, other) -> bool:
    return (
        isinstance(other, torch.Tensor)
        and value.shape == other.shape
        and bool(value.eq(other).all())
    )
