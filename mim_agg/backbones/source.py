"""Token sources: where the tokens of a batch come from, for one merged ``TokenRequest``.

Downstream stages (probe, k-NN, analysis) call ``source(inputs)`` and get ``Tokens``; they never
know whether a live backbone or a cache on disk (``mim_agg.cache``) made them.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import nn

from mim_agg.backbones.frozen import FrozenBackbone
from mim_agg.backbones.oracle import AttentionOracle
from mim_agg.backbones.tokens import TokenLayout, TokenRequest, Tokens


class TokenSource(nn.Module):
    """``forward(inputs) -> Tokens`` holding every field the aggregators asked for, shaped by
    ``layout``.

    ``inputs`` is what the source's data loader yields besides the targets: images for a
    live source, stored fields for a cache.
    """

    layout: TokenLayout


class LiveTokens(TokenSource):
    """A frozen backbone, and the attention oracle when a request names one, run per batch.

    ``requests`` maps blocks (``0 .. backbone.block``) to what each must provide; one pass
    serves them all, so a layer-wise sweep extracts every block's cache for the cost of the
    deepest. ``forward`` gives the probed block's ``Tokens`` (``backbone.block``, laid out as
    ``layout``), ``forward_blocks`` every requested block's.
    """

    def __init__(self, backbone: FrozenBackbone, requests: dict[int, TokenRequest]) -> None:
        super().__init__()
        for block, request in requests.items():
            backbone.provide(request, block)
        merged = functools.reduce(operator.or_, requests.values())
        self.backbone = backbone
        self.layout = backbone.layout
        self.oracle = build_oracle(backbone, merged)
        self.oracle_blocks = {b for b, r in requests.items() if r.oracle is not None}

    def forward(self, images: torch.Tensor) -> Tokens:
        return self.forward_blocks(images)[self.backbone.block]

    @torch.inference_mode()
    def forward_blocks(self, images: torch.Tensor) -> dict[int, Tokens]:
        tokens = self.backbone.forward_blocks(images)
        if self.oracle is not None:
            oracle_attn = self.oracle(images)  # one oracle pass serves every block
            for block in self.oracle_blocks:
                tokens[block].oracle_attn = oracle_attn
        return tokens


def build_oracle(backbone: FrozenBackbone, request: TokenRequest) -> AttentionOracle | None:
    """The attention oracle ``request`` names, on ``backbone``'s images and patch grid."""
    if request.oracle is None:
        return None
    arch, weights = request.oracle
    return AttentionOracle(
        arch, weights, backbone.img_size, backbone.layout.grid, backbone.mean, backbone.std
    )
