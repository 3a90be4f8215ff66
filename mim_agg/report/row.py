"""efficient-probing's leaderboard layout: one row per backbone, its k-NN, LP and EP.

A row comes from the jobs of ``experiment=ep_row``: a ``task=knn`` job and a ``task=probe`` job on
the same backbone and data. LP is the probe's head named by ``aggregator`` (``cls`` or
``mean``: the backbone's ``linear_input``), k-NN that aggregator's k-NN result, EP the probe's
``efficient_probe`` head. Each cell is our test top-1 of the held-out-selected choice (k and T
for k-NN, the learning rate and epoch for LP and EP). Beside them, labelled: the last epoch's
test accuracy (``test/acc1_last``, which selects nothing) and, from runs with
``probe.test_each_epoch``, the best epoch's test accuracy over the learning rates
(``test/acc1_best_epoch``): the leaderboard's own rule, which selects on the test split. Last,
where the backbone, data and head have one, the published figure (``mim_agg.report.published``)
and our held-out choice's difference from it.
"""

from __future__ import annotations

from mim_agg.report.published import figure_of
from mim_agg.report.runs import Job, backbone_name
from mim_agg.report.table import flatten, head_key

EP_HEAD = "efficient_probe"
COLUMNS = (
    "backbone",
    "family",
    "dataset",
    "k-NN",
    "LP",
    "EP",
    "LP (last epoch)",
    "EP (last epoch)",
    "LP (best epoch on test)",
    "EP (best epoch on test)",
    "k-NN (published)",
    "LP (published)",
    "EP (published)",
)


def _row_key(job: Job) -> tuple:
    flat = flatten(job.config)
    backbone = {k: v for k, v in flat.items() if k.startswith("backbone.")}
    return backbone_name(job), repr(sorted(backbone.items())), flat.get("dataset.name")


def _selected(rows: list[dict], head: str) -> dict | None:
    """The held-out-selected row of ``head`` among its learning rates."""
    candidates = [r for r in rows if head_key(r) == head]
    if not candidates:
        return None
    return max(candidates, key=lambda r: float(r.get("val/acc1_best") or "-inf"))


def _best_on_test(rows: list[dict], head: str) -> dict | None:
    """The leaderboard's figure for ``head``: the best test accuracy over its epochs and
    learning rates, chosen on the test split itself."""
    candidates = [r for r in rows if head_key(r) == head and r.get("test/acc1_best_epoch")]
    return max(candidates, key=lambda r: float(r["test/acc1_best_epoch"]), default=None)


def _percent(row: dict | None, metric: str = "test/acc1") -> str:
    value = (row or {}).get(metric)
    return "-" if value in (None, "") else f"{100 * float(value):.1f}"


def _published(job: Job | None, head: str, ours: dict | None) -> str:
    """``67.8 (-0.3)``: the published figure of ``head`` and ours (held-out choice) minus it;
    ``-`` where none is published."""
    figure = figure_of(job, head) if job else None
    if figure is None:
        return "-"
    value = (ours or {}).get("test/acc1")
    if value in (None, ""):
        return f"{figure.value:.1f}"
    return f"{figure.value:.1f} ({100 * float(value) - figure.value:+.1f})"


def leaderboard_rows(jobs: list[Job]) -> list[dict]:
    """One row per backbone (and data) that has a finished k-NN or probe job of an ep_row."""
    groups: dict[tuple, dict[str, Job]] = {}
    for job in jobs:
        task = job.config.get("task")
        if job.status == "done" and task in ("knn", "probe"):
            groups.setdefault(_row_key(job), {})[task] = job
    rows = []
    for (name, _, dataset), by_task in groups.items():
        any_job = next(iter(by_task.values()))
        linear = (any_job.config.get("aggregator") or {}).get("name")
        knn, probe = by_task.get("knn"), by_task.get("probe")
        lp = _selected(probe.heads, linear) if probe else None
        ep = _selected(probe.heads, EP_HEAD) if probe else None
        knn_row = _selected(knn.heads, linear) if knn else None
        rows.append(
            {
                "backbone": name,
                "family": flatten(any_job.config).get("backbone.family"),
                "dataset": dataset,
                "k-NN": _percent(knn_row),
                "LP": _percent(lp),
                "EP": _percent(ep),
                "LP (last epoch)": _percent(lp, "test/acc1_last"),
                "EP (last epoch)": _percent(ep, "test/acc1_last"),
                "LP (best epoch on test)": _percent(
                    _best_on_test(probe.heads, linear) if probe else None, "test/acc1_best_epoch"
                ),
                "EP (best epoch on test)": _percent(
                    _best_on_test(probe.heads, EP_HEAD) if probe else None, "test/acc1_best_epoch"
                ),
                "k-NN (published)": _published(knn, linear, knn_row),
                "LP (published)": _published(probe, linear, lp),
                "EP (published)": _published(probe, EP_HEAD, ep),
                "linear_input": linear,
            }
        )
    return rows


def is_leaderboard(jobs: list[Job]) -> bool:
    """Jobs of ``experiment=ep_row``: k-NN and probe jobs, the probes training EP."""
    tasks = {job.config.get("task") for job in jobs if job.status == "done"}
    probes = [j for j in jobs if j.status == "done" and j.config.get("task") == "probe"]
    return tasks == {"knn", "probe"} and all(
        any(head_key(r) == EP_HEAD for r in j.heads) for j in probes
    )


def leaderboard_markdown(rows: list[dict]) -> str:
    lines = [
        "# efficient-probing's leaderboard layout: test top-1 (%)",
        "",
        "k-NN, LP and EP: each chosen on held-out (k and T; learning rate and epoch). Then the",
        "last epoch's test accuracy, which selects nothing, and the best epoch's test accuracy",
        "(over learning rates too): the leaderboard's own rule, which selects on the test split,",
        "so it reads higher than a held-out choice by construction. Published: the figure of",
        "mim_agg/report/published.csv for this backbone, data and head (efficient-probing's:",
        "best epoch, or k and T, on the test split), then ours (held-out choice) minus it.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---" * len(COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
