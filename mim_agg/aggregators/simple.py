"""Parameter-free aggregators: the ``[cls]`` token, the patch mean, both, and the summary."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import Aggregator, register


@register("cls")
class ClsToken(Aggregator):
    """The ``[cls]`` token: the standard linear-probing input."""

    needs_cls = True

    def forward(self, tokens):
        return tokens.cls


@register("mean")
class MeanPatches(Aggregator):
    """Uniform average of the patch tokens (registers and ``[cls]`` excluded)."""

    def forward(self, tokens):
        return tokens.patches.mean(dim=1)

    def pooling_weights(self, tokens):
        patches = tokens.patches
        shape = (len(patches), self.num_patches)
        return torch.full(shape, 1.0 / self.num_patches, dtype=patches.dtype, device=patches.device)


@register("cls_mean")
class ClsAndMean(Aggregator):
    """``[cls]`` concatenated with the patch mean (MAE/DINOv2-style linear probe input)."""

    needs_cls = True

    def __init__(self, layout):
        super().__init__(layout)
        self.out_dim = 2 * layout.dim

    def forward(self, tokens):
        return torch.cat([tokens.cls, tokens.patches.mean(dim=1)], dim=-1)


@register("summary")
class SummaryTokens(Aggregator):
    """The summary tokens concatenated (``backbone.summary_tokens``): RADIO's one per teacher,
    what its authors' k-NN and linear probe read (and efficient-probing's); the ``[cls]``
    alone where a backbone names no more."""

    needs_cls = True

    def __init__(self, layout):
        super().__init__(layout)
        self.out_dim = layout.num_summary_tokens * layout.dim

    def forward(self, tokens):
        return tokens.summary.flatten(1)
