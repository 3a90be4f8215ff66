"""Parameter-free aggregators: the ``[cls]`` token, the patch mean, and both."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import Aggregator, register


@register("cls")
class ClsToken(Aggregator):
    """The ``[cls]`` token: the standard linear-probing input."""

    needs_cls = True

    def forward(self, tokens, attn=None):
        return self.cls(tokens)


@register("mean")
class MeanPatches(Aggregator):
    """Uniform average of the patch tokens (registers and ``[cls]`` excluded)."""

    def forward(self, tokens, attn=None):
        return self.patches(tokens).mean(dim=1)

    def pooling_weights(self, tokens, attn=None):
        batch = tokens.shape[0]
        return tokens.new_full((batch, self.num_patches), 1.0 / self.num_patches)


@register("cls_mean")
class ClsAndMean(Aggregator):
    """``[cls]`` concatenated with the patch mean (MAE/DINOv2-style linear probe input)."""

    needs_cls = True

    def __init__(self, dim, num_patches, num_prefix_tokens=1, has_cls=None):
        super().__init__(dim, num_patches, num_prefix_tokens, has_cls)
        self.out_dim = 2 * dim

    def forward(self, tokens, attn=None):
        return torch.cat([self.cls(tokens), self.patches(tokens).mean(dim=1)], dim=-1)
