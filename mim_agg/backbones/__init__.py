"""Frozen ViT backbones from timm and the ``Tokens`` they hand downstream."""

from mim_agg.backbones.frozen import FrozenBackbone
from mim_agg.backbones.tokens import Tokens

__all__ = ["FrozenBackbone", "Tokens"]
