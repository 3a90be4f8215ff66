"""Frozen ViT backbones from timm, the token sources built on them, and the token contract."""

from mim_agg.backbones import capi, franca  # noqa: F401  (register capi_vitl14, vit_large_patch14_franca)
from mim_agg.backbones.frozen import FrozenBackbone
from mim_agg.backbones.source import LiveTokens, TokenSource
from mim_agg.backbones.tokens import TokenLayout, TokenRequest, Tokens

__all__ = [
    "FrozenBackbone",
    "LiveTokens",
    "TokenLayout",
    "TokenRequest",
    "TokenSource",
    "Tokens",
]
