"""Trusting a token cache: an image replaced behind the key's back, an edited manifest or a
shard damaged with its time restored is never trained on, and a complete cache is read from a
read-only mount."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from mim_agg.cache import CacheError
from mim_agg.errors import ConfigError
from mim_agg.runs.runner import run_task
from mim_agg.validation import check_ranges
from tests.helpers import compose_config
from tests.test_cache import GRID_4x4, cache_for, first_batch, image_folder, open_run_cache

MEAN = ["aggregator=mean", "dataset.num_workers=0"]
SMALL = [*MEAN, "dataset.train_size=60", "dataset.test_size=20"]  # a third of the images


@pytest.fixture
def read_only():
    """Make a folder read-only for real: a read-only bind mount as root (whom chmod does not
    stop), ``chmod a-w`` for anyone else; skipped where a root cannot mount."""
    undo = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            mount = shutil.which("mount")
            command = [mount, "-o", "bind,ro", str(folder), str(folder)]
            result = subprocess.run(command, capture_output=True, text=True) if mount else None
            if result is None or result.returncode != 0:
                pytest.skip(f"no read-only bind mount here: {result and result.stderr}")
            undo.append(lambda: subprocess.run(["umount", "-l", str(folder)], check=True))
        else:
            paths = [folder, *folder.rglob("*")]
            modes = {path: path.stat().st_mode for path in paths}
            for path in paths:
                path.chmod(modes[path] & ~0o222)
            undo.append(lambda: [path.chmod(mode) for path, mode in modes.items()])
        assert not os.access(folder, os.W_OK)

    yield make
    for step in reversed(undo):
        step()


def folder_cache(data: Path, tmp_path: Path):
    overrides = [*MEAN, "dataset=image_folder", f"dataset.root={data}"]
    return cache_for([*overrides, "dataset.heldout_fraction=0.5"], tmp_path)[2]


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_an_image_replaced_with_its_old_size_and_time_is_not_served_from_the_cache(tmp_path):
    data = image_folder(tmp_path / "data")
    image = data / "val" / "a" / "0.png"
    Image.new("RGB", (16, 16), (0, 0, 0)).save(image, compress_level=0)  # size: pixels only
    first = folder_cache(data, tmp_path)
    before = image.stat()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(image, compress_level=0)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # as rsync -t leaves it
    assert image.stat().st_size == before.st_size
    replaced = folder_cache(data, tmp_path)
    assert replaced.root != first.root
    assert not (first_batch(replaced, "test", 4)[0].pooled["mean()"]).equal(
        first_batch(first, "test", 4)[0].pooled["mean()"]
    )


def edit_manifest(cache, edit) -> None:
    manifest = json.loads(cache.manifest_path.read_text())
    edit(manifest)
    cache.manifest_path.write_text(json.dumps(manifest, indent=2))


def test_a_manifest_with_fewer_classes_than_labels_is_refused_before_training(tmp_path):
    overrides = [*GRID_4x4, *SMALL, "probe.features=cached"]
    cache = cache_for(overrides, tmp_path)[2]
    edit_manifest(cache, lambda manifest: manifest.update(num_classes=1))
    changed = re.escape(f"{cache.manifest_path} is changed since it was written")
    with pytest.raises(CacheError, match=changed):
        run_task(compose_config(overrides, tmp_path))  # was a raw IndexError in the loss


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
@pytest.mark.parametrize("damage", ["count", "shard digest"])
def test_an_edited_manifest_is_refused_with_the_rebuild_command(tmp_path, damage):
    cfg, datamodule, cache = cache_for(SMALL, tmp_path)
    if damage == "count":  # the same shards, 10 images fewer trained on
        count = cache.manifest_entry("train")["plan"]["count"] - 10
        edit_manifest(cache, lambda m: m["splits"]["train"]["plan"].update(count=count))
    else:  # a shard damaged, its digest "fixed" to match
        edit_manifest(cache, lambda m: m["splits"]["test"]["shards"][0].update(sha256="0" * 64))
    with pytest.raises(CacheError, match=r"manifest.json is changed .* rebuild it: python run.py"):
        open_run_cache(cfg, datamodule)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_full_verification_finds_a_damaged_shard_whose_time_was_restored(tmp_path):
    cfg, datamodule, cache = cache_for(SMALL, tmp_path)
    shard = cache.root / "train" / "shard-00000.safetensors"
    before = shard.stat()
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    open_run_cache(cfg, datamodule)  # documented: hashed again only when its size or time change
    full = compose_config([*GRID_4x4, *SMALL, "cache.verify=full"], tmp_path)
    with pytest.raises(CacheError, match=r"shard-00000.safetensors is damaged.*rebuild it"):
        open_run_cache(full, datamodule)


def test_cache_verify_takes_true_false_or_full(tmp_path):
    with pytest.raises(ConfigError, match="cache.verify=quick is invalid.*true, false or full"):
        check_ranges(compose_config([*GRID_4x4, "cache.verify=quick"], tmp_path))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_complete_cache_trains_from_a_read_only_mount(tmp_path, read_only, caplog):
    overrides = [*GRID_4x4, *SMALL, "probe.features=cached"]
    cache = cache_for(overrides, tmp_path)[2]
    (cache.root / "verified.json").unlink()  # every shard is hashed, and cannot be recorded
    read_only(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="mim_agg"):
        result = run_task(compose_config(overrides, tmp_path))
    assert result["winner"]
    assert "verified.json cannot be written" in caplog.text


def test_a_cache_to_extract_on_a_read_only_mount_is_refused_naming_the_fix(tmp_path, read_only):
    (tmp_path / "cache").mkdir()
    read_only(tmp_path / "cache")
    folder = re.escape(f"The token cache {tmp_path / 'cache'}/") + r"\S+ must be extracted"
    with pytest.raises(CacheError, match=rf"{folder}.*Set paths.cache_dir= to a writable folder"):
        cache_for(SMALL, tmp_path)


def test_the_rebuild_command_carries_only_what_an_extraction_reads():
    """A refused logreg run's command names task=extract with the run's backbone and data,
    never its logreg.* settings or resume=false, plus the centre crop and one view it reads."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from mim_agg.cache.build import rebuild_command
    from mim_agg.cli import CONFIG_DIR

    given = ["task=logreg", "resume=false", "logreg.c_steps=3", "knn.k=[5]", "dataset=digits"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*given, "+aggregator@heads.m=mean"], return_hydra_config=True
        )
    hydra = HydraConfig.instance()
    hydra.set_config(cfg)
    try:
        command = rebuild_command(cfg)
    finally:
        hydra.cfg = None  # the process's Hydra state as the other tests expect it
    assert command == (
        "python run.py task=extract dataset=digits +aggregator@heads.m=mean "
        "dataset.augment=false cache.views=1"
    )
