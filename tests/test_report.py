"""task=report: one table per sweep, keyed on every varying config value, seeds as
mean ± std (n), learning rates chosen on held-out, unfinished jobs listed by name."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import statistics

import pytest
from omegaconf import OmegaConf

from mim_agg.errors import UserError
from mim_agg.report.table import cells, head_rows, varying_keys
from mim_agg.runs.runner import run_task
from mim_agg.utils.results import HEAD_COLUMNS, write_csv
from tests.helpers import FAST, compose_config


def fake_job(sweep_dir, number, overrides, status="done", heads=(), error=None, run_name=None):
    """A run folder as a probe job leaves it (named ``run_name``, as ``runs.identity.run_name``
    names one), linked into ``sweep_dir`` as job ``number``."""
    cfg = compose_config([*FAST, *overrides], sweep_dir.parent)
    run_dir = sweep_dir.parent / "runs" / (run_name or f"job{number}-{sweep_dir.name}")
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    record = {"status": status, "overrides": overrides, "attempts": [{"status": status}]}
    if error:
        record["error"] = error
    (run_dir / "run.json").write_text(json.dumps(record))
    if status == "done":
        rows = [
            {
                "head": h,
                "aggregator": h.split("_blr")[0],
                "blr": b,
                "val/acc1_best": v,
                "test/acc1": t,
            }
            for h, b, v, t in heads
        ]
        write_csv(run_dir / "heads.csv", rows)
    (sweep_dir / f"{number}-{run_dir.name}").symlink_to(run_dir)
    return run_dir


def fake_sweep(root, task_overrides, params=None):
    sweep_dir = root / "multirun" / "sweep"
    sweep_dir.mkdir(parents=True)
    OmegaConf.save(
        {"hydra": {"overrides": {"task": task_overrides}, "sweeper": {"params": params}}},
        sweep_dir / "multirun.yaml",
    )
    return sweep_dir


@pytest.fixture
def sweep(tmp_path):
    """2 datasets x 2 seeds, a learning-rate grid of 2 heads: one job failed, one missing."""
    sweep_dir = fake_sweep(tmp_path, ["dataset=synthetic,digits", "seed=0,1"])
    heads = {
        (0, 0): [("cls_blr0p1", 0.1, 0.60, 0.61), ("cls_blr1", 1.0, 0.65, 0.59)],
        (0, 1): [("cls_blr0p1", 0.1, 0.70, 0.66), ("cls_blr1", 1.0, 0.68, 0.70)],
        (1, 0): [("cls_blr0p1", 0.1, 0.90, 0.91), ("cls_blr1", 1.0, 0.80, 0.80)],
    }
    for number, (dataset, seed) in enumerate([(0, 0), (0, 1), (1, 0)]):
        name = ("synthetic", "digits")[dataset]
        fake_job(sweep_dir, number, [f"dataset={name}", f"seed={seed}"], heads=heads[dataset, seed])
    return sweep_dir


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_table_selects_on_heldout_per_seed_and_averages_seeds(sweep):
    cfg = compose_config(["task=report", f"report.sweep_dir={sweep}"])
    summary = run_task(cfg)
    assert summary["jobs"] == {"done": 3, "missing": 1}
    text = (sweep / "results.md").read_text()
    # synthetic: seed 0 picks blr 1 (held-out 0.65, test 0.59), seed 1 blr 0.1 (test 0.66).
    chosen = [0.59, 0.66]
    mean, std = 100 * statistics.fmean(chosen), 100 * statistics.stdev(chosen)
    half = 12.706204736174698 * std / 2**0.5  # t-interval: t quantile 0.975 at 1 degree
    expected = f"{mean:.2f} ± {std:.2f} [{mean - half:.2f}, 100.00] (2)"  # capped at 100
    assert expected == "62.50 ± 4.95 [18.03, 100.00] (2)"
    # Every differing value is a key: the datasets' configs differ in more than their name.
    digits = "dataset.heldout_fraction=0.1, dataset.name=digits, dataset.num_classes=10"
    synthetic = "dataset.heldout_fraction=0.25, dataset.name=synthetic, dataset.num_classes=4"
    assert f"| head | {digits} | {synthetic} |" in text
    assert f"| cls | 91.00 (1) | {expected} |" in text
    assert "- **missing** `dataset=digits seed=1`" in text
    # runs from before predictions.safetensors: said once, no marks, no per-image interval
    assert text.count("No per-image predictions (predictions.safetensors) in 3 run(s)") == 1
    assert "★" not in text and "≈" not in text and not (sweep / "significance.csv").exists()
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["dataset.name"] for r in rows} == {"synthetic", "digits"}
    assert (sweep / "results.png").stat().st_size > 10_000


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_unfinished_jobs_are_listed_with_their_error(tmp_path):
    sweep_dir = fake_sweep(tmp_path, ["seed=0,1,2,3"])
    fake_job(sweep_dir, 0, ["seed=0"], heads=[("cls", 0.1, 0.5, 0.5)])
    fake_job(sweep_dir, 1, ["seed=1"], status="failed", error="ValueError: bad block")
    running = fake_job(sweep_dir, 2, ["seed=2"], status="running")
    fake_job(sweep_dir, 3, ["seed=3"], status="running")  # nobody holds its lock: killed
    with open(running / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a live run holds its folder
        run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))
    text = (sweep_dir / "results.md").read_text()
    assert "## Not in the table: 3 of 4 jobs" in text
    assert "- **failed** `seed=1`: ValueError: bad block" in text
    assert "- **running** `seed=2`" in text and "- **killed** `seed=3`" in text


def test_several_sweeps_make_one_table(tmp_path):
    first = fake_sweep(tmp_path / "a", ["aggregator=cls"])
    fake_job(first, 0, ["aggregator=cls"], heads=[("cls", 0.1, 0.5, 0.40)])
    second = fake_sweep(tmp_path / "b", ["aggregator=mean"])
    fake_job(second, 0, ["aggregator=mean"], heads=[("mean", 0.1, 0.5, 0.45)])
    out = tmp_path / "report"
    cfg = compose_config(
        ["task=report", f"report.sweep_dir=[{first},{second}]", f"report.out_dir={out}"]
    )
    run_task(cfg)
    text = (out / "results.md").read_text()
    assert "| cls | 40.00 (1) |" in text and "| mean | 45.00 (1) |" in text
    twice = f"report.sweep_dir=[{first},{second},{first}]"  # a folder named twice is read once
    summary = run_task(compose_config(["task=report", twice, f"report.out_dir={out}"]))
    assert summary["jobs"] == {"done": 2}


@pytest.mark.parametrize("key", ["sweep_dir", "out_dir"])
def test_no_sweep_and_an_out_dir_that_cannot_be_made_are_refused_by_name(tmp_path, key):
    from mim_agg.errors import ConfigError

    sweep_dir = fake_sweep(tmp_path, ["seed=0"])
    fake_job(sweep_dir, 0, ["seed=0"], heads=[("cls", 0.1, 0.5, 0.5)])
    (tmp_path / "a_file").write_text("")
    if key == "sweep_dir":  # was: IndexError
        overrides, error, message = ["report.sweep_dir=[]"], ConfigError, "report.sweep_dir=\\[\\]"
    else:  # was: FileNotFoundError (or NotADirectoryError) from mkdir
        out = tmp_path / "a_file" / "report"
        overrides = [f"report.sweep_dir={sweep_dir}", f"report.out_dir={out}"]
        error, message = UserError, f"report's folder '{out}' cannot be made .*report.out_dir"
    with pytest.raises(error, match=message):
        run_task(compose_config(["task=report", *overrides]))


def test_a_copy_of_a_sweep_without_its_runs_is_refused_by_its_dangling_link(tmp_path):
    """``cp -a`` of a sweep folder elsewhere: its relative job links point nowhere (was: a
    FileNotFoundError of .../config.yaml)."""
    import shutil

    from mim_agg.report.runs import read_sweeps

    sweep_dir = fake_sweep(tmp_path / "here", ["seed=0"])
    run_dir = fake_job(sweep_dir, 0, ["seed=0"], heads=[("cls", 0.1, 0.5, 0.5)])
    (link,) = [path for path in sweep_dir.iterdir() if path.is_symlink()]
    link.unlink()
    link.symlink_to(os.path.relpath(run_dir, sweep_dir))  # as runs.folder links a job
    copy = tmp_path / "elsewhere" / "deeper" / "sweep"
    shutil.copytree(sweep_dir, copy, symlinks=True)
    (link,) = [path for path in copy.iterdir() if path.is_symlink()]
    report = ["task=report", f"report.sweep_dir=[{sweep_dir},{copy}]"]
    with pytest.raises(UserError, match=f"{link} .* points to ../runs/job0-sweep, .* no folder"):
        run_task(compose_config([*report, f"report.out_dir={tmp_path / 'out'}"]))
    # a job linked whose attempt has not yet written its run.json and config.yaml: running
    # while it holds the folder's lock, else killed; a finished one without its config: failed
    (run_dir / "config.yaml").unlink()
    (job,) = read_sweeps([sweep_dir])
    assert (job.status, job.error) == ("failed", f"{run_dir / 'config.yaml'} is missing")
    (run_dir / "run.json").unlink()
    (job,) = read_sweeps([sweep_dir])
    assert (job.status, job.path) == ("killed", run_dir)


def test_a_folder_without_a_sweep_is_refused(tmp_path):
    from mim_agg.errors import UserError

    with pytest.raises(UserError, match="no sweep folder"):
        run_task(compose_config(["task=report", f"report.sweep_dir={tmp_path}"]))
    with pytest.raises(UserError, match="nope' does not exist; give the folder a sweep"):
        run_task(compose_config(["task=report", f"report.sweep_dir={tmp_path / 'nope'}"]))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_every_differing_config_value_is_a_column(sweep):
    from mim_agg.report.runs import read_sweeps

    jobs = [job for job in read_sweeps([sweep]) if job.status == "done"]
    keys = varying_keys(jobs)
    # seed and learning rate are not keys: they are averaged over and selected on held-out
    assert keys == ["dataset.heldout_fraction", "dataset.name", "dataset.num_classes"]
    table = cells(head_rows(jobs, keys), keys)
    assert set(table) == {("0.25", "synthetic", "4", "cls"), ("0.1", "digits", "10", "cls")}
    assert HEAD_COLUMNS[0] == "head"


def test_backbones_of_two_families_are_columns_labelled_and_grouped_by_family(tmp_path):
    from mim_agg.report.runs import read_sweeps

    sweep_dir = fake_sweep(tmp_path, ["backbone.family=mim,jea"])
    heads = [("cls_blr0p1", 0.1, 0.6, 0.6)]
    for number, family in enumerate(["mim", "jea"]):
        fake_job(sweep_dir, number, [f"backbone.family={family}"], heads=heads)
    jobs = read_sweeps([sweep_dir])
    assert varying_keys(jobs) == ["backbone.family"]  # the label the run's hash leaves out
    table = cells(head_rows(jobs, ["backbone.family"]), ["backbone.family"])
    assert sorted(table) == [("jea", "cls"), ("mim", "cls")]


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_results_figure_names_what_the_jobs_share_and_labels_what_differs(sweep):
    from mim_agg.report.figure import results_figure
    from mim_agg.report.runs import read_sweeps
    from mim_agg.tasks.report import report_title

    jobs = [job for job in read_sweeps([sweep]) if job.status == "done"]
    keys = varying_keys(jobs)
    fig = results_figure(cells(head_rows(jobs, keys), keys), keys, report_title(jobs))
    (ax,) = fig.axes
    title = ax.get_title().replace("\n", " ")
    assert "backbone.arch=vit_tiny_patch16_224, backbone.weights=random" in title
    assert "dataset.name: per column" in title  # the datasets differ: the legend names them
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert [t for t in texts if "dataset.name=digits" in t] and len(texts) == 2
    assert ax.get_ylabel() == "test top-1 accuracy (%)"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_an_aggregator_sweep_names_heads_by_aggregator_and_their_differing_options(tmp_path):
    jobs = [["aggregator=cls"], ["aggregator=abmilp"]]
    jobs += [["aggregator=topk_attn", f"aggregator.k={k}"] for k in (1, 2)]
    sweep_dir = fake_sweep(tmp_path, ["aggregator=cls,abmilp", "seed=0"])
    for number, overrides in enumerate(jobs):
        head = overrides[0].split("=")[1]
        fake_job(sweep_dir, number, overrides, heads=[(head, 0.1, 0.5, 0.1 * (number + 1))])
    run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))
    text = (sweep_dir / "results.md").read_text()
    assert "| head | all jobs |" in text  # no aggregator option is a column
    for row in (
        "abmilp | 20.00",
        "cls | 10.00",
        "topk_attn (k=1) | 30.00",
        "topk_attn (k=2) | 40.00",
    ):
        assert f"| {row} (1) |" in text


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_report_of_no_finished_job_says_so(tmp_path):
    sweep_dir = fake_sweep(tmp_path, ["seed=0,1"])
    fake_job(sweep_dir, 0, ["seed=0"], status="failed", error="ConfigError: bad")
    run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))
    text = (sweep_dir / "results.md").read_text()
    assert "No finished job yet: none of the 2 jobs has results to show." in text
    assert "| head |" not in text and "- **failed** `seed=0`: ConfigError: bad" in text


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_relative_sweep_folder_is_taken_from_the_project_root(tmp_path, monkeypatch):
    sweep_dir = fake_sweep(tmp_path, ["seed=0"])
    fake_job(sweep_dir, 0, ["seed=0"], heads=[("cls", 0.1, 0.5, 0.5)])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # anywhere but the root
    cfg = compose_config(["task=report", "report.sweep_dir=multirun/sweep"], tmp_path)
    assert run_task(cfg)["out_dir"] == str(sweep_dir)
    assert (sweep_dir / "results.md").is_file()
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_sweep_of_analyses_is_pointed_to_the_figure_that_compares_them(tmp_path):
    sweep_dir = fake_sweep(tmp_path, ["seed=0,1"])
    for seed in (0, 1):
        run_dir = fake_job(sweep_dir, seed, ["task=analyze", f"seed={seed}"])
        (run_dir / "heads.csv").unlink()  # an analysis trains no heads
    with pytest.raises(UserError, match="trained no heads .* scripts/compare_attention.py"):
        run_task(compose_config(["task=report", f"report.sweep_dir={sweep_dir}"]))


def test_a_head_that_diverged_at_every_learning_rate_has_no_cell(tmp_path):
    from mim_agg.report.runs import read_sweeps

    sweep_dir = fake_sweep(tmp_path, ["aggregator=cls"])
    heads = [("cls_blr0p1", 0.1, 0.6, 0.6), ("mean_blr1", 1, "", ""), ("abmilp_blr1", 1, 0.7, 0.5),
             ("abmilp_blr1e3", 1e3, "", "")]  # fmt: skip
    fake_job(sweep_dir, 0, ["aggregator=cls"], heads=heads)
    jobs = read_sweeps([sweep_dir])
    table = cells(head_rows(jobs, []), [])
    assert sorted(table) == [("abmilp",), ("cls",)]  # mean diverged everywhere: no cell
    assert table[("abmilp",)].values == [0.5]  # the rate that diverged is never chosen
    out = tmp_path / "report"
    run_task(
        compose_config(["task=report", f"report.sweep_dir={sweep_dir}", f"report.out_dir={out}"])
    )
    assert "| abmilp |" in (out / "results.md").read_text()


def test_a_run_table_without_held_out_data_says_it_reads_the_last_epoch(caplog):
    """dataset.heldout_fraction=0: nothing chose an epoch, so the table says the last one
    (it said "held-out-selected" beside an epoch of None)."""
    import logging

    from mim_agg.utils.results import print_table

    result = {"test/acc1": 0.5, "test/acc5": 0.9, "test/acc1_last": 0.5, "diverged_at_step": None}
    with caplog.at_level(logging.INFO):
        print_table({"cls": {**result, "val/acc1_best": None, "best_epoch": None}}, "cls")
    assert "at the last epoch (nothing held out)" in caplog.text and "None" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        print_table({"cls": {**result, "val/acc1_best": 0.6, "best_epoch": 3}}, "cls")
    assert "at the held-out-selected epoch" in caplog.text and "│     3 │" in caplog.text


def test_the_figures_head_axis_names_what_held_out_chose():
    """A learning-rate grid (``builders.head_name``'s ``_blr`` suffix) is named on the axis; a
    head that trained once chose nothing there."""
    from mim_agg.report.figure import head_axis_label
    from mim_agg.report.table import Cell

    grid = {("digits", "cls"): Cell([0.5], [{"head": "cls_blr0p1"}])}
    assert head_axis_label(grid) == "head (held-out-selected learning rate)"
    assert head_axis_label({("digits", "cls"): Cell([0.5], [{"head": "cls"}])}) == "head"
