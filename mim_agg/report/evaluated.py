"""Robustness and re-labelled test sets in the report: what ``task=evaluate`` wrote into a
probe run's ``evaluate/<set>/metrics.json``, beside the run's own test accuracy.

The heads are the main table's, chosen per seed on held-out and never chosen again on these
sets (that would select on the numbers being reported); each set's cell is their accuracy on
it, mean ± std over seeds, shown only where every seed's chosen run was scored on that set, so
a set's column and the test column average the same runs. Each cell carries the main table's
95% interval, computed as there (``comparisons.interval``): over seeds for several, over the
set's images for one, from the per-image predictions evaluate wrote beside its metrics (checked
as a run's own: the file must give each head the accuracy its metrics.json records); a set
scored before that file existed has no bracket. Results are read as evaluate wrote them,
never recomputed, and refused when they may not be this run's: written for another
checkpoint than the run's current ``checkpoints/last.ckpt`` (evaluate records its SHA-256:
the run was trained again since, or the folder was copied from another run), for another
set than their folder's, or holding a number that is no accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mim_agg.errors import UserError
from mim_agg.report.comparisons import (
    CellStats,
    Comparisons,
    RunPredictions,
    column_winner,
    columns,
    compare,
    interval,
)
from mim_agg.report.runs import Job
from mim_agg.report.table import SAME_MARK, WINNER_MARK, Cell, column_label, natural
from mim_agg.utils.files import read_json, sha256_of

FOLDER = "evaluate"  # <probe run>/evaluate/<set>/
CHECKPOINT = "checkpoints/last.ckpt"  # what evaluate scores, relative to the run
CHECKPOINT_KEY = "checkpoint_sha256"  # in metrics.json: the SHA-256 of the file it scored
METRICS = ("acc1", "acc5")


def read_evaluations(run_dir: Path) -> dict[str, dict[str, dict]]:
    """``set -> head -> {"acc1", "acc5"}`` (fractions, None where a head diverged or, on
    ReaL, for top-5) of every ``evaluate/<set>/metrics.json`` of the run, each checked."""
    files = sorted((run_dir / FOLDER).glob("*/metrics.json"))
    if not files:
        return {}
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise UserError(
            f"{run_dir / FOLDER} holds evaluate results, but {checkpoint} is gone: nothing "
            "says which checkpoint they scored. Move that folder away, or restore the file."
        )
    digest = sha256_of(checkpoint)
    return {path.parent.name: checked(path, digest) for path in files}


def checked(path: Path, digest: str) -> dict[str, dict]:
    """The heads' accuracies of one set's ``metrics.json``, if it is this checkpoint's."""
    summary = read_json(path)
    summary = summary if isinstance(summary, dict) else {}
    again = (
        f"score it again (python run.py task=evaluate evaluate.run={path.parent.parent.parent} "
        f"dataset=<the set>) or move {path.parent} away"
    )
    recorded = summary.get(CHECKPOINT_KEY)
    if recorded is None:
        raise UserError(
            f"{path} names no checkpoint (written before task=evaluate recorded the one it "
            f"scored): it may not be the run's current {CHECKPOINT}; {again}."
        )
    if recorded != digest:
        raise UserError(
            f"{path} is stale: it scored a checkpoint {str(recorded)[:12]}, the run's "
            f"{CHECKPOINT} is {digest[:12]} (trained again since, or the folder is another "
            f"run's); {again}."
        )
    if not isinstance(summary.get("heads"), dict):
        raise UserError(f"{path} holds no heads' results; {again}.")
    if summary.get("dataset") != path.parent.name:
        raise UserError(f"{path} holds results of {summary.get('dataset')!r}; {again}.")
    heads = {}
    for head, values in summary["heads"].items():
        values = values if isinstance(values, dict) else {}
        heads[head] = {metric: values.get(f"test/{metric}") for metric in METRICS}
        if not all(v is None or is_accuracy(v) for v in heads[head].values()):
            raise UserError(
                f"{path}: head {head!r} has {values}, no accuracies in [0, 1]; {again}."
            )
    return heads


def is_accuracy(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1


@dataclass
class Evaluations:
    sets: dict[str, dict]  # run folder name -> read_evaluations, for runs that have any
    jobs: list[Job]  # where those runs lie: their predictions files, for the intervals


class SetPredictions(RunPredictions):
    """The per-image predictions ``task=evaluate`` wrote for set ``name``, run by run, read and
    checked as the runs' own (a row's ``test/acc1`` then being its accuracy on the set)."""

    def __init__(self, jobs: list[Job], name: str) -> None:
        super().__init__(jobs)
        self.paths = {run: path / FOLDER / name for run, path in self.paths.items()}


def run_evaluations(jobs: list[Job]) -> Evaluations:
    """Every finished job's evaluations, where it has any."""
    found = {job.path.name: read_evaluations(job.path) for job in jobs if job.path is not None}
    sets = {run: scored for run, scored in found.items() if scored}
    return Evaluations(sets, [job for job in jobs if job.path and job.path.name in sets])


def evaluation_rows(
    rows: list[dict], keys: list[str], table: dict[tuple, Cell], found: Evaluations
) -> list[dict]:
    """``results_evaluate.csv``: every head and seed of an evaluated run (as ``results.csv``),
    whether the table chose it, its test accuracy and its accuracy on each set."""
    chosen = {id(row) for cell in table.values() for row in cell.chosen}
    sets = set_names(found)
    named = (*keys, "seed", "subset_seed", "head_label", "run", "head")
    out = []
    for row in rows:
        if row["run"] not in found.sets:
            continue
        scored = found.sets[row["run"]]
        out.append(
            {
                **{key: row.get(key) for key in named},
                "selected": id(row) in chosen,
                "test/acc1": row["test/acc1"],
                **{
                    f"{name}/{metric}": scored.get(name, {}).get(row["head"], {}).get(metric)
                    for name in sets
                    for metric in METRICS
                },
            }
        )
    return out


def set_names(found: Evaluations) -> list[str]:
    return sorted({name for sets in found.sets.values() for name in sets})


def set_cell(cell: Cell, found: Evaluations, name: str) -> Cell | None:
    """The chosen heads' accuracies on set ``name`` (each chosen row's ``test/acc1`` that
    accuracy); None unless every seed's run has one."""
    values = [
        found.sets.get(row["run"], {}).get(name, {}).get(row["head"], {}).get("acc1")
        for row in cell.chosen
    ]
    if any(value is None for value in values):
        return None
    rows = [{**row, "test/acc1": value} for row, value in zip(cell.chosen, values, strict=True)]
    return Cell(values, rows)


def set_table(table: dict[tuple, Cell], found: Evaluations, name: str) -> dict[tuple, Cell]:
    """The main table's cells as scored on set ``name``, in the columns whose winner (chosen on
    held-out, as above) was scored on it: a column compared with another head as its winner
    would choose its winner again, on fewer heads."""
    scored = {key: set_cell(cell, found, name) for key, cell in table.items()}
    kept = {}
    for column, cells in columns(table):
        if scored[(*column, column_winner(cells))] is not None:
            kept |= {(*column, h): scored[(*column, h)] for h in cells if scored[(*column, h)]}
    return kept


def set_comparisons(
    table: dict[tuple, Cell], keys: list[str], found: Evaluations, name: str
) -> Comparisons:
    """Set ``name``'s cells, intervals and marks, computed as the main table's (``compare``) on
    the per-image predictions evaluate wrote for the set. Cells outside ``set_table`` (their
    column's winner was not scored on the set) get their interval, which needs no winner, but
    no mark."""
    predictions = SetPredictions(found.jobs, name)
    result = compare(set_table(table, found, name), keys, predictions)
    for key, cell in table.items():
        if key not in result.cells and (scored := set_cell(cell, found, name)) is not None:
            result.cells[key] = CellStats(*interval(scored, predictions))
    return result


def significance_rows(sets: dict[str, Comparisons]) -> list[dict]:
    """``significance_evaluate.csv``: every paired test on every set, as ``significance.csv``."""
    return [{"set": name, **row} for name, stats in sets.items() for row in stats.rows]


def evaluation_markdown(
    table: dict[tuple, Cell],
    keys: list[str],
    found: Evaluations,
    main: Comparisons,
    sets: dict[str, Comparisons],
) -> list[str]:
    """The report's section of the evaluated sets; none when no run was evaluated. ``main``:
    the main table's statistics (its test column), ``sets``: ``set_comparisons`` by set."""
    lines = []
    for key in sorted(table, key=natural):
        cells = {name: set_cell(table[key], found, name) for name in sets}
        if any(cells.values()):
            texts = [
                table[key].text(main.cells.get(key)),
                *(c.text(sets[n].cells.get(key)) if c else "-" for n, c in cells.items()),
            ]
            lines.append(f"| {key[-1]} | {column_label(key[:-1], keys)} | {' | '.join(texts)} |")
    if not lines:
        return []
    return [
        "## Robustness and re-labelled test sets",
        "",
        "Top-1 (%) of the head chosen on held-out above (not chosen again on these sets), mean "
        "± std [95% interval, as above] (seeds), as task=evaluate scored it: ImageNet-R and -A "
        "among their 200 classes, ReaL a prediction in the image's label set. "
        f"{WINNER_MARK} and {SAME_MARK} as above, on the set's own images: the winner stays the "
        "head with the best held-out accuracy; each set's tests: significance_evaluate.csv. No "
        "bracket or mark: one seed whose run (or set) has no predictions.safetensors; no mark: a "
        "column whose winner was not scored on the set. -: not scored in every seed's run. "
        "Every head and seed: results_evaluate.csv.",
        "",
        f"| head | column | test | {' | '.join(sets)} |",
        "|---" * (len(sets) + 3) + "|",
        *lines,
    ]
