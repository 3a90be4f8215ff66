"""Fixed poolings over the patch grid: a central window, the maximum, the generalized mean."""

from __future__ import annotations

import torch
from torch import nn

from mim_agg.aggregators.base import Aggregator, register, square_side
from mim_agg.errors import ConfigError


@register("center_crop")
class CenterCrop(Aggregator):
    """Mean of the central ``k x k`` window of patches: object-centric datasets need no search.

    Options:
        k: the window's side, from 1 to the grid side.
    """

    def __init__(self, layout, *, k: int = 4):
        super().__init__(layout)
        side = square_side(layout, self.name)
        if not 1 <= k <= side:
            raise ConfigError(f"aggregator.k={k} must lie in [1, {side}] (the grid side).")
        start = (side - k) // 2
        window = torch.zeros(side, side)
        window[start : start + k, start : start + k] = 1.0 / (k * k)
        self.register_buffer("window", window.flatten(), persistent=False)

    def forward(self, tokens):
        return tokens.patches.transpose(1, 2) @ self.window.to(tokens.all.dtype)

    def pooling_weights(self, tokens):
        return self.window.expand(len(tokens), -1)


@register("max")
class MaxPatches(Aggregator):
    """Channel-wise maximum over the patch tokens."""

    def forward(self, tokens):
        return tokens.patches.amax(dim=1)


@register("gem")
class GeneralizedMean(Aggregator):
    """Generalized mean ``(mean_i x_i^p)^(1/p)`` over patches with a learnable ``p``.

    ViT tokens are signed, so the power is sign-preserving (``sign(x) |x|^p``): ``p = 1`` is
    the mean exactly, and large ``p`` approaches the signed extreme value.

    Options:
        p: the exponent's starting value (positive); it is trained with the head.
    """

    def __init__(self, layout, *, p: float = 3.0):
        super().__init__(layout)
        if p <= 0:
            raise ConfigError(f"aggregator.p={p} must be positive.")
        self.p = nn.Parameter(torch.tensor(float(p)))

    def forward(self, tokens):
        p = self.p.clamp(min=1e-2)
        pooled = _signed_power(tokens.patches, p).mean(dim=1)
        return _signed_power(pooled, 1.0 / p)


def _signed_power(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return x.sign() * x.abs().clamp(min=1e-6).pow(p)
