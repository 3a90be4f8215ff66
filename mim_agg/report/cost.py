"""Accuracy against cost: each head's test accuracy against its trainable parameters and the
GFLOPs it adds per image, with the Pareto front (efficient-probing's main figure).

A head is on the front when no other head of its group is at least as cheap and more
accurate. Written by a probe run (``cost.png``, its heads) and by the report
(``results_cost.png``, one group per column of the table).
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from mim_agg.report.table import Cell, column_label, head_key, heldout_accuracy, natural

COSTS = {
    "params": ("trainable parameters", "trainable_params"),
    "gflops": ("added GFLOPs per image", "added_gflops"),
}


@dataclass(frozen=True)
class CostPoint:
    head: str
    group: str  # the table's column ("" for one run)
    accuracy: float  # test top-1, a fraction
    params: float
    gflops: float


def pareto_front(points: list[CostPoint], cost: str) -> list[CostPoint]:
    """The points no other point beats in both ``cost`` (lower) and accuracy (higher), by
    increasing cost."""
    front = []
    for point in sorted(points, key=lambda p: (getattr(p, cost), -p.accuracy)):
        if not front or point.accuracy > front[-1].accuracy:
            front.append(point)
    return front


def run_points(rows: list[dict]) -> list[CostPoint]:
    """A probe run's heads (``heads.csv`` rows), each aggregator at its held-out-selected
    learning rate; diverged heads have no accuracy and no point."""
    chosen: dict[str, dict] = {}
    for row in rows:
        if row.get("test/acc1") in (None, ""):
            continue
        key = head_key(row)
        if key not in chosen or heldout_accuracy(row) > heldout_accuracy(chosen[key]):
            chosen[key] = row
    return [point(head, "", float(row["test/acc1"]), row) for head, row in chosen.items()]


def table_points(table: dict[tuple, Cell], keys: list[str]) -> list[CostPoint]:
    """A report's cells with their mean accuracy over seeds; cells without costs (k-NN) are
    left out."""
    points = []
    for (*column, head), cell in sorted(table.items(), key=lambda item: natural(item[0])):
        row = cell.chosen[0]  # seeds and learning rates change no cost
        if all(row.get(field) not in (None, "") for _, field in COSTS.values()):
            label = column_label(tuple(column), keys) if keys else ""
            points.append(point(head, label, statistics.fmean(cell.values), row))
    return points


def point(head: str, group: str, accuracy: float, row: dict) -> CostPoint:
    params, gflops = (float(row[field]) for _, field in COSTS.values())
    return CostPoint(head, group, accuracy, params, gflops)


def cost_figure(points: list[CostPoint], title: str) -> Figure:
    """Two panels, accuracy against trainable parameters and against added GFLOPs (log
    scales), each head a labelled point, each group's Pareto front a staircase drawn on to
    the costliest head (what lies below it is beaten by a head at most as costly), its heads
    ringed."""
    groups = list(dict.fromkeys(p.group for p in points))  # in the table's column order
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    labels = []
    for ax, cost in zip(axes, COSTS, strict=True):
        for index, group in enumerate(groups):
            members = [p for p in points if p.group == group]
            labels += plot_group(ax, members, cost, f"C{index % 10}", group)
        ax.set_xscale("log")
        ax.set_xlabel(f"{COSTS[cost][0]} (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test top-1 accuracy (%)")
    fig.suptitle("\n".join(textwrap.fill(line, 110) for line in title.split("\n")), fontsize=9)
    several = len(groups) > 1
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside lower center",
        ncol=min(len(groups), 3),
        fontsize=8,
        title="Pareto front of each column (ringed heads: on it)" if several else None,
        title_fontsize=8,
    )
    spread(fig, labels)
    return fig


def plot_group(ax, members: list[CostPoint], cost: str, colour: str, group: str) -> list:
    """One group's points, front and labels on ``ax``; returns the labels."""
    xs = [getattr(p, cost) for p in members]
    ax.scatter(xs, [100 * p.accuracy for p in members], color=colour, s=18, zorder=3)
    front = pareto_front(members, cost)
    ax.scatter(
        [getattr(p, cost) for p in front],
        [100 * p.accuracy for p in front],
        s=80,
        facecolors="none",
        edgecolors=colour,
        zorder=3,
    )
    ax.step(
        [getattr(p, cost) for p in front] + [max(xs)],
        [100 * p.accuracy for p in front] + [100 * front[-1].accuracy],
        where="post",
        color=colour,
        alpha=0.6,
        label=textwrap.fill(group, 60) if group else "Pareto front (ringed heads: on it)",
    )
    return [
        ax.annotate(
            p.head,
            (getattr(p, cost), 100 * p.accuracy),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="black" if p in front else "0.35",
            arrowprops=dict(arrowstyle="-", color="0.7", lw=0.5, shrinkA=0, shrinkB=2),
        )
        for p in members
    ]


def spread(fig: Figure, labels: list, step_pt: float = 2.5, tries: int = 40) -> None:
    """Place each label beside its point, right or left, nudged up or down a little at a
    time until it overlaps no label placed before it, no point and stays inside its axes
    (heads of equal cost share an x; their names would print over each other). A label moved
    off its point keeps a thin line to it."""
    fig.draw_without_rendering()  # lay the figure out: label boxes in display units
    taken = [marker_box(label) for label in labels]
    for label in sorted(labels, key=lambda t: -t.xy[1]):
        frame = label.axes.get_window_extent()
        for dy, side in candidates(step_pt, tries):
            label.set_horizontalalignment("left" if side > 0 else "right")
            label.xyann = (7 * side, dy)
            box = text_box(label)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
            if inside and box.y1 <= frame.y1 and not any(box.overlaps(t) for t in taken):
                break
        taken.append(text_box(label))


def text_box(label) -> Bbox:
    """A label's text alone, without the line to its point (an annotation's own extent
    spans both)."""
    return Text.get_window_extent(label)


def candidates(step_pt: float, tries: int):
    """Offsets in points: beside the point (right, then left), then ever further up and
    down."""
    for attempt in range(tries):
        for dy in dict.fromkeys((step_pt * attempt, -step_pt * attempt)):
            yield dy, 1
            yield dy, -1


def marker_box(label, half_px: float = 5.0):
    """The display box of the point a label names: other labels must not cover it."""
    x, y = label.axes.transData.transform(label.xy)
    return Bbox.from_extents(x - half_px, y - half_px, x + half_px, y + half_px)
