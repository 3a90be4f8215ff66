"""``results.png``: the report's table as grouped bars with error bars and significance marks;
``results_blocks.png``: accuracy per probed block when a sweep varies ``backbone.block``."""

from __future__ import annotations

import statistics
import textwrap

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mim_agg.report.comparisons import Comparisons
from mim_agg.report.table import (
    HEAD_GRID_SUFFIX,
    SAME_MARK,
    WINNER_MARK,
    Cell,
    column_label,
    natural,
)

HATCH = "///"


def results_figure(
    table: dict[tuple, Cell], keys: list[str], title: str, comparisons: Comparisons | None = None
) -> Figure:
    """One group per head, one bar per column of the table that has the head; error bars are
    the standard deviation over seeds, or for one seed the 95% bootstrap interval over the test
    images (``comparisons``), and each bar says how many seeds it averages. A head not
    significantly different from its column's winner is hatched, the winner starred. A group
    holds only its own bars, centred on its tick, so a head missing from a column leaves no
    gap."""
    stats = comparisons.cells if comparisons else {}
    columns = sorted({key[:-1] for key in table}, key=natural)
    heads = sorted({key[-1] for key in table})
    widest_group = max(sum((*c, h) in table for c in columns) for h in heads)
    width = 0.8 / widest_group
    fig = Figure(figsize=(max(6.4, 0.55 * len(table) + 2), 5.2), layout="constrained")
    ax = fig.subplots()
    colours = {column: f"C{index % 10}" for index, column in enumerate(columns)}
    for position, head in enumerate(heads):
        present = [c for c in columns if (*c, head) in table]
        for slot, column in enumerate(present):
            cell, marks = table[(*column, head)], stats.get((*column, head))
            mean = 100 * statistics.fmean(cell.values)
            error = error_bar(cell, marks)
            offset = (slot - (len(present) - 1) / 2) * width
            same = marks is not None and marks.significant is False
            bars = ax.bar(
                position + offset,
                mean,
                width,
                yerr=error,
                capsize=3,
                facecolor="white" if same else colours[column],
                edgecolor=colours[column],
                hatch=HATCH if same else None,
            )
            # inside the bar: above it, the label would collide with the error bar
            ax.bar_label(bars, [f"n={len(cell.values)}"], fontsize=7, label_type="center")
            if marks is not None and marks.winner:
                top = mean + (error[1][0] if isinstance(error, list) else error) + 4
                ax.plot(position + offset, top, marker="*", color="black", markersize=9)
    ax.set_xticks(range(len(heads)), [legend_label(h, 30) for h in heads], rotation=30, ha="right")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_xlabel(head_axis_label(table))
    wrapped = "\n".join(textwrap.fill(line, 80) for line in title.split("\n"))
    ax.set_title(wrapped, fontsize=9)
    ax.set_ylim(0, 110)
    entries = [  # plain patches: a column's first bar may be hatched
        Patch(facecolor=colours[column], label=legend_label(column_label(column, keys)))
        for column in columns
        if len(columns) > 1
    ]
    entries += mark_legend(comparisons)
    if entries:
        outside_legend(fig, ax, entries)
    return fig


def head_axis_label(table: dict[tuple, Cell]) -> str:
    """``head``, and what was chosen on held-out among its grid (``builders.head_name``'s
    suffixes of the chosen rows): nothing where every head trained once."""
    suffixes = {HEAD_GRID_SUFFIX.search(r["head"]) for c in table.values() for r in c.chosen}
    chosen = [
        name
        for name, mark in (("learning rate", "_blr"), ("weight decay", "_wd"))
        if any(mark in match.group(0) for match in suffixes)
    ]
    return f"head (held-out-selected {' and '.join(chosen)})" if chosen else "head"


def error_bar(cell: Cell, marks) -> float | list[list[float]]:
    """The cell's 95% interval, results.md's bracket, as distances below and above the bar
    (none without one: a seed without predictions)."""
    if marks is None or marks.interval is None:
        return 0
    mean = 100 * statistics.fmean(cell.values)
    low, high = marks.interval
    return [[mean - 100 * low], [100 * high - mean]]


def mark_legend(comparisons: Comparisons | None) -> list:
    """Legend entries saying what the error bars, the hatching and the star mean."""
    if comparisons is None:
        return []
    entries = []
    if comparisons.marked:
        entries.append(
            Line2D(
                [],
                [],
                marker="*",
                color="black",
                linestyle="None",
                markersize=9,
                label=f"{WINNER_MARK} the winner of its column (best held-out accuracy)",
            )
        )
        entries.append(
            Patch(
                facecolor="white",
                edgecolor="0.3",
                hatch=HATCH,
                label=legend_label(
                    f"{SAME_MARK} not significantly different from it (McNemar exact, Holm, "
                    "p ≥ 0.05)"
                ),
            )
        )
    if meanings := comparisons.interval_meanings:
        label = legend_label(f"error bars: 95% interval, {meanings}")
        entries.append(
            Line2D([], [], marker="|", color="black", linestyle="None", markersize=10, label=label)
        )
    return entries


def legend_label(text: str, width: int = 60) -> str:
    """Long labels wrapped on their commas, so a legend or a tick fits the figure."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def outside_legend(fig: Figure, ax, extra: list = ()) -> None:
    """The legend under the plot, where it hides no bar or line, in as many columns as its
    labels' length allows; ``extra`` entries (what marks mean) after the plot's own."""
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = [*handles, *extra], [*labels, *(entry.get_label() for entry in extra)]
    widest = max(len(line) for label in labels for line in label.split("\n"))
    columns = max(1, min(len(labels), 4, 110 // (widest + 6)))
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8)


BLOCK = "backbone.block"


def blocks_figure(table: dict[tuple, Cell], keys: list[str], title: str) -> Figure:
    """Accuracy against the probed block (1-based), one line per head and per value of the
    other varying keys (e.g. the backbone), with the standard deviation over seeds."""
    at = keys.index(BLOCK)
    others = [k for k in keys if k != BLOCK]
    lines: dict[tuple, list[tuple[int, Cell]]] = {}
    for key, cell in table.items():
        *columns, head = key
        rest = tuple(v for i, v in enumerate(columns) if i != at)
        lines.setdefault((*rest, head), []).append((int(columns[at]), cell))
    fig = Figure(figsize=(7.2, 5.2), layout="constrained")
    ax = fig.subplots()
    for (*rest, head), points in sorted(lines.items()):
        points.sort(key=lambda point: point[0])
        blocks = [block for block, _ in points]  # as backbone.block counts: 0 = first
        means = [100 * statistics.fmean(c.values) for _, c in points]
        errors = [100 * statistics.stdev(c.values) if len(c.values) > 1 else 0 for _, c in points]
        label = legend_label(
            ", ".join([column_label(tuple(rest), others), head] if others else [head])
        )
        ax.errorbar(blocks, means, yerr=errors, marker="o", markersize=3, capsize=2, label=label)
    ax.set_xticks(sorted({int(key[at]) for key in table}))
    ax.set_xlabel("probed block (backbone.block: 0 = first)")
    seeds = sorted({len(cell.values) for cell in table.values()})
    ax.set_ylabel(f"test top-1 accuracy (%), mean ± std of {'/'.join(map(str, seeds))} seeds")
    wrapped = "\n".join(textwrap.fill(line, 80) for line in title.split("\n"))
    ax.set_title(wrapped, fontsize=9)
    ax.grid(alpha=0.3)
    outside_legend(fig, ax)
    return fig
