"""``results.png``: the report's table as grouped bars with seed error bars;
``results_blocks.png``: accuracy per probed block when a sweep varies ``backbone.block``."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from mim_agg.report.table import Cell, column_label, natural


def plot_results(table: dict[tuple, Cell], keys: list[str], title: str, path: Path) -> Path:
    """One group per head, one bar per column of the table; error bars are the standard
    deviation over seeds, and each bar says how many seeds it averages."""
    columns = sorted({key[:-1] for key in table}, key=natural)
    heads = sorted({key[-1] for key in table})
    width = 0.8 / len(columns)
    fig = Figure(figsize=(max(6.4, 0.55 * len(heads) * len(columns) + 2), 4.8))
    ax = fig.subplots()
    for index, column in enumerate(columns):
        present = [h for h in heads if (*column, h) in table]
        cells = [table[(*column, h)] for h in present]
        means = [100 * statistics.fmean(c.values) for c in cells]
        errors = [100 * statistics.stdev(c.values) if len(c.values) > 1 else 0 for c in cells]
        positions = [heads.index(h) + (index - (len(columns) - 1) / 2) * width for h in present]
        bars = ax.bar(
            positions, means, width, yerr=errors, capsize=3, label=column_label(column, keys)
        )
        ax.bar_label(bars, [f"n={len(c.values)}" for c in cells], fontsize=7, padding=2)
    ax.set_xticks(range(len(heads)), heads, rotation=30, ha="right")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_xlabel("head (held-out-selected learning rate)")
    wrapped = "\n".join(textwrap.fill(line, 80) for line in title.split("\n"))
    ax.set_title(wrapped, fontsize=9)
    ax.set_ylim(0, 110)
    if len(columns) > 1 or keys:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


BLOCK = "backbone.block"


def plot_blocks(table: dict[tuple, Cell], keys: list[str], title: str, path: Path) -> Path:
    """Accuracy against the probed block (1-based), one line per head and per value of the
    other varying keys (e.g. the backbone), with the standard deviation over seeds."""
    at = keys.index(BLOCK)
    others = [k for k in keys if k != BLOCK]
    lines: dict[tuple, list[tuple[int, Cell]]] = {}
    for key, cell in table.items():
        *columns, head = key
        rest = tuple(v for i, v in enumerate(columns) if i != at)
        lines.setdefault((*rest, head), []).append((int(columns[at]), cell))
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.subplots()
    for (*rest, head), points in sorted(lines.items()):
        points.sort(key=lambda point: point[0])
        blocks = [block + 1 for block, _ in points]
        means = [100 * statistics.fmean(c.values) for _, c in points]
        errors = [100 * statistics.stdev(c.values) if len(c.values) > 1 else 0 for _, c in points]
        label = ", ".join([column_label(tuple(rest), others), head] if others else [head])
        ax.errorbar(blocks, means, yerr=errors, marker="o", markersize=3, capsize=2, label=label)
    ax.set_xticks(sorted({int(key[at]) + 1 for key in table}))
    ax.set_xlabel("probed block (1 = first)")
    seeds = sorted({len(cell.values) for cell in table.values()})
    ax.set_ylabel(f"test top-1 accuracy (%), mean ± std of {'/'.join(map(str, seeds))} seeds")
    wrapped = "\n".join(textwrap.fill(line, 80) for line in title.split("\n"))
    ax.set_title(wrapped, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
