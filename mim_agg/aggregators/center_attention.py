"""Centre attention ("Beyond [cls]", its ``ca1``..``ca4``): patches weighted by the attention
that the central ``k x k`` window of patches pays them.

The math of the aggregator, from the authors' code (gmum/beyond_cls ``models_vit.py``,
``return_features == "ca<k>"``; the same in billpsomas/efficient-probing):

1. ``A``: the probed block's attention, averaged over heads, patch rows and patch columns
   only (``attn.mean(dim=1)[:, 1:, 1:]``; rows are *not* renormalised after ``[cls]``'s
   column is dropped).
2. The window: rows and columns ``[c - ceil(k/2), c + floor(k/2))`` with ``c = side // 2``.
   On an even grid this is the centred window; on an odd grid with odd ``k`` it sits one
   patch up and left of the centre (their rule, kept; ``center_crop`` centres it).
3. ``a = mean of A's window rows`` (``[B, N]``), ``w = a / (sum(a) + 1e-6)``.
4. The representation is ``mean_i w_i z_i`` over the ``N`` patches: the weighted *sum*
   divided by ``N`` (their ``(fm * attn_ss.unsqueeze(2)).mean(dim=1)``; kept).

The token source keeps what ``window_attention`` gives (``Tokens.center_attn``: the head-mean
attention rows of the largest window any head asks for, ``TokenRequest.center_rows``); windows
of smaller ``k`` nest inside it (``inner_window``), and ``center_attention`` is what the
aggregator computes from them. The source-side rule (``center_window``, ``window_attention``)
lives with the token hand-over, ``mim_agg.backbones.tokens``.
"""

from __future__ import annotations

import math

import torch

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.backbones.tokens import (
    TokenLayout,
    TokenRequest,
    Tokens,
    center_window,
    window_attention,
)
from mim_agg.errors import ConfigError

__all__ = [
    "CenterAttention",
    "center_attention",
    "center_attention_weights",
    "center_window",
    "inner_window",
    "window_attention",
]


def inner_window(window_attn: torch.Tensor, outer: int, k: int) -> torch.Tensor:
    """The rows of the ``k``-window inside ``window_attn``, the rows of the ``outer``-window
    (``[B, outer**2, N]`` -> ``[B, k**2, N]``): windows nest, the smaller starting
    ``ceil(outer/2) - ceil(k/2)`` rows and columns in, whatever the grid's side."""
    if not 1 <= k <= outer:
        raise ConfigError(f"aggregator.k={k} must lie in [1, {outer}] (the window kept).")
    start = (outer + 1) // 2 - (k + 1) // 2
    square = window_attn.unflatten(1, (outer, outer))
    return square[:, start : start + k, start : start + k].flatten(1, 2)


def center_attention_weights(window_attn: torch.Tensor) -> torch.Tensor:
    """Patch weights ``[B, N]`` from the window's attention rows ``[B, k*k, N]``: their mean,
    divided by its sum plus 1e-6 (the authors' epsilon)."""
    mean = window_attn.mean(dim=1)
    return mean / (mean.sum(dim=-1, keepdim=True) + 1e-6)


def center_attention(patches: torch.Tensor, window_attn: torch.Tensor) -> torch.Tensor:
    """The representation ``[B, D]``: ``mean_i w_i z_i`` over the ``N`` patches ``[B, N, D]``
    (the weighted sum over ``N``, as the authors compute it)."""
    weights = center_attention_weights(window_attn)
    return torch.bmm(weights.unsqueeze(1).to(patches.dtype), patches).squeeze(1) / patches.shape[1]


@register("center_attn")
class CenterAttention(Aggregator):
    """Patches weighted by the head-mean attention that the central ``k x k`` window of patches
    pays them in the probed block ("Beyond [cls]", its ``ca<k>``): no parameters, no ``[cls]``.

    Options:
        k: the window's side, on both grid axes from 1 to twice half the side (the authors'
            window, ``center_window``, must fit the grid). The authors ran ``k`` = 1..4 and
            name no best; the default 2 is the centred window of an even grid (14 x 14 at
            ViT-B/16, 224 px) and fits every grid from 2 x 2.
    """

    def __init__(self, layout: TokenLayout, *, k: int = 2):
        super().__init__(layout)
        rows, columns = layout.grid
        center_window(rows, k)
        center_window(columns, k)
        self.k = k

    def request(self) -> TokenRequest:
        return TokenRequest(tokens=True, center_rows=self.k)

    def window_rows(self, tokens: Tokens) -> torch.Tensor:
        """This window's attention rows ``[B, k*k, N]``, from the (possibly larger) window the
        source kept."""
        kept = tokens.require("center_attn")
        return inner_window(kept, math.isqrt(kept.shape[1]), self.k)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return center_attention(tokens.patches, self.window_rows(tokens))

    def pooling_weights(self, tokens: Tokens) -> torch.Tensor:
        """The weight ``forward`` gives each patch: ``w_i / N`` (the authors' mean over
        patches of ``w_i z_i``)."""
        return center_attention_weights(self.window_rows(tokens)) / self.num_patches
