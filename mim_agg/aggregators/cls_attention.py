"""Aggregators that reuse the backbone's own ``[cls]`` attention to choose patches."""

from __future__ import annotations

import torch

from mim_agg.aggregators.base import WeightedPatchPool, register
from mim_agg.errors import ConfigError


@register("attn_mean")
class ClsAttentionMean(WeightedPatchPool):
    """Patches weighted by the head-averaged ``[cls]`` attention, renormalised over patches."""

    needs = ("attn",)
    needs_cls = True

    def pooling_weights(self, tokens, attn=None):
        weights = self.cls_attention(attn)
        return weights / weights.sum(dim=-1, keepdim=True)


@register("topk_attn")
class TopKClsAttention(WeightedPatchPool):
    """Mean of the ``k`` patches the ``[cls]`` token attends to most (heads averaged)."""

    needs = ("attn",)
    needs_cls = True

    def __init__(self, dim, num_patches, num_prefix_tokens=1, has_cls=None, *, k: int = 16):
        super().__init__(dim, num_patches, num_prefix_tokens, has_cls)
        if not 1 <= k <= num_patches:
            raise ConfigError(f"aggregator.k={k} must lie in [1, {num_patches}] (the patch count).")
        self.k = k

    def pooling_weights(self, tokens, attn=None):
        scores = self.cls_attention(attn)
        top = scores.topk(self.k, dim=-1).indices
        return scores.new_zeros(scores.shape).scatter_(-1, top, 1.0 / self.k)


@register("attn_min_entropy")
class MinEntropyHeadAttention(WeightedPatchPool):
    """Patches weighted by the ``[cls]`` attention of the most selective head, per image.

    Each head's ``[cls]`` -> patch attention is renormalised over patches; the head with the
    lowest entropy (the sharpest map) supplies the weights.
    """

    needs = ("attn",)
    needs_cls = True

    def pooling_weights(self, tokens, attn=None):
        per_head = self.cls_attention_per_head(attn)
        per_head = per_head / per_head.sum(dim=-1, keepdim=True)
        entropy = -(per_head * per_head.clamp(min=1e-12).log()).sum(dim=-1)
        sharpest = entropy.argmin(dim=1)
        return per_head[torch.arange(len(per_head), device=per_head.device), sharpest]


@register("oracle_attn")
class OracleClsAttention(WeightedPatchPool):
    """Patches weighted by the ``[cls]`` attention of *another* frozen model on the same
    images (default DINO ViT-B/16): does a better attention map alone fix MIM features?

    The oracle is built by the backbone stage from ``oracle_arch`` / ``oracle_weights``;
    this module only pools with the map it receives.
    """

    needs = ("oracle_attn",)

    def __init__(
        self,
        dim,
        num_patches,
        num_prefix_tokens=1,
        has_cls=None,
        *,
        oracle_arch: str = "vit_base_patch16_224",
        oracle_weights: str | None = "vit_base_patch16_224.dino",
    ):
        super().__init__(dim, num_patches, num_prefix_tokens, has_cls)
        self.oracle = (oracle_arch, oracle_weights)

    def pooling_weights(self, tokens, attn=None, *, oracle_attn):
        return oracle_attn
