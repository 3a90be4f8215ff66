"""Aggregators that reuse the backbone's own ``[cls]`` attention to choose patches."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import WeightedPatchPool, register
from mim_agg.backbones.tokens import TokenRequest
from mim_agg.errors import ConfigError


class ClsAttentionPool(WeightedPatchPool):
    """Patch weights from the probed block's ``[cls]`` -> patch attention, ``[B, H, N]``."""

    needs_cls = True

    def request(self) -> TokenRequest:
        return TokenRequest(tokens=True, cls_attn=True)


def head_mean(tokens) -> torch.Tensor:
    """Head-averaged ``[cls]`` -> patch attention, ``[B, N]``."""
    return tokens.require("cls_attn").mean(dim=1)


@register("attn_mean")
class ClsAttentionMean(ClsAttentionPool):
    """Patches weighted by the head-averaged ``[cls]`` attention, renormalised over patches."""

    def pooling_weights(self, tokens):
        weights = head_mean(tokens)
        return weights / weights.sum(dim=-1, keepdim=True)


@register("topk_attn")
class TopKClsAttention(ClsAttentionPool):
    """Mean of the ``k`` patches the ``[cls]`` token attends to most (heads averaged).

    Options:
        k: patches kept, from 1 to the patch count.
    """

    def __init__(self, layout, *, k: int = 16):
        super().__init__(layout)
        if not 1 <= k <= layout.num_patches:
            raise ConfigError(
                f"aggregator.k={k} must lie in [1, {layout.num_patches}] (the patch count)."
            )
        self.k = k

    def pooling_weights(self, tokens):
        scores = head_mean(tokens)
        top = scores.topk(self.k, dim=-1).indices
        return scores.new_zeros(scores.shape).scatter_(-1, top, 1.0 / self.k)


@register("attn_min_entropy")
class MinEntropyHeadAttention(ClsAttentionPool):
    """Patches weighted by the ``[cls]`` attention of the most selective head, per image.

    Each head's ``[cls]`` -> patch attention is renormalised over patches; the head with the
    lowest entropy (the sharpest map) supplies the weights.
    """

    def pooling_weights(self, tokens):
        per_head = tokens.require("cls_attn")
        per_head = per_head / per_head.sum(dim=-1, keepdim=True)
        entropy = -(per_head * per_head.clamp(min=1e-12).log()).sum(dim=-1)
        sharpest = entropy.argmin(dim=1)
        return per_head[torch.arange(len(per_head), device=per_head.device), sharpest]


@register("oracle_attn")
class OracleClsAttention(WeightedPatchPool):
    """Patches weighted by the ``[cls]`` attention of *another* frozen model on the same
    images (default DINO ViT-B/16): does a better attention map alone fix MIM features?

    The token source runs the oracle; this module only pools with the map it receives.

    Options:
        oracle_arch: the oracle's timm architecture.
        oracle_weights: a timm pretrained tag or a checkpoint file (None: random weights).
    """

    def __init__(
        self,
        layout,
        *,
        oracle_arch: str = "vit_base_patch16_224",
        oracle_weights: str | None = "vit_base_patch16_224.dino",
    ):
        super().__init__(layout)
        self.oracle = (oracle_arch, oracle_weights)

    def request(self) -> TokenRequest:
        return TokenRequest(tokens=True, oracle=self.oracle)

    def pooling_weights(self, tokens):
        return tokens.require("oracle_attn")
