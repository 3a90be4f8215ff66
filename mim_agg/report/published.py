"""Published figures beside ours: ``published.csv``, the literature's test top-1 per backbone.

One row per figure, keyed by our backbone and dataset config names, the protocol (``knn``;
``linear``, a linear head on a parameter-free aggregator; ``ep``, efficient probing; ``probe``,
any other trained aggregator under a linear head), the aggregator (our registered name: the
head a run trains) and the aggregator options the figure was measured with (``options``:
``key=value`` pairs, ``;``-separated, values read as YAML). A run's head matches a row when all
of these agree, so EP on the patches never meets a figure of EP on ``[cls]`` and the patches.
Each row says how its source selected the figure (``selection``): efficient-probing's
leaderboard and "Beyond [cls]" pick the best epoch (k and T for k-NN) on ImageNet's val split,
which is also the one they report; ours is chosen on held-out, carved from train. A figure
is put beside a run only where the run follows its protocol (``protocol``): a run on a
low-shot subset, another block or a few batches is listed with what it changed instead.

Sources: efficient-probing's ``results.csv`` (billpsomas/efficient-probing; a row's notes give
some figures of other variants), and "Beyond [cls]"'s headline (``../shared/PAPER.md``). Their
rows without a config here are left out: MAE ViT-S, MaskFeat, DiT (no config) and CAPI ViT-L
(their IN-1k weights, not capi_vitl's LVD file). The backbone configs' comments quote the
leaderboard's figures to one decimal for whoever picks a backbone; this file is where the
numbers live (tests/test_published.py holds the comments to it).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import statistics
from dataclasses import dataclass
from importlib import resources

import yaml

from mim_agg.errors import UserError
from mim_agg.report.protocol import departures
from mim_agg.report.runs import Job, backbone_name
from mim_agg.report.table import Cell, column_label, head_key, head_options, natural

FILE = "published.csv"
COLUMNS = ("backbone", "dataset", "protocol", "aggregator", "options", "value", "selection",
           "source", "note")  # fmt: skip
# Which task's heads report which protocols: a probe run's head is LP, EP or another probe.
TASK_PROTOCOLS = {"knn": ("knn",), "probe": ("linear", "ep", "probe")}
EP_AGGREGATOR = "efficient_probe"
OUR_SELECTION = "test top-1 of the head chosen on held-out (carved from train), mean over seeds"


@dataclass(frozen=True)
class Figure:
    backbone: str
    dataset: str
    protocol: str
    aggregator: str
    options: tuple[tuple[str, object], ...]
    value: float  # test top-1, %
    selection: str  # how the source chose it
    source: str
    note: str

    @property
    def key(self) -> tuple:
        return self.backbone, self.dataset, self.protocol, self.aggregator, self.options

    def matches(self, options: dict) -> bool:
        """Whether a head with these (flattened) aggregator options is the one measured."""
        return all(key in options and options[key] == value for key, value in self.options)


def parse_options(text: str, where: str) -> tuple[tuple[str, object], ...]:
    pairs = []
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{where}: options item {item!r} is not key=value.")
        pairs.append((key.strip(), yaml.safe_load(value)))
    return tuple(sorted(pairs))


def parse_row(row: dict, where: str) -> Figure:
    if list(row) != list(COLUMNS):
        raise UserError(f"{where}: the columns must be {', '.join(COLUMNS)}; found {list(row)}.")
    try:
        value = float(row["value"])
    except (TypeError, ValueError):
        raise UserError(f"{where}: value={row['value']!r} is not a number.") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise UserError(f"{where}: value={value} is no top-1 accuracy in % (0 to 100).")
    protocols = {p for ps in TASK_PROTOCOLS.values() for p in ps}
    if row["protocol"] not in protocols:
        raise UserError(f"{where}: protocol={row['protocol']!r} is none of {sorted(protocols)}.")
    if (row["protocol"] == "ep") != (row["aggregator"] == EP_AGGREGATOR):
        raise UserError(f"{where}: protocol ep is the {EP_AGGREGATOR} aggregator, and only it.")
    for column in ("backbone", "dataset", "aggregator", "selection", "source"):
        if not row[column]:
            raise UserError(f"{where}: {column} is empty.")
    options = parse_options(row["options"] or "", where)
    return Figure(**{**row, "value": value, "options": options})


def parse(text: str, name: str = FILE) -> list[Figure]:
    """The figures of a published file, refused whole where a row is malformed or repeats a
    key, or where rows of one head name different option keys (a head could match both)."""
    figures, seen, option_keys = [], {}, {}
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        where = f"{name} line {line}"
        figure = parse_row(row, where)
        if figure.key in seen:
            raise UserError(f"{where} repeats the key of line {seen[figure.key]}: {figure.key}.")
        seen[figure.key] = line
        head = figure.key[:4]
        keys = tuple(key for key, _ in figure.options)
        if option_keys.setdefault(head, keys) != keys:
            raise UserError(
                f"{where}: rows of {head} must name the same option keys ({option_keys[head]})."
            )
        figures.append(figure)
    return figures


@functools.cache
def published() -> tuple[Figure, ...]:
    """The package's published figures, read once."""
    text = resources.files("mim_agg.report").joinpath(FILE).read_text(encoding="utf-8")
    return tuple(parse(text))


def figure_for(
    backbone: str, dataset: object, task: object, head: str, options: dict
) -> Figure | None:
    """The published figure of a run's head: same backbone and dataset config, a protocol the
    run's task reports, the head's aggregator and its options; None when there is none."""
    protocols = TASK_PROTOCOLS.get(str(task), ())
    for figure in published():
        if (figure.backbone, figure.dataset, figure.aggregator) == (backbone, dataset, head) and (
            figure.protocol in protocols and figure.matches(options)
        ):
            return figure
    return None


def candidate(job: Job, head: str) -> Figure | None:
    """The published figure keyed like head ``head`` (its name without learning rate) of a
    run: same backbone and dataset config, protocol, aggregator and options."""
    dataset = (job.config.get("dataset") or {}).get("name")
    options = head_options(job.config, head)
    return figure_for(backbone_name(job), dataset, job.config.get("task"), head, options)


def match(job: Job, head: str) -> tuple[Figure | None, list[str]]:
    """``candidate``'s figure and how the run departs from its protocol (``protocol``)."""
    figure = candidate(job, head)
    if figure is None:
        return None, []
    return figure, departures(job, figure.backbone, figure.dataset)


def figure_of(job: Job, head: str) -> Figure | None:
    """The published figure of head ``head`` of a run that follows its protocol, or None."""
    figure, departs = match(job, head)
    return None if departs else figure


@dataclass
class Beside:
    rows: list[dict]  # results_published.csv: a cell whose runs follow a figure's protocol
    left_out: list[str]  # a cell keyed like a figure whose runs do not: why, in one line


def beside(table: dict[tuple, Cell], keys: list[str], jobs: list[Job]) -> Beside:
    """One row per cell of the table whose head has a published figure (the same one in every
    seed) and whose runs follow its protocol: ours, theirs, the difference and how each was
    chosen; and a line for each cell that has one but departs from its protocol."""
    runs = {job.path.name: job for job in jobs if job.path}
    result = Beside([], [])
    for key in sorted(table, key=natural):
        cell = table[key]
        found = [match(runs[row["run"]], head_key(row)) for row in cell.chosen]
        figures = {figure for figure, _ in found}
        if len(figures) != 1 or None in figures:
            continue
        (figure,) = figures
        column = column_label(key[:-1], keys)
        if departs := sorted({reason for _, reasons in found for reason in reasons}):
            result.left_out.append(
                f"{key[-1]} ({column}), not beside published {figure.value:.2f}: "
                + "; ".join(departs)
            )
            continue
        ours = 100 * statistics.fmean(cell.values)
        result.rows.append(
            {
                "head": key[-1],
                "column": column,
                "ours": round(ours, 2),
                "published": figure.value,
                "difference": round(ours - figure.value, 2),
                "published_selection": figure.selection,
                "source": figure.source,
                "note": figure.note,
            }
        )
    return result


def beside_markdown(found: Beside) -> list[str]:
    """The table's section of published figures; none when no head is keyed like one."""
    if not found.rows and not found.left_out:
        return []
    lines = ["## Published figures beside ours", ""]
    if found.rows:
        lines += [
            f"Ours: the cell above, {OUR_SELECTION}. Published: as its source chose it (its "
            "selection); a figure chosen on the test split reads higher than a held-out choice "
            "by construction. Sources and figures: mim_agg/report/published.csv.",
            "",
            "| head | column | ours (held-out choice) | published | ours − published | "
            "published: selected by | source |",
            "|---" * 7 + "|",
        ]
    for row in found.rows:
        cells = (row["head"], row["column"], f"{row['ours']:.2f}", f"{row['published']:.2f}",
                 f"{row['difference']:+.2f}", row["published_selection"],
                 "; ".join(filter(None, (row["source"], row["note"]))))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if found.left_out:
        lines += [
            "",
            "Left out: heads of a published figure whose runs depart from its protocol (the "
            "backbone and the whole dataset as conf/ sets them, no trainer.limit_*_batches):",
            "",
        ]
        lines += [f"- {line}" for line in found.left_out]
    return lines
