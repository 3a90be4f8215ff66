"""The analysis as pictures (matplotlib, PNG).

Figures are built with matplotlib's object API (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.manifold import TSNE

LINE_STYLES = {"mim": "-", "jea": "--", "vlm": "-.", "none": ":"}  # by backbone.family
FAMILY_LABELS = {"mim": "MIM", "jea": "JEA", "vlm": "VLM", "none": "random"}
TITLES = {
    "cls_self_attn": "[cls] -> [cls]",
    "cls_self_attn_rel": "[cls] -> [cls] (rel.)",
    "cls_to_patch_attn": "[cls] -> patch",
    "patch_to_cls_attn": "patch -> [cls]",
    "cls_patch_entropy": "[cls] entropy (nats)",
    "patch_self_attn": "patch -> self",
    "patch_self_attn_rel": "patch -> self (rel.)",
    "patch_patch_entropy": "patch entropy (nats)",
    "cls_update_ratio": "[cls] ||attn out|| / ||x||",
    "patch_update_ratio": "patch ||attn out|| / ||x||",
}


def plot_statistics(results: dict[str, dict], path: Path) -> Path:
    """One panel per statistic, value per block, one line per backbone, styled by its
    ``family`` from config (MIM solid, JEA dashed, VLM dash-dotted, random dotted)."""
    names = [n for n in TITLES if any(n in r["stats"] for r in results.values())]
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label, result in results.items():
            if name in result["stats"]:
                values = result["stats"][name]
                family = result.get("family") or "unknown"  # files from before backbone.family
                style = LINE_STYLES.get(family, (0, (1, 3)))
                ax.plot(
                    range(1, len(values) + 1),
                    values,
                    linestyle=style,
                    marker=".",
                    label=f"{label} ({FAMILY_LABELS.get(family, family)})",
                )
        if name.endswith("entropy"):
            for max_entropy in {r["max_entropy"] for r in results.values()}:
                ax.axhline(
                    max_entropy, color="gray", linestyle=":", label=f"ln N = {max_entropy:.3f}"
                )
        ax.set_title(TITLES[name], fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def plot_attention_maps(images: torch.Tensor, maps: dict[str, torch.Tensor], path: Path) -> Path:
    """Each image beside its attention-like maps (``{title: [n, h, w]}``), upsampled onto it."""
    n = len(images)
    cols = 1 + len(maps)
    fig = Figure(figsize=(2.4 * cols, 2.4 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    pictures = images.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()
    size = images.shape[-2:]
    for row in range(n):
        axes[row, 0].imshow(pictures[row])
        axes[row, 0].set_title("image" if row == 0 else "", fontsize=9)
        for col, (title, values) in enumerate(maps.items(), start=1):
            heat = F.interpolate(values[row][None, None].float(), size=size, mode="bilinear")[0, 0]
            axes[row, col].imshow(pictures[row])
            axes[row, col].imshow(heat.cpu().numpy(), cmap="inferno", alpha=0.6)
            axes[row, col].set_title(title if row == 0 else "", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_embedding(features: dict[str, torch.Tensor], labels: np.ndarray, path: Path) -> Path:
    """t-SNE of each aggregator's features, coloured by class."""
    fig = Figure(figsize=(4 * len(features), 4))
    axes = fig.subplots(1, len(features), squeeze=False)
    for ax, (name, values) in zip(axes.flat, features.items(), strict=True):
        perplexity = max(2.0, min(30.0, (len(values) - 1) / 3))
        points = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(
            values.float().cpu().numpy()
        )
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6)
        ax.set_title(f"t-SNE of {name} features", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path
