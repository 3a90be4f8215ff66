"""What a run leaves behind: ``metrics.json`` and a table on the terminal."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mim_agg.utils.files import write_atomic, write_json

log = logging.getLogger(__name__)


def select_winner(head_results: dict[str, dict]) -> str:
    """The head with the best held-out accuracy; never chosen on test, never a diverged head."""
    candidates = [n for n, r in head_results.items() if r["diverged_at_step"] is None]
    if len(candidates) == 1:
        return candidates[0]
    return max(candidates, key=lambda name: head_results[name]["val/acc1_best"])


def write_metrics(path: Path, summary: dict) -> None:
    write_json(path, summary)


HEAD_COLUMNS = (
    "head",
    "aggregator",
    "blr",
    "wd",
    "trainable_params",
    "added_gflops",
    "val/acc1_best",
    "best_epoch",
    "test/acc1",
    "test/acc5",
    "test/acc1_last",
    "test/acc1_best_epoch",  # probe.test_each_epoch: the best epoch on test (selects on test)
    "best_test_epoch",
    "diverged_at_step",
)


def write_csv(path: Path, rows: list[dict], columns=HEAD_COLUMNS) -> Path:
    """Rows as CSV, written atomically; non-finite numbers become empty cells. The default
    columns make ``heads.csv`` (what each head is, costs, did)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return write_atomic(path, text.getvalue())


def _cell(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_table(head_results: dict[str, dict], winner: str) -> None:
    """Every head's test accuracy at its held-out-selected epoch; at the last one where no
    images were held out (``dataset.heldout_fraction=0``), which the title then says."""
    selected = any(result["val/acc1_best"] is not None for result in head_results.values())
    epoch = "the held-out-selected epoch" if selected else "the last epoch (nothing held out)"
    table = Table(title=f"mim_agg results (test accuracy at {epoch})")
    for column in ("head", "test acc1", "test acc5", "acc1 last epoch", "held-out acc1", "epoch"):
        table.add_column(column, justify="right" if column != "head" else "left")
    for name, result in head_results.items():
        table.add_row(
            name + (" *" if name == winner and len(head_results) > 1 else ""),
            _pct(result["test/acc1"]),
            _pct(result["test/acc5"]),
            _pct(result["test/acc1_last"]),
            _pct(result["val/acc1_best"]),
            "diverged"
            if result["diverged_at_step"] is not None
            else str(result["best_epoch"] if selected else "last"),
        )
    log_table(table)


def log_table(table: Table) -> None:
    """A results table through the log, so the console and the run's ``cli.log`` both hold
    it (rendered as plain text; a console of its own would reach the terminal only)."""
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(table)
    log.info("\n%s", console.file.getvalue().rstrip())  # the rendering holds the title


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def show_selection(
    summary: dict, protocol: str, chosen: str, settings: dict, outcomes: dict | None = None
) -> None:
    """The table and last log line of a protocol that chooses its settings per head on
    held-out (k-NN: k and T; logistic regression: C): every head's test and held-out
    accuracy, the winner starred, ``settings`` (column -> its text from a head's result) and
    ``outcomes``, columns shown alike but not chosen (logistic regression's iterations)."""
    outcomes = outcomes or {}
    winner = summary["heads"][summary["winner"]]
    selected = winner["val/acc1_best"] is not None
    how = f"{chosen} chosen on held-out" if selected else f"one {chosen}: nothing chosen"
    table = Table(title=f"mim_agg {protocol} (test accuracy; {how})")
    for column in ("head", "test acc1", "test acc5", "held-out acc1", *settings, *outcomes):
        table.add_column(column, justify="left" if column == "head" else "right")
    for name, result in summary["heads"].items():
        table.add_row(
            name + (" *" if name == summary["winner"] and len(summary["heads"]) > 1 else ""),
            _pct(result["test/acc1"]),
            _pct(result["test/acc5"]),
            _pct(result["val/acc1_best"]),
            *(text(result) for text in [*settings.values(), *outcomes.values()]),
        )
    log_table(table)
    log.info(
        "%s %s: test acc1 %.2f%% (%s%s%s)",
        "Winner" if selected else "Result of",
        summary["winner"],
        100 * winner["test/acc1"],
        ", ".join(f"{column}={text(winner)}" for column, text in settings.items()),
        " chosen on held-out" if selected else "",
        "".join(f"; {column}={text(winner)}" for column, text in outcomes.items()),
    )
