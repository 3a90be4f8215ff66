"""Aggregators over several blocks of the backbone."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.errors import ConfigError


@register("last_n_cls")
class LastBlocksCls(Aggregator):
    """``[cls]`` of the last ``n`` blocks concatenated, optionally with the patch mean of the
    probed block: DINOv2's linear-evaluation input."""

    needs = ("block_cls",)
    needs_cls = True

    def __init__(
        self,
        dim,
        num_patches,
        num_prefix_tokens=1,
        has_cls=None,
        *,
        n: int = 4,
        with_mean: bool = True,
    ):
        super().__init__(dim, num_patches, num_prefix_tokens, has_cls)
        if n < 1:
            raise ConfigError(f"aggregator.n={n} must be at least 1.")
        self.num_blocks = n
        self.with_mean = with_mean
        self.out_dim = dim * (n + int(with_mean))

    def forward(self, tokens, attn=None, *, block_cls):
        features = [block_cls[:, -self.num_blocks :].flatten(1)]
        if self.with_mean:
            features.append(self.patches(tokens).mean(dim=1))
        return torch.cat(features, dim=-1)
