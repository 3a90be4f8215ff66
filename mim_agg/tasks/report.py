"""The ``report`` task: one table of one or more sweeps, finished or still running.

    python run.py task=report report.sweep_dir=outputs/multirun/<time>
    python run.py task=report 'report.sweep_dir=[outputs/multirun/a,outputs/multirun/b]'

Writes ``results.csv`` (one row per head and seed, every varying config value a column),
``results.md`` (held-out-selected heads, mean ± std [95% interval] (n) over seeds, marked where
not significantly different from their column's winner, then the jobs that did not finish
and why), ``significance.csv`` (each paired test), ``results_published.csv`` (where a head
has a figure in ``mim_agg/report/published.csv``: it beside ours, as ``results.md`` shows it),
``results_evaluate.csv`` (where runs were scored by ``task=evaluate`` on ImageNet-V2, -Sketch,
-R, -A or -ReaL: each head's accuracy on each set, ``results.md`` showing the chosen heads',
marked as the main table; ``significance_evaluate.csv``, those sets' paired tests),
``results.png`` and ``results_cost.png`` (accuracy against trainable parameters and added
GFLOPs, with the Pareto front) into ``report.out_dir`` (default: the first sweep);
for sweeps of ``experiment=ep_row`` also ``results_row.{md,csv}``, efficient-probing's
leaderboard layout (``mim_agg.report.row``): one row per backbone, its k-NN, LP and EP.
A file this report has nothing for is not written, and a previous report's removed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig

from mim_agg.analysis.figures import save_figure
from mim_agg.errors import ConfigError, UserError
from mim_agg.report import how_jobs_ended
from mim_agg.report.comparisons import RunPredictions, compare
from mim_agg.report.cost import cost_figure, table_points
from mim_agg.report.evaluated import (
    evaluation_markdown,
    evaluation_rows,
    run_evaluations,
    set_comparisons,
    set_names,
    significance_rows,
)
from mim_agg.report.figure import BLOCK, blocks_figure, results_figure
from mim_agg.report.published import beside, beside_markdown
from mim_agg.report.row import is_leaderboard, leaderboard_markdown, leaderboard_rows
from mim_agg.report.runs import Job, read_sweeps
from mim_agg.report.table import cells, constant_context, head_rows, markdown, varying_keys
from mim_agg.utils.files import under_root, write_atomic
from mim_agg.utils.results import write_csv

log = logging.getLogger(__name__)

SUMMARY = "one table and figure of sweeps (report.sweep_dir=outputs/multirun/<time>)"
USES_RUN_FOLDER = False
SETTINGS_GROUP = "report"


@dataclass
class Settings:  # values and their meaning: conf/report/default.yaml
    sweep_dir: Any = MISSING  # a folder or a list of them
    out_dir: str | None = MISSING


def sweep_dirs(cfg: DictConfig) -> list[Path]:
    """The sweep folders, relative ones taken from ``paths.root_dir`` as the sweeps wrote them;
    a folder named twice (``[S,S]``, or once relative and once absolute) is read once."""
    value = cfg.report.sweep_dir
    if value is None:
        raise UserError("task=report needs report.sweep_dir=<an outputs/multirun/<time> folder>.")
    values = value if isinstance(value, ListConfig | list) else [value]
    if not values:
        raise ConfigError(
            "report.sweep_dir=[] names no sweep: give one folder or a list of them, "
            "report.sweep_dir=outputs/multirun/<time> or '[<a sweep>,<another>]'."
        )
    folders = [under_root(cfg.paths.root_dir, v) for v in values]
    return list(dict.fromkeys(folders))


def output_dir(cfg: DictConfig) -> Path:
    if cfg.report.out_dir:
        return under_root(cfg.paths.root_dir, cfg.report.out_dir)
    return sweep_dirs(cfg)[0]


def run(cfg: DictConfig, watch=None) -> dict:
    """The report of the sweeps (written in seconds: a signal meanwhile stops nothing)."""
    return report(sweep_dirs(cfg), output_dir(cfg))


def blocks_are_absolute(table: dict, keys: list[str]) -> bool:
    """``backbone.block=-1`` means the last block, whose number the report cannot know: the
    per-block figure needs blocks counted from the first (0, 1, ...)."""
    blocks = {int(key[keys.index(BLOCK)]) for key in table}
    if min(blocks) < 0:
        log.warning(
            "No results_blocks.png: the sweep gives blocks counted from the end (%s); sweep "
            "backbone.block over 0, 1, ... for the per-block figure.",
            sorted(b for b in blocks if b < 0),
        )
        return False
    return True


CONTEXT_KEYS = ("backbone.arch", "backbone.weights", "dataset.name")


def report_title(jobs: list[Job]) -> str:
    """The table's and the figures' title: what they show, the backbone, weights and dataset
    the jobs share, and which of these differ between jobs (the columns, and the figures'
    legends, say how)."""
    shared = constant_context(jobs, CONTEXT_KEYS)
    differing = [key for key in CONTEXT_KEYS if key not in shared]
    parts = [f"{key}={value}" for key, value in shared.items()]
    if jobs and differing:
        parts.append(f"{', '.join(differing)}: per column")
    return "\n".join(["test top-1 (%) of the held-out-selected head", ", ".join(parts)]).strip()


# Every file a report writes. A report writes those it has content for (no published figure,
# no predictions, no leaderboard, ...: not those), so it first removes the previous report's.
OUTPUTS = ("results.csv", "results.md", "results_published.csv", "results_evaluate.csv",
           "significance.csv", "significance_evaluate.csv", "results_row.csv", "results_row.md",
           "results.png", "results_cost.png", "results_blocks.png")  # fmt: skip


def remove_previous(out: Path) -> None:
    """Remove a previous report's files from ``out``: its ``significance.csv`` left beside this
    report's ``results.md`` would speak of other runs. Only the names of ``OUTPUTS``: nothing
    else in the folder is the report's."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)


def report_folder(out: Path) -> None:
    """Make ``out`` (``report.out_dir``), refusing by name a folder that cannot be made or
    written before anything is computed into it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = error.strerror or str(error)
    else:
        problem = None if os.access(out, os.W_OK) else "not writable"
    if problem:
        raise UserError(
            f"The report's folder {str(out)!r} cannot be made or written ({problem}): set "
            "report.out_dir to a folder that can be, or leave it unset to write into the "
            "first sweep folder."
        )


def report(sweeps: list[Path], out: Path) -> dict:
    """Read the sweeps, print the table, write results.{csv,md,png} into ``out``."""
    jobs = read_sweeps(sweeps)
    finished = [job for job in jobs if job.status == "done"]
    if finished and not any(job.heads for job in finished):
        raise UserError(
            f"The finished jobs of {', '.join(map(str, sweeps))} trained no heads (task=analyze"
            "): there is no accuracy to tabulate. Overlay their attention statistics with "
            "python scripts/compare_attention.py <sweep folder>."
        )
    report_folder(out)
    keys = varying_keys(finished)  # the table shows finished jobs; the others are listed
    title = report_title(finished)
    rows = head_rows(finished, keys)
    table = cells(rows, keys)
    comparisons = compare(table, keys, RunPredictions(finished))
    published = beside(table, keys, finished)
    evaluated = run_evaluations(finished)
    on_sets = {name: set_comparisons(table, keys, evaluated, name) for name in set_names(evaluated)}
    sections = (
        beside_markdown(published),
        evaluation_markdown(table, keys, evaluated, comparisons, on_sets),
    )
    text = markdown(
        table, keys, jobs, title.replace("\n", "; "), comparisons, [s for s in sections if s]
    )
    print(text)
    remove_previous(out)
    columns = [*keys, "seed", "subset_seed", "head_label", "run", *(rows[0] if rows else {})]
    write_csv(out / "results.csv", rows, list(dict.fromkeys(columns)))
    write_atomic(out / "results.md", text)
    if published.rows:
        write_csv(out / "results_published.csv", published.rows, list(published.rows[0]))
    if scored := evaluation_rows(rows, keys, table, evaluated):
        write_csv(out / "results_evaluate.csv", scored, list(scored[0]))
    if comparisons.rows:
        write_csv(out / "significance.csv", comparisons.rows, list(comparisons.rows[0]))
    if tested := significance_rows(on_sets):
        write_csv(out / "significance_evaluate.csv", tested, list(tested[0]))
    if is_leaderboard(finished):  # experiment=ep_row: also the leaderboard's row layout
        board = leaderboard_rows(finished)
        print(leaderboard_markdown(board))
        write_csv(out / "results_row.csv", board, list(board[0]))
        write_atomic(out / "results_row.md", leaderboard_markdown(board))
    if table:
        save_figure(results_figure(table, keys, title, comparisons), out / "results.png")
        if points := table_points(table, keys):
            save_figure(cost_figure(points, title), out / "results_cost.png")
        if BLOCK in keys and blocks_are_absolute(table, keys):
            save_figure(blocks_figure(table, keys, title), out / "results_blocks.png")
    counts = {s: sum(job.status == s for job in jobs) for s in sorted({j.status for j in jobs})}
    log.info(
        "Report of %d jobs (%s) -> %s/results.{csv,md,png}", len(jobs), how_jobs_ended(jobs), out
    )
    return {"jobs": counts, "out_dir": str(out)}
