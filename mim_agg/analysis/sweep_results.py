"""A sweep's probe runs as one table: every head, and the best of each aggregator per backbone.

The best learning rate of an aggregator is chosen on held-out accuracy, like everything else;
the table reports its test accuracy.
"""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from mim_agg.utils.results import HEAD_COLUMNS

COLUMNS = ("run", "backbone", *HEAD_COLUMNS)


def collect(folder: Path) -> list[dict]:
    """One row per head of every finished probe run (a ``heads.csv`` beside a ``config.yaml``)."""
    rows = []
    for heads_file in sorted(Path(folder).rglob("heads.csv")):
        config = OmegaConf.load(heads_file.parent / "config.yaml")
        backbone = config.backbone.weights or config.backbone.arch
        with open(heads_file) as handle:
            for row in csv.DictReader(handle):
                rows.append(
                    {
                        "run": str(heads_file.parent.relative_to(folder)),
                        "backbone": str(backbone),
                        **row,
                    }
                )
    return rows


def best_per_aggregator(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """``(backbone, aggregator) -> row`` of the head with the best held-out accuracy."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["backbone"], row["aggregator"])
        if key not in best or _heldout(row) > _heldout(best[key]):
            best[key] = row
    return best


def _heldout(row: dict) -> float:
    return float(row["val/acc1_best"]) if row["val/acc1_best"] else float("-inf")


def markdown_table(best: dict[tuple[str, str], dict]) -> str:
    """Aggregators as rows, backbones as columns, test top-1 (%) of the held-out choice."""
    backbones = sorted({b for b, _ in best})
    aggregators = sorted({a for _, a in best})
    lines = ["| aggregator | " + " | ".join(backbones) + " |", "|---" * (len(backbones) + 1) + "|"]
    for aggregator in aggregators:
        cells = [_percent(best.get((b, aggregator))) for b in backbones]
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(row: dict | None) -> str:
    return "-" if row is None else f"{100 * float(row['test/acc1']):.2f}"


def plot_bars(best: dict[tuple[str, str], dict], path: Path) -> Path:
    """Grouped bars: test top-1 per aggregator, one bar per backbone."""
    backbones = sorted({b for b, _ in best})
    aggregators = sorted({a for _, a in best})
    width = 0.8 / len(backbones)
    fig = Figure(figsize=(max(6, 0.7 * len(aggregators) * len(backbones)), 4))
    ax = fig.subplots()
    for index, backbone in enumerate(backbones):
        values = [
            100 * float(best[(backbone, a)]["test/acc1"]) if (backbone, a) in best else 0
            for a in aggregators
        ]
        positions = [k + index * width for k in range(len(aggregators))]
        ax.bar(positions, values, width=width, label=backbone)
    ax.set_xticks(
        [k + 0.4 - width / 2 for k in range(len(aggregators))], aggregators, rotation=45, ha="right"
    )
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
