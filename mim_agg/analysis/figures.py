"""The analysis as pictures (matplotlib, PNG), each readable without the run that made it.

Every figure's title names the backbone (architecture and weights), the dataset, the split and
how many images it shows; axes say what they measure and in which unit; maps that are compared
share one colour scale with a colorbar on which the uniform level 1/N is marked, so that
near-uniform attention looks uniform; classes have a legend (a colorbar of class ids when there
are too many for one). Figures are built with matplotlib's object API (no pyplot): no global
state, no display needed. The plotting functions return the figure, ``save_figure`` writes it.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, ScalarFormatter
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from mim_agg.report.runs import Job
from mim_agg.report.table import constant_context

DPI = 100  # small files that stay legible at their saved size
CONTEXT_KEYS = ("backbone.arch", "backbone.weights", "dataset.name", "analysis.split")
LINE_STYLES = {  # by backbone.family (mim_agg.validation.FAMILIES)
    "mim": "-",
    "jea": "--",
    "hybrid": (0, (5, 1, 1, 1, 1, 1)),  # dash-dot-dot
    "vlm": "-.",
    "generative": (0, (8, 2)),  # long dashes
    "none": ":",
}
FAMILY_LABELS = {  # the leaderboard's names
    "mim": "MIM",
    "jea": "JEA",
    "hybrid": "Hybrid",
    "vlm": "VLM",
    "generative": "GEN",
    "none": "random",
}
TITLES = {
    "cls_self_attn": "[cls] -> [cls]",
    "cls_self_attn_rel": "[cls] -> [cls] (rel.)",
    "cls_to_patch_attn": "[cls] -> patch",
    "patch_to_cls_attn": "patch -> [cls]",
    "cls_patch_entropy": "[cls] entropy over patches",
    "patch_self_attn": "patch -> self",
    "patch_self_attn_rel": "patch -> self (rel.)",
    "patch_patch_entropy": "patch entropy over patches",
    "cls_update_ratio": "[cls] ||attn out|| / ||x||",
    "patch_update_ratio": "patch ||attn out|| / ||x||",
}
Y_LABELS = {"entropy": "entropy (nats)", "ratio": "norm ratio (no unit)"}
ATTENTION_LABEL = "attention weight (0-1)"
MAX_LEGEND_CLASSES = 20  # more classes get a colorbar of class ids instead of a legend


def context(configs: list[dict]) -> str:
    """What every run shares among ``CONTEXT_KEYS``, as a title line
    (``backbone.arch=vit_tiny_patch16_224, backbone.weights=random, ...``); ``configs`` are
    result configs (``mim_agg.runs.identity.result_config``). What differs labels the lines."""
    shared = constant_context([Job("", "done", config=c) for c in configs], CONTEXT_KEYS)
    return ", ".join(f"{key}={value}" for key, value in shared.items())


def statistics_figure(results: dict[str, dict], title: str) -> Figure:
    """One panel per statistic against the block, one line per run (``{label: result}``),
    styled by its ``family`` (MIM solid, JEA dashed, hybrid dash-dot-dotted, VLM dash-dotted,
    generative long-dashed, random dotted). Every
    panel starts at 0, so that a statistic which barely moves looks flat; entropy panels mark
    their maximum ln N, which the legend explains."""
    names = [n for n in TITLES if any(n in r["stats"] for r in results.values())]
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(2.9 * cols, 2.3 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label, result in results.items():
            if name in result["stats"]:
                values = result["stats"][name]
                family = result.get("family") or "unknown"  # files from before backbone.family
                ax.plot(
                    range(len(values)),  # numbered as backbone.block counts them
                    values,
                    linestyle=LINE_STYLES.get(family, (0, (1, 3))),
                    marker=".",
                    label=f"{label} ({FAMILY_LABELS.get(family, family)})",
                )
        if name.endswith("entropy"):
            for max_entropy in sorted({r["max_entropy"] for r in results.values()}):
                patches = round(math.exp(max_entropy))
                ax.axhline(
                    max_entropy,
                    color="gray",
                    linestyle=":",
                    label=f"uniform over N = {patches} patches: ln N = {max_entropy:.3f} nats",
                )
        top = max(max(line.get_ydata()) for line in ax.get_lines())  # the ln N lines too
        ax.set_ylim(0, 1.12 * top or 1)  # headroom: a line at the top stays off the frame
        ax.set_title(TITLES[name], fontsize=9)
        ax.set_xlabel("block (backbone.block: 0 = first)", fontsize=8)
        ax.set_ylabel(Y_LABELS.get(name.rsplit("_", 1)[-1], ATTENTION_LABEL), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 5, 10]))  # 0.005, not 0.0025
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    entries: dict[str, object] = {}
    for ax in axes.flat:  # every panel's lines, the ln N lines of the entropy panels too
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    widest = max(len(label) for label in entries)
    fig.legend(
        list(entries.values()),
        list(entries),
        loc="outside lower center",
        ncol=max(1, min(len(entries), 3, 150 // widest)),
        fontsize=8,
    )
    suptitle(fig, title, fontsize=10)
    return fig


def attention_maps_figure(
    images: torch.Tensor, maps: dict[str, torch.Tensor], labels: list[int], title: str
) -> Figure:
    """Each image (its class on the left) beside its patch weights ``{column: [n, h, w]}``.

    One cell per patch (interpolation would invent detail the tokens do not have), every map
    on one colour scale from 0 with one colorbar on which the uniform level 1/N is marked, and
    under each map its entropy against the maximum ln N: near-uniform attention looks uniform
    and says so. A column equal to an earlier one (a one-head model's sharpest head is its
    head mean) says so in its title.
    """
    rows, cols = len(images), 1 + len(maps)
    num_patches = math.prod(next(iter(maps.values())).shape[-2:])
    uniform, max_entropy = 1 / num_patches, math.log(num_patches)
    norm = Normalize(0, max(float(values.max()) for values in maps.values()))
    fig = Figure(figsize=(1.8 * cols + 1.4, 1.9 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    pictures = images.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()
    for row in range(rows):
        axes[row, 0].imshow(pictures[row])
        axes[row, 0].set_ylabel(f"class {labels[row]}", fontsize=8)
        for col, values in enumerate(maps.values(), start=1):
            weights = values[row].double()
            shown = axes[row, col].imshow(weights.numpy(), cmap="viridis", norm=norm)
            entropy = float(-(weights * weights.clamp(min=1e-12).log()).sum())
            axes[row, col].set_xlabel(
                f"H = {entropy:.3f} of ln N = {max_entropy:.3f} nats", fontsize=6.5
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    same = _same_as_earlier(maps)
    for col, name in enumerate(maps, start=1):
        note = f" (identical to column {list(maps).index(same[name]) + 2})" if name in same else ""
        axes[0, col].set_title(textwrap.fill(name + note, 24), fontsize=8)
    colorbar = fig.colorbar(shown, ax=axes[:, 1:], shrink=min(1.0, 3.0 / rows), aspect=25)
    colorbar.set_label(f"weight of a patch (a map sums to 1 over N = {num_patches})", fontsize=8)
    ticks = [t for t in MaxNLocator(5).tick_values(0, norm.vmax) if 0 <= t <= norm.vmax]
    ticks = [t for t in ticks if abs(t - uniform) > 0.06 * norm.vmax]
    colorbar.set_ticks(
        [*ticks, uniform], labels=[f"{t:g}" for t in ticks] + [f"uniform 1/N = {uniform:.3g}"]
    )
    colorbar.ax.tick_params(labelsize=7)
    colorbar.ax.axhline(uniform, color="white", linewidth=1.5)
    suptitle(fig, title, fontsize=9)
    return fig


def _same_as_earlier(maps: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{column: the earlier column it equals}`` for the columns that repeat one."""
    same = {}
    for index, (name, values) in enumerate(maps.items()):
        for earlier, before in list(maps.items())[:index]:
            if earlier not in same and torch.allclose(values.float(), before.float(), atol=1e-6):
                same[name] = earlier
                break
    return same


def embedding_figure(features: dict[str, torch.Tensor], labels: np.ndarray, title: str) -> Figure:
    """t-SNE of each aggregator's features (``{name: [n, D]}``), one colour per class: a
    legend of the classes shown, or a colorbar of class ids when they are more than
    ``MAX_LEGEND_CLASSES``. t-SNE's coordinates have no unit, hence no ticks."""
    classes = np.unique(labels)
    fig = Figure(figsize=(3.6 * len(features) + 1.3, 4.0), layout="constrained")
    axes = fig.subplots(1, len(features), squeeze=False)
    many = len(classes) > MAX_LEGEND_CLASSES
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    norm = Normalize(classes.min(), classes.max())
    for ax, (name, values) in zip(axes.flat, features.items(), strict=True):
        perplexity = max(2.0, min(30.0, (len(values) - 1) / 3))
        # One thread: t-SNE of a few thousand points takes seconds on one, while OpenMP
        # threads spinning on busy cores made 60 points take 80 s instead of 0.6 s.
        with threadpool_limits(1, user_api="openmp"):
            points = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(
                values.float().cpu().numpy()
            )
        if many:
            shown = ax.scatter(*points.T, c=labels, cmap="turbo", norm=norm, s=5)
        else:
            for index, label in enumerate(classes):
                ax.scatter(*points[labels == label].T, color=palette(index), s=6)
        ax.set_title(f"{name} features ({len(values)} points)", fontsize=9)
        ax.set_xlabel("t-SNE 1 (no unit)", fontsize=8)
        ax.set_ylabel("t-SNE 2 (no unit)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if many:
        fig.colorbar(shown, ax=axes, aspect=30).set_label("class id", fontsize=8)
    else:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=palette(index), markersize=5)
            for index in range(len(classes))
        ]
        fig.legend(
            handles,
            [str(label) for label in classes],
            title="class",
            loc="outside right center",
            ncol=1 if len(classes) <= 10 else 2,
            fontsize=8,
            title_fontsize=8,
        )
    suptitle(fig, title, fontsize=9)
    return fig


def suptitle(fig: Figure, title: str, fontsize: float) -> None:
    """The figure's title, each line wrapped at the figure's width (a character is about 0.6
    of the font size wide) so that no part of it is cut off."""
    width = int(fig.get_figwidth() * 72 / (0.6 * fontsize))
    fig.suptitle(
        "\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=fontsize
    )


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path
