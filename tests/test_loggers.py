import json
import signal
import time

import pytest

from mim_agg.runs.runner import run_task as run
from mim_agg.runs.runner import run_task as run_analysis
from mim_agg.utils.loggers import wandb_mode
from tests.helpers import FAST, compose_config, run_cli
from tests.signals import signal_once


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))


def test_wandb_is_offline_without_a_key_and_never_prompts(no_wandb_login, monkeypatch):
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "offline"


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_offline_wandb_run_is_written_and_finished(no_wandb_login, tmp_path):
    cfg = compose_config([*FAST, "logger=wandb", "probe.epochs=1"], tmp_path)
    run(cfg)
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert any(run_dir.glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished: the next multirun job gets its own run


def test_analysis_logs_each_figure_under_its_own_key(no_wandb_login, tmp_path, caplog):
    """``figures/<name>`` per PNG, and the statistics as a table; figures of different sizes
    under one key made W&B warn that image sizes do not match."""
    cfg = compose_config(
        [
            *FAST,
            "task=analyze",
            "logger=wandb",
            "analysis.num_images=8",
            "analysis.batch_size=8",
            "analysis.embedding_images=8",
        ],
        tmp_path,
    )
    run_analysis(cfg)
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    figures = sorted(p.name.rsplit("_", 2)[0] for p in (media / "images" / "figures").iterdir())
    assert figures == ["attention_maps", "attention_stats", "embedding"]
    assert list((media / "table").glob("attention_stats_*.table.json"))
    assert "sizes do not match" not in caplog.text


@pytest.mark.slow
def test_a_resumed_run_logs_into_the_same_wandb_run(no_wandb_login, tmp_path):
    """SIGTERM mid-training, then the same command: one W&B run id, group and job type in
    both attempts' offline logs (wandb.init's own signal handlers must not swallow SIGTERM)."""
    command = [
        *FAST,
        "logger=wandb",
        signal_once("SIGTERM", "train_batch", 3, tmp_path / "fired"),
    ]
    first = run_cli(*command, root=tmp_path, WANDB_MODE="offline")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    second = run_cli(*command, root=tmp_path, WANDB_MODE="offline")
    assert second.returncode == 0, second.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{record['run_id']}") for a in attempts)
    for attempt in attempts:
        (log,) = attempt.glob("*.wandb")
        data = log.read_bytes()
        assert record["group"].encode() in data and b"probe" in data  # group, job type


def test_unreachable_wandb_falls_back_to_offline_at_once(no_wandb_login, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key: W&B would go online
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = compose_config([*FAST, "logger=wandb", "probe.epochs=1"], tmp_path)
    started = time.perf_counter()
    run(cfg)
    assert time.perf_counter() - started < 60
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
