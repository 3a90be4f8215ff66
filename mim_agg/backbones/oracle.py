"""Another frozen model's ``[cls]`` attention, mapped onto the probed backbone's patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mim_agg.backbones.frozen import FrozenBackbone
from mim_agg.backbones.tokens import TokenRequest
from mim_agg.errors import ConfigError


class AttentionOracle(nn.Module):
    """Runs a second frozen ViT on the same images and returns its last-block, head-averaged
    ``[cls]`` -> patch attention, renormalised over patches, on the probed backbone's grid.

    Images arrive normalised for the probed backbone; they are re-normalised for the oracle.
    A different patch grid (e.g. patch 14 vs 16) is resampled bilinearly.
    """

    def __init__(
        self, arch: str, weights: str | None, img_size: int, grid: tuple[int, int], mean, std
    ) -> None:
        super().__init__()
        self.model = FrozenBackbone(arch, weights, block=-1, img_size=img_size)
        if not self.model.layout.has_cls:
            raise ConfigError(f"The attention oracle {arch} has no [cls] token to attend with.")
        self.model.provide(TokenRequest(cls_attn=True))
        self.grid = grid
        scale = torch.tensor(std) / torch.tensor(self.model.std)
        shift = (torch.tensor(mean) - torch.tensor(self.model.mean)) / torch.tensor(self.model.std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model(images * self.scale.to(images.dtype) + self.shift.to(images.dtype))
        attention = tokens.cls_attn.mean(dim=1)
        own_grid = tokens.layout.grid
        if tuple(own_grid) != tuple(self.grid):
            attention = F.interpolate(
                attention.unflatten(1, own_grid).unsqueeze(1),
                size=self.grid,
                mode="bilinear",
                align_corners=False,
            ).flatten(1)
        return attention / attention.sum(dim=-1, keepdim=True)
