"""The token cache: what it stores equals what the live backbone gives, training from it equals
training online, and no damaged, partial or mismatching cache is ever read."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from mim_agg.backbones import FrozenBackbone
from mim_agg.builders import backbone_layout, build_aggregators, build_datamodule, build_probe
from mim_agg.cache import CachedTokens, CacheError, TokenCache, open_cache
from mim_agg.cache.data import CachedSplit
from mim_agg.cache.store import dequantize, quantize
from mim_agg.errors import ConfigError
from mim_agg.runs.identity import result_config
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, compose_config, popen_cli, run_cli

GRID_4x4 = [*FAST, "backbone.img_size=64"]  # 16 patches: every aggregator's defaults fit
EVERY_HEAD = [
    "heads=all",
    "heads.oracle_attn.oracle_arch=vit_tiny_patch16_224",
    "heads.oracle_attn.oracle_weights=null",
]


def cache_for(overrides, tmp_path, **kwargs):
    cfg = compose_config([*GRID_4x4, *overrides], tmp_path)
    L.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return cfg, datamodule, open_run_cache(cfg, datamodule, **kwargs)


def open_run_cache(cfg, datamodule, **kwargs):
    """``open_cache`` for the config's aggregators, as ``task=extract`` opens it."""
    aggregators = build_aggregators(cfg, backbone_layout(cfg)).values()
    return open_cache(cfg, datamodule, list(aggregators), **kwargs)


def first_batch(cache: TokenCache, split: str, size: int = 8, epoch: int | None = None):
    items = CachedSplit(cache, split)
    keys = range(size) if epoch is None else [(i, epoch) for i in range(size)]
    fields, targets = default_collate([items[key] for key in keys])
    return CachedTokens.of(cache)(fields), targets


def live_tokens(cfg, datamodule, split: str, size: int = 8, epoch: int | None = None):
    probe = build_probe(cfg, datamodule.num_classes)
    dataset = datamodule.splits[split]
    keys = range(size) if epoch is None else [(i, epoch) for i in range(size)]
    images, targets = default_collate([dataset[key] for key in keys])
    return probe, probe.source(images), targets


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_fp32_cache_serves_every_head_exactly_what_the_live_backbone_gives(tmp_path):
    cfg, datamodule, cache = cache_for([*EVERY_HEAD, "cache.dtype=float32"], tmp_path)
    probe, live, live_targets = live_tokens(cfg, datamodule, "test")
    cached, targets = first_batch(cache, "test")
    assert torch.equal(targets, live_targets)
    torch.testing.assert_close(cached.all, live.all, rtol=0, atol=1e-6)
    assert set(cached.pooled) == {
        h.aggregator.output_key for h in probe.heads.values() if h.aggregator.parameter_free
    }
    with torch.no_grad():
        for name, head in probe.heads.items():
            served, computed = head.aggregator(cached), head.aggregator(live)
            torch.testing.assert_close(served, computed, msg=name)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_bf16_cache_is_within_bf16_rounding_and_stores_only_pooled_vectors(tmp_path):
    cfg, datamodule, cache = cache_for(
        ["aggregator=attn_mean", "+aggregator@heads.cls=cls"], tmp_path
    )
    assert cache.manifest["fields"] == {"pooled/attn_mean()": [192], "pooled/cls()": [192]}
    probe, live, _ = live_tokens(cfg, datamodule, "heldout")
    cached, _ = first_batch(cache, "heldout")
    assert cached.all is None and cached.pooled["cls()"].dtype == torch.bfloat16
    for head in probe.heads.values():
        served = head.aggregator(cached).float()
        torch.testing.assert_close(served, head.aggregator(live), rtol=2**-8, atol=1e-6)


def test_int8_rows_round_to_within_half_a_step():
    values = torch.randn(4, 3, 10) * torch.logspace(-3, 3, 10)
    stored = quantize(values, "int8")
    assert stored[""].dtype == torch.int8 and stored[".scale"].shape == (4, 3, 1)
    restored = dequantize({"x": stored[""], "x.scale": stored[".scale"]})["x"]
    step = values.abs().amax(-1, keepdim=True) / 127
    assert ((restored - values).abs() <= step / 2 + 1e-7).all()


def test_float16_overflow_is_refused_not_stored_as_inf():
    with pytest.raises(CacheError, match="overflow cache.dtype=float16"):
        quantize(torch.tensor([1e6]), "float16")


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_views_are_the_online_epochs_augmentations(tmp_path):
    cfg, datamodule, cache = cache_for(
        ["cache.views=2", "cache.dtype=float32", "aggregator=mean"], tmp_path
    )
    view0, _ = first_batch(cache, "train", epoch=0)
    view1, _ = first_batch(cache, "train", epoch=1)
    view2, _ = first_batch(cache, "train", epoch=2)
    assert not torch.allclose(view0.pooled["mean()"], view1.pooled["mean()"])
    torch.testing.assert_close(view2.pooled["mean()"], view0.pooled["mean()"])  # e mod views
    _, live, _ = live_tokens(cfg, datamodule, "train", epoch=1)
    torch.testing.assert_close(view1.pooled["mean()"], live.patches.mean(1), atol=1e-6, rtol=0)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_probing_from_an_fp32_cache_reproduces_the_online_run(tmp_path):
    common = [*GRID_4x4, "heads=bench8", "dataset.augment=false", "cache.dtype=float32"]
    online = run_task(compose_config(common, tmp_path / "online"))
    cached = run_task(
        compose_config([*common, "probe.features=cached", "dataset.num_workers=1"], tmp_path / "c")
    )
    assert cached["winner"] == online["winner"]
    for name, head in online["heads"].items():
        assert cached["heads"][name]["test/acc1"] == pytest.approx(head["test/acc1"], abs=1e-6)
        assert cached["heads"][name]["test/loss"] == pytest.approx(head["test/loss"], rel=1e-4)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_damaged_truncated_or_foreign_caches_are_refused_before_training(tmp_path):
    overrides = ["aggregator=mean", "cache.shard_size=64"]
    _, datamodule, cache = cache_for(overrides, tmp_path)
    key = cache.manifest["key"]
    shard = cache.root / "train" / "shard-00001.safetensors"
    original = shard.read_bytes()

    shard.write_bytes(original[:-10])
    with pytest.raises(CacheError, match=r"shard-00001.safetensors is truncated.*rebuild"):
        cache.check(key)
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="damaged"):
        cache.check(key)
    cache.check(key, verify=False)  # sizes and headers alone cannot see a flipped bit
    shard.write_bytes(original)
    with pytest.raises(CacheError, match="written for other tokens"):
        cache.check("0" * 12)

    other = compose_config([*GRID_4x4, *overrides, "backbone.block=5"], tmp_path)
    with pytest.raises(CacheError, match="No complete token cache.*python run.py task=extract"):
        open_run_cache(other, datamodule, build=False)


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_cache_never_serves_another_request_or_other_data(tmp_path):
    _, _, mean = cache_for(["aggregator=mean"], tmp_path)
    _, _, cls = cache_for(["aggregator=cls"], tmp_path)
    _, _, fewer = cache_for(["aggregator=mean", "dataset.train_size=100"], tmp_path)
    _, _, again = cache_for(["aggregator=mean"], tmp_path)
    assert len({mean.root, cls.root, fewer.root}) == 3 and again.root == mean.root
    radio = ["aggregator=summary", "+backbone.arch_kwargs.reg_tokens=3"]  # 4 prefix tokens
    summaries = {
        n: cache_for([*radio, f"backbone.summary_tokens={n}"], tmp_path)[2] for n in (2, 3)
    }
    assert summaries[2].root != summaries[3].root  # another summary, another cache
    assert summaries[3].manifest["layout"]["num_summary_tokens"] == 3


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_one_backbone_pass_fills_every_listed_blocks_cache(tmp_path, monkeypatch):
    """``cache.blocks``: the caches of blocks 0 and 2 (a learned head's tokens and a
    parameter-free head's pooled vector each) come from one pass, under the keys and with the
    contents that separate extractions give them."""
    passes = []
    forward_blocks = FrozenBackbone.forward_blocks

    def counted(self, images):
        passes.append(len(images))
        return forward_blocks(self, images)

    monkeypatch.setattr(FrozenBackbone, "forward_blocks", counted)
    heads = ["aggregator=abmilp", "+aggregator@heads.attn=attn_mean", "cache.dtype=float32"]
    cache_for([*heads, "backbone.block=2", "cache.blocks=[0,2]"], tmp_path / "together")
    together_passes, passes[:] = len(passes), []
    apart = {b: cache_for([*heads, f"backbone.block={b}"], tmp_path / "apart")[2] for b in (0, 2)}
    assert together_passes == len(passes) / 2  # two blocks for the price of one pass
    for block, cache in apart.items():
        joint = TokenCache(tmp_path / "together" / "cache" / cache.root.name)
        assert joint.complete and joint.manifest["identity"]["block"] == block
        for split in ("train", "heldout", "test"):
            ours, theirs = joint.open_shard(split, 0), cache.open_shard(split, 0)
            assert ours.keys() == theirs.keys() == {"all", "pooled/attn_mean()", "targets"}
            for field in ours:  # block 0's explicit attention may round block 2 differently
                torch.testing.assert_close(ours[field], theirs[field], rtol=1e-5, atol=1e-5)


def test_blocks_outside_the_backbone_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"cache.blocks=\[0, 12\] holds \[12\]"):
        cache_for(["aggregator=abmilp", "cache.blocks=[0,12]"], tmp_path)


def test_not_enough_disk_refuses_before_writing(tmp_path, monkeypatch):
    import mim_agg.cache.extract as extract

    full_disk = SimpleNamespace(total=10**12, used=10**12, free=0)
    monkeypatch.setattr(extract.shutil, "disk_usage", lambda _: full_disk)
    with pytest.raises(CacheError, match=r"needs .* more, but only 0 B are free"):
        cache_for(["aggregator=mean"], tmp_path)
    assert not list(tmp_path.glob("cache/*/*/shard-*"))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_cache_options_count_only_for_runs_trained_from_it(tmp_path):
    def identity(*overrides):
        return result_config(compose_config([*FAST, *overrides], tmp_path))

    assert identity("cache.dtype=int8") == identity()
    assert identity("probe.features=cached", "cache.dtype=int8") != identity(
        "probe.features=cached"
    )
    for other in ("cache.verify=false", "cache.blocks=[0,1]"):
        assert identity("probe.features=cached", other) == identity("probe.features=cached")


@pytest.mark.slow
def test_killed_extraction_resumes_to_byte_identical_shards(tmp_path):
    args = [
        "task=extract",
        *GRID_4x4,
        "aggregator=abmilp",
        "cache.shard_size=8",
        "cache.batch_size=4",
    ]
    for root in ("reference", "killed"):
        (tmp_path / root).mkdir()
    reference = run_cli(*args, root=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    assert "Still to write" in reference.stdout and "Token cache ready" in reference.stdout

    process = popen_cli(*args, root=tmp_path / "killed")
    caches = tmp_path / "killed" / "cache"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(caches.glob("*/train/shard-*.json"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= len(list(caches.glob("*/train/shard-*.json"))) < 19, "the kill came too late"
    assert not list(caches.glob("*/manifest.json"))

    resumed = run_cli(*args, root=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    (left,) = (tmp_path / "reference" / "cache").iterdir()
    (right,) = caches.iterdir()
    assert left.name == right.name  # the same key
    files = sorted(p.relative_to(left) for p in left.glob("*/shard-*.safetensors"))
    assert files == sorted(p.relative_to(right) for p in right.glob("*/shard-*.safetensors"))
    assert not list(right.glob("*/.*.tmp"))
    for name in [*files, "manifest.json"]:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


class StopAfter:
    """A signal watch that 'receives a signal' during shard ``shards`` (from 0)."""

    def __init__(self, shards: int) -> None:
        self.left = shards

    def agree(self, reduce_max, broadcast) -> bool:
        self.left -= 1
        return self.left < 0

    def check(self) -> None:
        raise KeyboardInterrupt


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_resumed_extraction_keeps_its_first_shard_size(tmp_path):
    overrides = ["aggregator=mean", "cache.batch_size=8", "cache.dtype=float32"]
    with pytest.raises(KeyboardInterrupt):
        cache_for([*overrides, "cache.shard_size=16"], tmp_path, watch=StopAfter(2))
    cfg, _, cache = cache_for([*overrides, "cache.shard_size=50"], tmp_path)
    assert cache.manifest_entry("train")["plan"]["shard_size"] == 16
    _, reference = cache_for(overrides + ["cache.shard_size=16"], tmp_path / "ref")[1:]
    for split in ("train", "heldout", "test"):
        ours, expected = CachedSplit(cache, split), CachedSplit(reference, split)
        for index in (0, len(ours) - 1):
            torch.testing.assert_close(ours[index][0], expected[index][0], rtol=0, atol=0)


def image_folder(root: Path, shade: int = 0) -> Path:
    for split, count in (("train", 6), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                colour = (shade, 100 * (label == "a"), index * 20)
                Image.new("RGB", (16, 16), colour).save(root / split / label / f"{index}.png")
    return root


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_the_augmentation_seed_and_the_image_files_are_part_of_the_key(tmp_path):
    _, _, first = cache_for(["aggregator=mean", "dataset.heldout_fraction=0"], tmp_path)
    _, _, other_seed = cache_for(
        ["aggregator=mean", "dataset.heldout_fraction=0", "dataset.seed=1"], tmp_path
    )
    assert first.root != other_seed.root

    def folder_cache(root):
        overrides = ["aggregator=mean", "dataset=image_folder", f"dataset.root={root}"]
        overrides.append("dataset.num_workers=0")
        return cache_for([*overrides, "dataset.heldout_fraction=0.5"], tmp_path)[2].root

    clean = folder_cache(image_folder(tmp_path / "clean"))
    noisy = folder_cache(image_folder(tmp_path / "noisy", shade=200))  # same names elsewhere
    assert clean != noisy
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "clean" / "val" / "a" / "0.png")
    assert folder_cache(tmp_path / "clean") != clean  # an image rewritten in place
