"""Per-block attention statistics of a ViT, streamed over any number of images.

Definitions (block l, image b, head h; A the softmax attention, rows = queries; token 0 =
``[cls]``; "patches" = the N patch tokens, registers excluded; eps = 1e-6;
m_i = sum_{j in patches} A[i, j]):

    cls_self_attn        A[0, 0]
    patch_self_attn      mean_i A[i, i]
    cls_self_attn_rel    A[0, 0] / (m_0 + eps)
    patch_self_attn_rel  mean_i A[i, i] / (m_i + eps)
    cls_to_patch_attn    mean_j A[0, j]
    patch_to_cls_attn    mean_i A[i, 0]
    cls_patch_entropy    H_0          with P_i = A[i, patches] / (m_i + eps),
    patch_patch_entropy  mean_i H_i        H_i = -sum_j P_ij log(P_ij + eps)   (nats)
    cls_update_ratio     ||y_0|| / (||x_0|| + eps)
    patch_update_ratio   mean_i ||y_i|| / (||x_i|| + eps)

with i, j over patches, x the block's input and y the attention branch output added to it.
Attention statistics are averaged over images and heads, the ratios over images.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6
CLS_STATS = (
    "cls_self_attn",
    "cls_self_attn_rel",
    "cls_to_patch_attn",
    "patch_to_cls_attn",
    "cls_patch_entropy",
)
PATCH_STATS = ("patch_self_attn", "patch_self_attn_rel", "patch_patch_entropy")
RATIO_STATS = ("cls_update_ratio", "patch_update_ratio")


def attention_statistics(attn: torch.Tensor, num_prefix_tokens: int, has_cls: bool):
    """Statistics of one block's attention ``[B, H, T, T]`` as ``{name: [B, H]}``."""
    attn = attn.double()
    patch_slice = slice(num_prefix_tokens, None)
    patch_rows = attn[:, :, patch_slice]  # patch queries
    mass = patch_rows[..., patch_slice].sum(-1)  # m_i, [B, H, N]
    self_attn = patch_rows[..., patch_slice].diagonal(dim1=-2, dim2=-1)  # A[i, i]
    stats = {
        "patch_self_attn": self_attn.mean(-1),
        "patch_self_attn_rel": (self_attn / (mass + EPS)).mean(-1),
        "patch_patch_entropy": _entropy(patch_rows[..., patch_slice], mass).mean(-1),
    }
    if has_cls:
        cls_row = attn[:, :, 0]
        cls_mass = cls_row[..., patch_slice].sum(-1)
        stats |= {
            "cls_self_attn": cls_row[..., 0],
            "cls_self_attn_rel": cls_row[..., 0] / (cls_mass + EPS),
            "cls_to_patch_attn": cls_row[..., patch_slice].mean(-1),
            "patch_to_cls_attn": patch_rows[..., 0].mean(-1),
            "cls_patch_entropy": _entropy(cls_row[..., patch_slice], cls_mass),
        }
    return stats


def update_ratios(x: torch.Tensor, y: torch.Tensor, num_prefix_tokens: int, has_cls: bool):
    """Norm of the attention update over the norm of the residual stream, ``{name: [B]}``."""
    ratio = y.double().norm(dim=-1) / (x.double().norm(dim=-1) + EPS)
    stats = {"patch_update_ratio": ratio[:, num_prefix_tokens:].mean(-1)}
    if has_cls:
        stats["cls_update_ratio"] = ratio[:, 0]
    return stats


def _entropy(rows: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    probs = rows / (mass.unsqueeze(-1) + EPS)
    return -(probs * (probs + EPS).log()).sum(-1)


class StatisticsAccumulator:
    """Running sums of the statistics per block (and head): memory does not grow with images."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.sums: dict[str, list[torch.Tensor | float]] = {}
        self.num_images = 0

    def add(self, block: int, stats: dict[str, torch.Tensor]) -> None:
        """Add one block's per-image statistics (``[B, H]`` or ``[B]``) of one batch."""
        for name, values in stats.items():
            per_block = self.sums.setdefault(name, [0.0] * self.num_blocks)
            per_block[block] = per_block[block] + values.sum(0).cpu()

    def count(self, num_images: int) -> None:
        self.num_images += num_images

    def result(self, num_patches: int) -> dict:
        """``attention_stats.json``'s body: per-block means, and per head where heads exist."""
        means = {name: [s / self.num_images for s in blocks] for name, blocks in self.sums.items()}
        order = [n for n in (*CLS_STATS, *PATCH_STATS, *RATIO_STATS) if n in means]
        return {
            "num_images": self.num_images,
            "max_entropy": math.log(num_patches),
            "stats": {n: [float(torch.as_tensor(b).mean()) for b in means[n]] for n in order},
            "per_head": {
                n: [torch.as_tensor(b).tolist() for b in means[n]]
                for n in order
                if n not in RATIO_STATS
            },
        }
