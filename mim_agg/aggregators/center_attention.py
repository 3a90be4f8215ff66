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

The token source today hands over the ``[cls]`` attention row only, so the aggregator is not
registered yet: ``window_attention`` is what the source would keep per image (the head-mean
attention rows of the largest window any head asks for; windows of smaller ``k`` nest inside
it, see ``inner_window``), ``center_attention`` what the aggregator computes from them.
"""

from __future__ import annotations

import torch

from mim_agg.backbones.tokens import TokenLayout
from mim_agg.errors import ConfigError


def center_window(side: int, k: int) -> slice:
    """The authors' central window of a grid side: ``[side//2 - ceil(k/2), side//2 +
    floor(k/2))``; refused where it would leave the grid."""
    start = side // 2 - (k + 1) // 2
    if k < 1 or start < 0:
        raise ConfigError(
            f"aggregator.k={k} must lie in [1, {2 * (side // 2)}] on a grid of side {side}."
        )
    return slice(start, start + k)


def window_attention(attn: torch.Tensor, layout: TokenLayout, k: int) -> torch.Tensor:
    """From the probed block's full attention ``[B, H, T, T]`` (``T = P + N``), the head-mean
    attention that each patch of the central ``k x k`` window pays every patch: ``[B, k*k, N]``,
    window rows in row-major order, prefix tokens' rows and columns left out, rows not
    renormalised."""
    rows, columns = layout.grid
    prefix = layout.num_prefix_tokens
    patch_attn = attn.mean(dim=1)[:, prefix:, prefix:]  # [B, N, N]
    grid = patch_attn.unflatten(1, (rows, columns))  # [B, rows, columns, N]
    window = grid[:, center_window(rows, k), center_window(columns, k)]
    return window.flatten(1, 2)


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
