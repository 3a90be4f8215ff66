"""The command line as users type it, in subprocesses (every test here is slow)."""

import json
import signal
import time

import pytest

from mim_agg.cli import CONFIG_DIR
from mim_agg.tasks import TASKS
from tests.helpers import FAST, PROJECT_ROOT, popen_cli, run_cli

pytestmark = pytest.mark.slow


def test_help_lists_tasks_every_group_and_option_and_the_scripts(tmp_path):
    result = run_cli("--help", root=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    rows: dict[str, str] = {}
    for line in text.split("== Config groups ==")[1].split("== Scripts ==")[0].splitlines():
        if line.strip():
            if not line.startswith(" "):
                name, _, line = line.partition(" ")
            rows[name] = rows.get(name, "") + " " + line
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        if folder.name == "local":  # optional and git-ignored: nothing to choose
            continue
        for option in sorted(f.stem for f in folder.glob("*.yaml")):
            assert option in rows[folder.name], f"--help does not list {folder.name}={option}"
    for task in TASKS:
        assert f"\n  {task} " in text, f"--help does not describe task={task}"
    for script in (PROJECT_ROOT / "scripts").glob("*.py"):
        if script.name != "gpu_check.py":  # run through gpu_check.sh
            assert f"scripts/{script.name}" in text, f"--help does not mention {script.name}"
    assert "schema" not in text.split("== Config ==")[0]  # the config schemas are no options
    # What a newcomer needs (the backbone list wraps as the zoo grows); --cfg job prints the config.
    assert len(text.splitlines()) < 75


def test_cfg_job_shows_the_composed_config(tmp_path):
    result = run_cli("--cfg", "job", "aggregator=topk_attn", "backbone=mae_vitb", root=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "name: topk_attn" in result.stdout and "weights: vit_base_patch16_224.mae" in result.stdout
    )


def test_a_misspelled_option_is_one_message_naming_the_nearest_and_exit_status_2(tmp_path):
    result = run_cli("aggregator=abmilpp", root=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (message,) = result.stderr.splitlines()
    assert message.startswith("Error: aggregator=abmilpp: no such option. Did you mean ")
    assert "aggregator=abmilp? The choices of aggregator: abmilp, abmilp_gated," in message
    assert not (tmp_path / "outputs").exists()  # refused before a run folder was made
    shown = run_cli("aggregator=abmilpp", root=tmp_path, HYDRA_FULL_ERROR="1")
    assert shown.returncode == 1 and "MissingConfigException" in shown.stderr  # asked for it


def test_a_value_hydra_meets_naming_the_run_folder_is_one_message(tmp_path):
    """``seed=abc`` reaches a typed key (``dataset.subset_seed = ${seed}``) while Hydra names
    the run folder, before any check of ours: one message, exit 2 (it was OmegaConf's
    traceback, exit 1)."""
    result = run_cli("seed=abc", root=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (message,) = result.stderr.splitlines()
    assert "'${seed}'" in message and "(resolving dataset.subset_seed)" in message


def test_missing_dataset_folder_fails_before_training(tmp_path):
    result = run_cli(
        *FAST,
        "dataset=image_folder",
        f"dataset.root={tmp_path}/none",
        "dataset.num_classes=3",
        root=tmp_path,
    )
    assert result.returncode == 2  # a user error: one message, no traceback
    assert "has no train/ folder" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_not_yet_downloaded_says_the_command_that_fetches_it(tmp_path):
    overrides = ["backbone=capi_vitl", "backbone.img_size=28", "aggregator=mean"]
    result = run_cli(*FAST, *overrides, root=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "capi_vitl14_lvd.pth" in result.stderr
    assert "python scripts/download_weights.py backbone=capi_vitl" in result.stderr


def test_quickstart(tmp_path):
    result = run_cli("experiment=quickstart", root=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = (tmp_path / "outputs" / "runs").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test/acc1"] > 0.4  # 10 classes: chance is 0.1
    log = (metrics_file.parent / "cli.log").read_text()
    for text in (result.stdout, log):  # the console's story is also the run's log
        assert "test acc1" in text and "Winner cls_mean" in text and "Run folder:" in text
    assert "epoch 14 of 15" in log


def test_rerunning_a_command_finds_its_run_and_a_sweep_links_its_jobs(tmp_path):
    single = run_cli(*FAST, "probe.epochs=1", "aggregator=mean", root=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("probe-vit_tiny-mean-synthetic-")
    assert f"Run folder: {run_dir}" in single.stdout  # said at start and at the end

    sweep = run_cli("-m", *FAST, "probe.epochs=1", "aggregator=cls,mean", root=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "finished before; its results are not recomputed" in sweep.stdout  # the mean job
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").iterdir()
    links = sorted(p for p in sweep_dir.iterdir() if p.is_symlink())
    assert [p.name.split("-")[0] for p in links] == ["0", "1"]
    assert links[1].resolve() == run_dir.resolve()
    winners = [json.loads((link / "metrics.json").read_text())["winner"] for link in links]
    assert winners == ["cls", "mean"]
    records = [json.loads((link / "run.json").read_text()) for link in links]
    assert [r["group"] for r in records] == [sweep_dir.name, run_dir.name]  # W&B: first job's
    assert records[0]["label"] == "aggregator=cls"  # the W&B name: what differs in the sweep


def test_a_second_run_in_a_busy_folder_refuses_at_once(tmp_path):
    command = [*FAST, "aggregator=mean", "probe.epochs=30"]
    first = popen_cli(*command, root=tmp_path)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "outputs" / "runs").glob("*/cli.log")):
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.2)
        second = run_cli(*command, root=tmp_path, timeout=60)
        assert second.returncode == 2
        assert "is in use by another process (pid " in second.stderr
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == [
        "preempted"
    ]  # the refused run left no trace
