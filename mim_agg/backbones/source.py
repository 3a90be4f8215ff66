"""Token sources: where the tokens of a batch come from, for one merged ``TokenRequest``.

Downstream stages (probe, k-NN, analysis) call ``source(inputs)`` and get ``Tokens``; they never
know whether a live backbone or a cache on disk (``mim_agg.cache``) made them.
"""

from __future__ import annotations

import torch
from torch import nn

from mim_agg.backbones.frozen import FrozenBackbone
from mim_agg.backbones.oracle import AttentionOracle
from mim_agg.backbones.tokens import TokenLayout, TokenRequest, Tokens


class TokenSource(nn.Module):
    """``forward(inputs) -> Tokens`` holding every field of ``request``, shaped by ``layout``.

    ``inputs`` is what the source's data loader yields besides the targets: images for a
    live source, stored fields for a cache.
    """

    layout: TokenLayout
    request: TokenRequest


class LiveTokens(TokenSource):
    """A frozen backbone, and the attention oracle when a head asks for one, run per batch."""

    def __init__(self, backbone: FrozenBackbone, request: TokenRequest) -> None:
        super().__init__()
        backbone.provide(request)
        self.backbone = backbone
        self.layout = backbone.layout
        self.request = request
        self.oracle = None
        if request.oracle is not None:
            arch, weights = request.oracle
            self.oracle = AttentionOracle(
                arch, weights, backbone.img_size, self.layout.grid, backbone.mean, backbone.std
            )

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Tokens:
        tokens = self.backbone(images)
        if self.oracle is not None:
            tokens.oracle_attn = self.oracle(images)
        return tokens
