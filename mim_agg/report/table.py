"""A sweep's heads as one honest table.

Jobs are told apart by every result-changing config value that differs between them (dataset,
backbone, block, image size, optimizer, ...). Within a job, and across jobs that differ only
in the learning rate or weight decay, each aggregator's head is chosen on held-out accuracy,
per seed; seeds are then collapsed into mean +- std (n) of that head's test accuracy.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mim_agg.report.runs import Job

if TYPE_CHECKING:
    from mim_agg.report.comparisons import CellStats, Comparisons

WINNER_MARK = "★"  # the column's winner, when another head was compared with it
SAME_MARK = "≈"  # not significantly different from the winner

# Not columns: seeds (the training seed, and the low-shot subset's, which follows it unless
# set) are averaged over, learning rates and weight decays are chosen on held-out, and a
# head's aggregator and its options (``aggregator`` and the extra ``heads``) name the row
# (``head_labels``).
SELECTED_OVER = (
    "seed", "dataset.subset_seed", "probe.blr", "probe.blrs", "probe.weight_decay", "probe.wds",
    "aggregator", "heads",
)  # fmt: skip
HEAD_GRID_SUFFIX = re.compile(r"(_blr[^_]+)?(_wd[^_]+)?$")  # builders.head_name's


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varying_keys(jobs: list[Job]) -> list[str]:
    """Config keys whose values differ between the jobs (absent counts as a value), less the
    keys that only some jobs have where a key every job has differs in the same group: those
    follow from that choice (``dataset.per_class`` exists because ``dataset.name=synthetic``)."""
    flats = [flatten(job.config) for job in jobs]
    keys = sorted({k for flat in flats for k in flat})
    varying = [k for k in keys if len({repr(flat.get(k)) for flat in flats}) > 1]
    varying = [k for k in varying if not k.startswith(SELECTED_OVER)]
    everywhere = {k for k in varying if all(k in flat for flat in flats)}
    chosen_groups = {k.split(".")[0] for k in everywhere}
    return [k for k in varying if k in everywhere or k.split(".")[0] not in chosen_groups]


def constant_context(jobs: list[Job], keys=("backbone.arch", "backbone.weights", "dataset.name")):
    """The values every job shares among ``keys``, for titles (``dataset.name=digits``);
    ``backbone.weights`` null reads ``random``."""
    flats = [flatten(job.config) for job in jobs]
    shared = {}
    for key in keys:
        values = {repr(flat.get(key)) for flat in flats}
        if flats and len(values) == 1:
            value = flats[0].get(key)
            shared[key] = "random" if value is None and key == "backbone.weights" else value
    return shared


def head_key(row: dict) -> str:
    """The head without its learning rate and weight decay: ``abmilp_blr0p1_wd0p0001`` ->
    ``abmilp``."""
    return HEAD_GRID_SUFFIX.sub("", row["head"], count=1)


def head_options(config: dict, head: str) -> dict:
    """The options of the aggregator behind ``head`` in a run's config: ``aggregator`` names
    its head by the aggregator's name, every entry of ``heads`` by its key."""
    main = config.get("aggregator") or {}
    if main.get("name") == head:
        return flatten(main)
    return flatten((config.get("heads") or {}).get(head) or {})


def head_labels(jobs: list[Job]) -> dict[tuple[int, str], str]:
    """``(job index, head) -> row label``: the head's name, followed by the options in which
    it differs among the jobs that train a head of that name (``topk_attn (k=4)``), so an
    aggregator sweep reads ``cls``, ``mean``, ``abmilp`` and not every option of each."""
    options = {
        (index, head): head_options(job.config, head)
        for index, job in enumerate(jobs)
        for head in dict.fromkeys(head_key(row) for row in job.heads)
    }
    labels = {}
    for (index, head), own in options.items():
        peers = [o for (_, h), o in options.items() if h == head]
        keys = sorted({k for peer in peers for k in peer})
        differing = [k for k in keys if len({repr(peer.get(k)) for peer in peers}) > 1]
        shown = ", ".join(f"{k}={own.get(k)}" for k in differing)
        labels[index, head] = f"{head} ({shown})" if shown else head
    return labels


def head_rows(jobs: list[Job], keys: list[str]) -> list[dict]:
    """``results.csv``: one row per head and seed, with every varying key as a column."""
    rows = []
    labels = head_labels(jobs)
    for index, job in enumerate(jobs):
        flat = flatten(job.config)
        for head in job.heads:
            rows.append(
                {
                    **{k: flat.get(k) for k in keys},
                    "seed": flat.get("seed"),
                    "subset_seed": flat.get("dataset.subset_seed"),
                    "head_label": labels[index, head_key(head)],
                    "run": job.path.name,
                    **head,
                }
            )
    return rows


@dataclass
class Cell:
    values: list[float]  # test top-1 of the held-out-selected head, one per seed
    chosen: list[dict]  # the selected rows

    def text(self, stats: CellStats | None = None) -> str:
        """``mean ± std [95% interval] (seeds) mark``; parts without a value are left out."""
        parts = [f"{100 * statistics.fmean(self.values):.2f}"]
        if len(self.values) > 1:
            parts.append(f"± {100 * statistics.stdev(self.values):.2f}")
        if stats is not None and stats.interval is not None:
            low, high = stats.interval
            parts.append(f"[{100 * low:.2f}, {100 * high:.2f}]")
        parts.append(f"({len(self.values)})")
        if stats is not None and stats.winner:
            parts.append(WINNER_MARK)
        elif stats is not None and stats.significant is False:
            parts.append(SAME_MARK)
        return " ".join(parts)


def cells(rows: list[dict], keys: list[str], metric: str = "test/acc1") -> dict[tuple, Cell]:
    """``(column values..., head key) -> Cell``: per seed the head with the best held-out
    accuracy among the learning rates, then the seeds together. A head that diverged has no
    accuracy and is never chosen; one that diverged at every rate has no cell."""
    chosen: dict[tuple, dict[object, dict]] = {}
    for row in rows:
        if row.get(metric) in (None, ""):  # diverged: heads.csv leaves its accuracy empty
            continue
        key = (*(str(row[k]) for k in keys), row["head_label"])
        best = chosen.setdefault(key, {})
        replicate = (row["seed"], row.get("subset_seed"))
        current = best.get(replicate)
        if current is None or heldout_accuracy(row) > heldout_accuracy(current):
            best[replicate] = row
    return {
        key: Cell([float(r[metric]) for r in by_seed.values()], list(by_seed.values()))
        for key, by_seed in chosen.items()
    }


def heldout_accuracy(row: dict) -> float:
    value = row.get("val/acc1_best")
    return float(value) if value not in (None, "") else float("-inf")


def natural(values: tuple) -> tuple:
    """Sort key of a column: numbers by value (block 5 before block 11), then text."""
    order = []
    for value in values:
        try:
            order.append((0, float(value), ""))
        except ValueError:
            order.append((1, 0.0, str(value)))
    return tuple(order)


def column_label(values: tuple, keys: list[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all jobs"


def markdown(
    table: dict[tuple, Cell],
    keys: list[str],
    jobs: list[Job],
    title: str,
    comparisons: Comparisons | None = None,
    sections: list[list[str]] = (),
) -> str:
    """Heads as rows, the varying config values as columns, each cell with its interval and
    significance mark (``comparisons``), what they mean; further ``sections`` (each its
    lines: the published figures beside ours, the evaluated sets); then every job that did
    not finish, by name, with its error's last line."""
    columns = sorted({key[:-1] for key in table}, key=natural)
    heads = sorted({key[-1] for key in table})
    stats = comparisons.cells if comparisons else {}
    lines = [f"# {title}", ""]
    if not table:
        lines.append(f"No finished job yet: none of the {len(jobs)} jobs has results to show.")
    else:
        lines.append("| head | " + " | ".join(column_label(c, keys) for c in columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
    for head in heads:
        row = [
            table[(*c, head)].text(stats.get((*c, head))) if (*c, head) in table else "-"
            for c in columns
        ]
        lines.append(f"| {head} | " + " | ".join(row) + " |")
    if table and comparisons:
        lines += ["", *legend(comparisons)]
    for section in sections:
        lines += ["", *section]
    unfinished = [job for job in jobs if job.status != "done"]
    if unfinished:
        lines += ["", f"## Not in the table: {len(unfinished)} of {len(jobs)} jobs", ""]
        for job in unfinished:
            detail = f": {job.error}" if job.error else ""
            lines.append(f"- **{job.status}** `{job.name}`{detail}")
    return "\n".join(lines) + "\n"


def legend(comparisons: Comparisons) -> list[str]:
    """What the brackets and marks of the table mean, and which runs could not be tested."""
    lines = []
    if meanings := comparisons.interval_meanings:
        lines.append(f"Brackets: 95% confidence interval of the test accuracy, {meanings}.")
    if comparisons.marked:
        lines.append(
            f"{WINNER_MARK}: the column's winner (best mean held-out accuracy); {SAME_MARK}: not "
            "significantly different from it (McNemar's exact test on the same test images, "
            "Holm-corrected across the column's heads, adjusted p >= 0.05 in some seed); "
            f"unmarked in a column with {WINNER_MARK}: significantly different in every seed "
            "(unless its run has no predictions, below). Each test: significance.csv."
        )
    if comparisons.missing:
        runs = ", ".join(path.name for path in comparisons.missing[:3])
        more = f" and {len(comparisons.missing) - 3} more" if len(comparisons.missing) > 3 else ""
        lines.append(
            f"No per-image predictions (predictions.safetensors) in {len(comparisons.missing)} "
            f"run(s): {runs}{more}; runs written before that file existed. Their heads have no "
            "bootstrap interval and no significance mark; rerun them to add both."
        )
    return ["- " + line for line in lines]
