"""Aggregators over several blocks of the backbone."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.backbones.tokens import TokenRequest
from mim_agg.errors import ConfigError


@register("last_n_cls")
class LastBlocksCls(Aggregator):
    """``[cls]`` of the last ``n`` blocks concatenated, optionally with the patch mean of the
    probed block: DINOv2's linear-evaluation input.

    Options:
        n: blocks whose ``[cls]`` is taken, ending at the probed one (``n = 1``: its ``[cls]``).
        with_mean: append the probed block's patch mean.
    """

    needs_cls = True

    def __init__(self, layout, *, n: int = 4, with_mean: bool = True):
        super().__init__(layout)
        if n < 1:
            raise ConfigError(f"aggregator.n={n} must be at least 1.")
        self.n = n
        self.with_mean = with_mean
        self.out_dim = layout.dim * (n + int(with_mean))

    def request(self) -> TokenRequest:
        return TokenRequest(tokens=self.with_mean or self.n == 1, cls_blocks=self.n)

    def forward(self, tokens):
        if self.n == 1:
            features = [tokens.cls]
        else:
            features = [tokens.require("block_cls")[:, -self.n :].flatten(1)]
        if self.with_mean:
            features.append(tokens.patches.mean(dim=1))
        return torch.cat(features, dim=-1)
