"""One token cache filled by several processes (``cache.part=i/N``, the ranks of
``trainer=ddp_sim``) is byte for byte the cache one process writes; a part or rank stopped
midway continues after its last complete shard, and a signal to one rank stops them all."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mim_agg.data.sources import SOURCES
from mim_agg.errors import ConfigError
from mim_agg.runs.runner import run_task
from mim_agg.validation import check_ranges
from tests.helpers import FAST, compose_config, run_cli

# 36 train, 12 held-out, 16 test images in shards of 8: 5 + 2 + 2 shards.
EXTRACT = [
    "task=extract",
    *FAST,
    "dataset.train_size=48",
    "dataset.test_size=16",
    "cache.shard_size=8",
    "cache.batch_size=8",
]


def extract(root: Path, *overrides: str) -> dict:
    return run_task(compose_config([*EXTRACT, *overrides], root))


def only_cache(root: Path) -> Path:
    (cache,) = (root / "cache").iterdir()
    return cache


def cache_files(cache: Path) -> dict[str, bytes]:
    """What a cache serves: its plan, manifest and shards (the records, which also hold the
    shards' modification times, and the locks are the writers' own)."""
    files = [cache / "plan.json", cache / "manifest.json"]
    files += sorted(cache.glob("*/shard-*.safetensors"))
    return {str(path.relative_to(cache)): path.read_bytes() for path in files}


def written_at(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.glob("*/shard-*.*")}


@pytest.mark.slow  # extracts for seconds
def test_parts_write_the_one_process_cache_and_a_rerun_part_continues(tmp_path):
    extract(tmp_path / "one")
    reference = cache_files(only_cache(tmp_path / "one"))

    parts = tmp_path / "parts"
    assert extract(parts, "cache.part=1/2")["complete"] is False
    cache = only_cache(parts)
    assert not (cache / "manifest.json").exists()
    train = sorted(p.name for p in cache.glob("train/shard-*.safetensors"))
    assert train == ["shard-00001.safetensors", "shard-00003.safetensors"]  # every second one

    # Part 1 killed while writing train shard 3: its file may be there, its record is not.
    (cache / "train" / "shard-00003.json").unlink()
    before = written_at(cache)
    extract(parts, "cache.part=1/2")
    after = written_at(cache)
    assert [name for name in before if before[name] != after[name]] == [
        "train/shard-00003.safetensors"
    ]

    assert extract(parts, "cache.part=0/2")["complete"] is True  # the last part completes it
    assert cache_files(cache) == reference
    assert not list(cache.glob("*/.*.tmp"))


@pytest.mark.parametrize("part", ["0/0", "3/2", "2/2", "x", "1"])
def test_a_part_outside_its_range_is_refused_naming_the_key(tmp_path, part):
    with pytest.raises(ConfigError, match=f"cache.part={part} is invalid.*i/N with 0 <= i < N"):
        check_ranges(compose_config([*EXTRACT, f"cache.part={part}"], tmp_path))


def test_a_part_is_refused_outside_task_extract(tmp_path):
    cfg = compose_config([*FAST, "probe.features=cached", "cache.part=0/2"], tmp_path)
    with pytest.raises(ConfigError, match="cache.part=0/2 is invalid.*with task=extract"):
        check_ranges(cfg)


@pytest.mark.slow  # two runs on two processes each
def test_ranks_stop_together_on_a_signal_to_one_and_resume_to_the_one_process_cache(
    tmp_path, monkeypatch
):
    """SIGUSR1 to rank 1 as it loads its first image: both ranks finish their current shard
    (rank 0 its first, rank 1 its first) and exit 128 + SIGUSR1. The rerun, a probe trained
    from the cache on the same two ranks, writes the rest before the trainer joins the ranks
    the extraction started, and the cache is the one a single process writes."""
    command = [*EXTRACT, "dataset.name=synthetic_signal", "trainer=ddp_sim"]
    env = {
        "MIM_AGG_PLUGINS": "tests.extraction_signal",
        "MIM_AGG_TEST_SIGNAL": f"SIGUSR1:1:{tmp_path / 'fired'}",
    }
    (tmp_path / "ddp").mkdir()
    first = run_cli(*command, root=tmp_path / "ddp", **env)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert log.count("Exiting with status 138 (SIGUSR1)") == 2  # both ranks
    cache = only_cache(tmp_path / "ddp")
    assert not (cache / "manifest.json").exists()
    done = sorted(str(p.relative_to(cache)) for p in cache.glob("*/shard-*.json"))
    assert done == ["heldout/shard-00000.json", "heldout/shard-00001.json"]
    before = written_at(cache)

    probe = [*command[1:], "task=probe", "probe.features=cached"]
    second = run_cli(*probe, root=tmp_path / "ddp", **env)
    assert second.returncode == 0, second.stderr[-3000:]
    (run_dir,) = (tmp_path / "ddp" / "outputs" / "runs").iterdir()
    assert (run_dir / "metrics.json").is_file()
    after = written_at(cache)
    assert {name: after[name] for name in before} == before  # kept, not written again

    monkeypatch.setitem(SOURCES, "synthetic_signal", SOURCES["synthetic"])  # the same images
    extract(tmp_path / "one", "dataset.name=synthetic_signal")
    assert cache_files(cache) == cache_files(only_cache(tmp_path / "one"))
