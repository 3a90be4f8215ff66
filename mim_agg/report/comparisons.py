"""The report's statistics: each cell's 95% interval, and whether it differs from its column's
winner, from the per-image predictions its runs wrote (``predictions.safetensors``).

Within a column (one combination of the varying config values) the winner is the head with
the best mean held-out accuracy over seeds (the best mean test accuracy only when no run held
data out), never chosen on the numbers being compared with it otherwise. Per seed, every other
head is compared with it on the same test images by McNemar's exact test, Holm-corrected
across the column's heads. A head differs significantly from the winner when the adjusted
p-value is below 0.05 in every seed, in the same direction: requiring each of several level-0.05
tests to reject keeps the whole claim at level 0.05 (an intersection-union test), so seeds
need no further correction. Intervals: a percentile bootstrap over the test images for a
single seed; for several, the hull of the t-interval of their mean and the bootstrap of that
mean over their shared test images (``significance``).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mim_agg.errors import UserError
from mim_agg.report.runs import Job
from mim_agg.report.significance import (
    ALPHA,
    INTERVAL_KINDS,
    bootstrap_interval,
    holm,
    mcnemar_exact,
    mean_interval,
)
from mim_agg.report.table import Cell, heldout_accuracy
from mim_agg.utils.predictions import FILE, HeadPredictions, read_predictions, remedy


@dataclass
class CellStats:
    interval: tuple[float, float] | None = None  # 95%, of the accuracy (a fraction)
    interval_kind: str | None = None  # one of significance.INTERVAL_KINDS
    winner: bool = False  # the column's winner, compared with at least one other head
    significant: bool | None = None  # differs from the winner; None: not tested


@dataclass
class Comparisons:
    cells: dict[tuple, CellStats]
    rows: list[dict]  # significance.csv: one per head, seed and column that was tested
    missing: list[Path] = field(default_factory=list)  # runs without predictions

    @property
    def marked(self) -> bool:
        return any(stats.significant is not None for stats in self.cells.values())

    @property
    def interval_meanings(self) -> str | None:
        """What the cells' intervals are, each kind present once (``INTERVAL_KINDS``): the
        table's legend and the figure's say it alike; None where no cell has one."""
        kinds = {stats.interval_kind for stats in self.cells.values()}
        present = [meaning for kind, meaning in INTERVAL_KINDS.items() if kind in kinds]
        return "; ".join(present) or None


class RunPredictions:
    """The runs' predictions files, each read once; a missing file is remembered, not fatal
    (runs written before the file existed)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.paths = {job.path.name: job.path for job in jobs if job.path is not None}
        self.loaded: dict[str, HeadPredictions | None] = {}
        self.missing: list[Path] = []

    def of(self, row: dict) -> HeadPredictions | None:
        """The predictions of ``row``'s run holding ``row``'s head, checked against its
        ``heads.csv`` (a file left from another run must not pass: a head it lacks, or
        another accuracy, is refused), or None where the run wrote no file."""
        run = row["run"]
        if run not in self.loaded:
            path = self.paths[run] / FILE
            self.loaded[run] = read_predictions(path) if path.is_file() else None
            if self.loaded[run] is None:
                self.missing.append(self.paths[run])
        predictions = self.loaded[run]
        if predictions is None:
            return None
        if row["head"] not in predictions.predicted:  # heads that diverged have no row here
            raise UserError(
                f"{self.paths[run] / FILE} holds no predictions of head {row['head']!r}, which "
                f"the run's heads.csv scores (the file's heads: "
                f"{', '.join(sorted(predictions.predicted)) or 'none'}): the file is another "
                f"run's. Write it anew ({remedy(self.path(row))}), or remove it (the report "
                "then leaves this run unmarked)."
            )
        stored, recorded = predictions.accuracy(row["head"]), float(row["test/acc1"])
        if abs(stored - recorded) * len(predictions.targets) > 0.5:  # more than half an image
            raise UserError(
                f"{self.paths[run] / FILE} gives head {row['head']!r} a test accuracy of "
                f"{stored:.6f}, its heads.csv {recorded:.6f}: the file is not this run's. Move "
                f"it away (the report then leaves this run unmarked) or {remedy(self.path(row))}."
            )
        return predictions

    def path(self, row: dict) -> Path:
        return self.paths[row["run"]] / FILE


def compare(table: dict[tuple, Cell], keys: list[str], predictions: RunPredictions) -> Comparisons:
    """Every cell's interval and, where its runs wrote ``predictions``, its paired tests."""
    result = Comparisons({}, [])
    for column, cells in columns(table):
        compare_column(dict(zip(keys, column, strict=True)), cells, predictions, result)
    result.missing = predictions.missing
    return result


def columns(table: dict[tuple, Cell]) -> Iterator[tuple[tuple, dict[str, Cell]]]:
    """Each column of the table (its config values) with its cells by head, in table order."""
    for column in dict.fromkeys(key[:-1] for key in table):
        yield column, {key[-1]: table[key] for key in table if key[:-1] == column}


def by_replicate(cell: Cell) -> dict[tuple, dict]:
    """The cell's chosen rows by seed (and low-shot subset seed)."""
    return {(row["seed"], row.get("subset_seed")): row for row in cell.chosen}


def column_winner(cells: dict[str, Cell]) -> str:
    """The head with the best mean held-out accuracy; the best mean test accuracy where no
    run held data out."""
    heldout = {head: [heldout_accuracy(r) for r in cell.chosen] for head, cell in cells.items()}
    if all(value > float("-inf") for values in heldout.values() for value in values):
        return max(cells, key=lambda head: statistics.fmean(heldout[head]))
    return max(cells, key=lambda head: statistics.fmean(cells[head].values))


def compare_column(column: dict, cells: dict[str, Cell], predictions, result) -> None:
    """The tests of one column's heads against its winner, seed by seed; then each cell's
    interval and mark."""
    winner = column_winner(cells)
    tests: dict[str, list] = {head: [] for head in cells if head != winner}
    for replicate, winner_row in by_replicate(cells[winner]).items():
        rows = {head: by_replicate(cells[head]).get(replicate) for head in tests}
        for head, outcome, adjusted in paired_tests(winner_row, rows, predictions):
            tests[head].append((outcome, adjusted))
            result.rows.append(
                {
                    **column,
                    "head_label": head,
                    "winner": winner,
                    "seed": replicate[0],
                    "subset_seed": replicate[1],
                    "run": rows[head]["run"],
                    "head": rows[head]["head"],
                    "winner_run": winner_row["run"],
                    "winner_head": winner_row["head"],
                    "only_winner_right": outcome.only_first,
                    "only_head_right": outcome.only_second,
                    "p_value": outcome.p_value,
                    "p_holm": adjusted,
                }
            )
    key = tuple(column.values())
    for head, cell in cells.items():
        stats = CellStats(*interval(cell, predictions))
        if head != winner and len(tests[head]) == len(cell.chosen) == len(cells[winner].chosen):
            stats.significant = differs(tests[head])  # tested in every seed of both
        result.cells[(*key, head)] = stats
    if any(result.cells[(*key, head)].significant is not None for head in tests):
        result.cells[(*key, winner)].winner = True


def paired_tests(winner_row: dict, rows: dict, predictions: RunPredictions) -> list[tuple]:
    """``(head, McNemar, Holm-adjusted p)`` of one seed's winner against each head of
    ``rows`` (None where a head has no run in this seed) whose run and the winner's wrote
    predictions."""
    best = predictions.of(winner_row)
    if best is None:
        return []
    outcomes = {}
    for head, row in rows.items():
        other = predictions.of(row) if row is not None else None
        if other is not None:
            same_images(best, other, predictions.path(winner_row), predictions.path(row))
            first, second = best.correct(winner_row["head"]), other.correct(row["head"])
            outcomes[head] = mcnemar_exact(first, second)
    adjusted = holm([outcome.p_value for outcome in outcomes.values()])
    return [(h, o, p) for (h, o), p in zip(outcomes.items(), adjusted, strict=True)]


def differs(tests: list) -> bool:
    """Below 0.05 after Holm in every seed, the same head ahead in each."""
    ahead = {outcome.only_first > outcome.only_second for outcome, _ in tests}
    return all(adjusted < ALPHA for _, adjusted in tests) and len(ahead) == 1


def interval(cell: Cell, predictions: RunPredictions) -> tuple:
    """``(interval, kind)`` of the cell's accuracy (``significance.INTERVAL_KINDS``): over the
    test images of its one run (None without its predictions); over several seeds the
    t-interval of their mean, widened to hold the bootstrap of that mean over the test images
    where every seed's predictions are at hand: seeds that agree say nothing of how finite the
    test set is."""
    found = [predictions.of(row) for row in cell.chosen]
    images = None
    if None not in found:
        first, path = found[0], predictions.path(cell.chosen[0])
        for other, row in zip(found[1:], cell.chosen[1:], strict=True):
            same_images(first, other, path, predictions.path(row))
        correct = [seed.correct(row["head"]) for seed, row in zip(found, cell.chosen, strict=True)]
        images = bootstrap_interval(np.stack(correct))
    if len(cell.values) == 1:
        return images, "bootstrap" if images else None
    low, high = mean_interval(cell.values)
    low, high = max(low, 0.0), min(high, 1.0)  # an accuracy lies in [0, 1]
    if images is None:
        return (low, high), "t"
    return (min(low, images[0]), max(high, images[1])), "t+bootstrap"


def same_images(first: HeadPredictions, second: HeadPredictions, a: Path, b: Path) -> None:
    """Paired tests compare heads on the same images: same indices, same labels."""
    if first.image_index.shape != second.image_index.shape or (
        (first.image_index != second.image_index).any() or (first.targets != second.targets).any()
    ):
        raise UserError(
            f"{a} and {b} hold different test images or labels ({len(first.targets)} and "
            f"{len(second.targets)} images), yet their runs fall in one column of the report: "
            "a config value that changes the test split is not among the report's keys, or a "
            "file is stale. Report them separately, or write the stale one anew: "
            f"{remedy(a)} or {remedy(b)}."
        )
