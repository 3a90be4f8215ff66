"""Cost of comparing aggregators: one multi-head run against one single-head run (online, and
efficient-probing's fourteen poolers from cached tokens), each head alone on precomputed tokens,
the memory of one training step per pooler, and what the token cache saves. Writes JSON and
prints a table.

    python scripts/benchmark.py --out outputs/benchmark.json

Runs go through the real ``probe`` task (Hydra config, timm backbone, Lightning training) on
synthetic images; numbers are only comparable on the same machine. On a CUDA device it also
measures the peak memory of ``heads=ep`` at ViT-B at efficient-probing's effective batch of
4096 (``--ep-batch`` x ``--ep-accumulation``, through ``probe.effective_batch``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import platform
import resource
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_sample_images
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, TensorDataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from mim_agg.aggregators import AGGREGATORS, build_aggregator
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenLayout, TokenRequest, Tokens
from mim_agg.backbones.frozen import skeleton
from mim_agg.builders import aggregator_configs, build_head
from mim_agg.cache import TokenCache
from mim_agg.cache.data import CachedSplit
from mim_agg.cache.extract import Target, extract
from mim_agg.cache.store import SplitPlan
from mim_agg.cli import CONFIG_DIR
from mim_agg.data import ProbeDataModule
from mim_agg.data.datamodule import TransformedSubset
from mim_agg.data.decode import ImageFile, TurboDecode
from mim_agg.data.device_decode import collate, finish_images
from mim_agg.data.sampling import EpochSampler
from mim_agg.data.sources import load_image
from mim_agg.probe import ProbeHead
from mim_agg.runs.runner import run_task as run

BENCH8 = "bench8"
EP = "ep"  # efficient-probing's fourteen poolers at their leaderboard settings


def count(text: str) -> int:
    """An argument that counts something: argparse names the option and exits 2 otherwise."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is no integer >= 1")
    return int(text)


def count_or_zero(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is no integer >= 0")
    return int(text)


def duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is no finite number > 0")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm architecture")
    parser.add_argument("--img-size", type=count, default=224)
    parser.add_argument("--classes", type=count, default=4, help="70 synthetic images per class")
    parser.add_argument("--batch-size", type=count, default=32)
    parser.add_argument("--epochs", type=count, default=1)
    parser.add_argument("--head-seconds", type=duration, default=1.0, help="timing per head")
    parser.add_argument(
        "--repeats", type=count, default=2, help="runs per setting; the fastest counts"
    )
    parser.add_argument(
        "--extract-images", type=count, default=96, help="images per extraction measurement"
    )
    parser.add_argument(
        "--read-images", type=count, default=3072, help="images in the cache-read measurement"
    )
    parser.add_argument(
        "--memory-batch", type=count, help="batch of the per-pooler step memory (--batch-size)"
    )
    parser.add_argument(
        "--ep-arch", default="vit_base_patch16_224", help="heads=ep GPU memory: architecture"
    )
    parser.add_argument("--ep-batch", type=count, default=512, help="heads=ep GPU memory: batch")
    parser.add_argument(
        "--data-images", type=count, default=256, help="data path: 500 x 375 JPEGs measured"
    )
    parser.add_argument(
        "--data-workers", type=count_or_zero, default=2, help="data path: loader workers"
    )
    parser.add_argument(
        "--data-path-only", action="store_true", help="measure the data path alone (data_path)"
    )
    parser.add_argument(
        "--ep-accumulation", type=count, default=8, help="heads=ep GPU memory: batches per step"
    )
    return parser.parse_args()


def probe_wall_time(args: argparse.Namespace, overrides: list[str]) -> float:
    """Fastest of ``--repeats`` complete probing runs (build, train, select, test, write):
    the minimum is the least disturbed by whatever else the machine does."""
    return min(_one_run(args, overrides) for _ in range(args.repeats))


def _one_run(args: argparse.Namespace, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        run(compose_run(args, root, overrides))
        return time.perf_counter() - start


def fill_cache(args: argparse.Namespace, overrides: list[str]) -> None:
    """``task=extract``: the token cache of the run ``overrides`` describe (a cached one, with
    its ``paths.cache_dir``), so that timing that run leaves the backbone pass out."""
    with tempfile.TemporaryDirectory() as root:
        run(compose_run(args, root, [*overrides, "task=extract"]))


def compose_run(args: argparse.Namespace, root: str, overrides: list[str]):
    """A probing run on synthetic images of the benchmarked architecture, under ``root``."""
    base = [
        "debug=fast",
        f"backbone.arch={args.arch}",
        f"backbone.img_size={args.img_size}",
        f"dataset.num_classes={args.classes}",
        "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu",
        f"probe.epochs={args.epochs}",
        "probe.warmup_epochs=0",
        f"probe.batch_size={args.batch_size}",
        f"paths.root_dir={root}",
        f"paths.output_dir={root}/run-{len(list(Path(root).glob('run-*')))}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def head_throughput(name: str, layout: TokenLayout, args) -> dict:
    """Forward + backward images/s of one head on fixed tokens (no backbone)."""
    head = ProbeHead(build_aggregator(name, layout), num_classes=args.classes)
    tokens = Tokens.example(layout, head.aggregator.request(), args.batch_size, seed=0)
    targets = torch.randint(args.classes, (args.batch_size,))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.head_seconds or images == 0:
        loss = torch.nn.functional.cross_entropy(head(tokens), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += args.batch_size
    return {
        "trainable_params": head.num_trainable_parameters(),
        "head_images_per_s": images / (time.perf_counter() - start),
    }


def ep_poolers(args: argparse.Namespace) -> dict:
    """Per pooler of ``heads=ep`` (its leaderboard options), on the benchmarked architecture:
    trainable parameters and the memory of one training step (forward, backward, SGD with
    momentum, as LARS keeps one buffer too) of the head alone on ``--memory-batch`` float32
    token sets.

    ``tensor_bytes`` is counted, the same on every device: the input tokens, weights, gradients
    and momentum, and the activations autograd saves for backward (distinct storages, weights
    and tokens not counted twice); a floor of the step's peak that leaves out transient buffers
    (kernel workspaces, an operation's output freed before backward). ``peak_bytes`` is measured
    on CUDA alone: ``torch.cuda.max_memory_allocated`` over the step (after one warm-up step),
    bf16 autocast as ``trainer=gpu``. A CPU has no allocator peak to read: a process's RSS or
    tracemalloc (which does not see torch's allocations) would not measure the same thing, so
    none is reported."""
    batch = args.memory_batch or args.batch_size
    layout = skeleton(arch=args.arch, img_size=args.img_size).layout
    with tempfile.TemporaryDirectory() as root:
        cfg = compose_run(args, root, ["aggregator=cls", f"heads={EP}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    poolers = {}
    for key, options in aggregator_configs(cfg).items():
        if key == cfg.aggregator.name:
            continue  # the linear probe's input
        head = build_head(0, layout, OmegaConf.to_container(options), args.classes).to(device)
        tokens = Tokens.example(layout, head.aggregator.request(), batch, seed=0)
        poolers[key] = {
            "trainable_params": head.num_trainable_parameters(),
            **step_memory(head, tokens.map(lambda t: t.to(device)), args.classes),
        }
        del head, tokens
    return {"batch": batch, "device": device_name(), "poolers": poolers}


def step_memory(head: ProbeHead, tokens: Tokens, num_classes: int) -> dict:
    """``tensor_bytes`` and, on CUDA, ``peak_bytes`` of one training step (see ``ep_poolers``)."""
    inputs = tokens.tensors()
    cuda = inputs[0].is_cuda
    device = "cuda" if cuda else "cpu"
    generator = torch.Generator().manual_seed(0)
    weights = {p.untyped_storage().data_ptr() for p in head.parameters()}
    seen = weights | {t.untyped_storage().data_ptr() for t in inputs}
    batch = inputs[0].shape[0]
    targets = torch.randint(num_classes, (batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(record: bool = False) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with (
            torch.autocast(device, dtype=torch.bfloat16, enabled=cuda),
            hooks if record else nullcontext(),
        ):
            loss = torch.nn.functional.cross_entropy(head(tokens), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(record=True)  # warm-up: allocates gradients and momentum; counts the saved tensors
    params = sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad)
    figures = {
        "tensor_bytes": sum(t.numel() * t.element_size() for t in inputs)
        + 3 * params
        + sum(saved.values()),
        "saved_for_backward_bytes": sum(saved.values()),
    }
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        figures["peak_bytes"] = torch.cuda.max_memory_allocated()
    return figures


def ep_memory(
    arch: str, img_size: int, batch: int, accumulation: int, classes: int = 8, smoke: bool = False
) -> dict:
    """Peak GPU memory of ``heads=ep`` (with the linear probe) training from cached tokens at
    ``batch`` x ``accumulation`` images per optimizer step, through ``probe.effective_batch``:
    one epoch of a real ``probe`` run (LARS, bf16) on synthetic images of ``arch``, enough for
    one full step, after the cache is built by ``task=extract`` (not counted).
    ``peak_allocated_gb``: ``torch.cuda.max_memory_allocated`` over the run, ``peak_reserved_gb``
    what the caching allocator held. Without CUDA it is skipped (a note says so) unless
    ``smoke``, which runs the same code on the CPU with nothing measured (the tests)."""
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        return {"skipped": "no CUDA device: the GPU memory of heads=ep awaits a GPU run"}
    effective = batch * accumulation
    train = -(-effective // classes)  # images per class left for training
    per_class = -(-train * 4 // 3)  # dataset.heldout_fraction=0.25 keeps three quarters
    setting = argparse.Namespace(arch=arch, img_size=img_size, classes=classes, epochs=1)
    setting.batch_size = batch
    overrides = [
        "aggregator=cls",
        f"heads={EP}",
        "probe=lars",
        "probe.blr=0.1",
        f"probe.effective_batch={effective}",
        f"dataset.per_class=[{per_class},4]",
        "dataset.heldout_fraction=0.25",
        "dataset.augment=false",  # one stored view: the centre crop
        "probe.features=cached",
    ]
    with tempfile.TemporaryDirectory() as root:
        overrides.append(f"paths.cache_dir={root}/cache")  # not MIM_AGG_CACHE_DIR's
        run(compose_run(setting, root, [*overrides, "task=extract"]))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = run(compose_run(setting, root, overrides))
        seconds = time.perf_counter() - start
    figures = {
        "arch": arch,
        "batch_size": batch,
        "accumulation": accumulation,
        "effective_batch": effective,
        "heads": len(result.get("heads", {})) or None,
        "run_s": seconds,
        "device": device_name(),
    }
    if cuda:
        figures["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        figures["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        figures["device_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    else:
        figures["note"] = "smoke run on the CPU: the code path ran, no GPU memory was measured"
    return figures


def cache_figures(args: argparse.Namespace) -> dict:
    """What the token cache saves, for one abmilp head (which stores full tokens):
    ``cached_epoch_speedup``, training images/s from the cache over online, same data, both
    on the eval transform."""
    with tempfile.TemporaryDirectory() as root:
        common = ["aggregator=abmilp", "dataset.augment=false", "cache.dtype=bfloat16"]
        online = run(compose_run(args, root, common))
        cached = run(compose_run(args, root, [*common, "probe.features=cached"]))
    return {
        "online_train_images_per_s": online["train_images_per_s"],
        "cached_train_images_per_s": cached["train_images_per_s"],
        "cached_epoch_speedup": cached["train_images_per_s"] / online["train_images_per_s"],
        **cache_read(args),
    }


def cache_read(args: argparse.Namespace) -> dict:
    """``cache_read_ratio``: bytes/s of one pass of the cached train loader (sampler, item
    reads, collation: what the training loop does, without the head) over a raw sequential
    read of the same shard files into one buffer, both from the page cache, on a cache of
    ``--read-images`` bf16 token sets of the benchmarked architecture (larger than CPU caches,
    as real ones are)."""
    layout = skeleton(arch=args.arch, img_size=args.img_size).layout
    plan = SplitPlan(args.read_images, views=1, shard_size=1024)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        cache = TokenCache(root)
        splits = {"train": {"plan": asdict(plan), "shards": []}}
        cache.start({"key": "benchmark", "num_classes": 1, "splits": splits})
        for shard in range(plan.num_shards):
            count = len(plan.shard_range(shard))
            tokens = torch.randn(count, 1, layout.num_tokens, layout.dim, generator=generator)
            labels = torch.zeros(count, dtype=torch.int64)
            cache.write_shard("train", shard, {"all": tokens.bfloat16(), "targets": labels})
        cache.publish()
        files = [Path(root, s["file"]) for s in cache.manifest_entry("train")["shards"]]
        stored = sum(path.stat().st_size for path in files)
        buffer = bytearray(max(path.stat().st_size for path in files))

        def raw() -> int:
            for path in files:
                with open(path, "rb", buffering=0) as file:
                    file.readinto(buffer)
            return stored

        def loader() -> float:  # the training loop's: its sampler, shuffled, (index, epoch) keys
            split = CachedSplit(cache, "train")
            sampler = EpochSampler(split, num_replicas=1, rank=0, shuffle=True, seed=0)
            batches = DataLoader(split, batch_size=args.batch_size, sampler=sampler)
            return stored * sum(len(targets) for _, targets in batches) / args.read_images

        raw_rate, read_rate = _best_rate(raw), _best_rate(loader)
    return {
        "cache_bytes_per_image": stored / args.read_images,
        "cache_read_bytes_per_s": read_rate,
        "raw_read_bytes_per_s": raw_rate,
        "cache_read_ratio": read_rate / raw_rate,
    }


def _best_rate(work, repeats: int = 3) -> float:
    """The best of ``repeats`` rates of ``work()`` (which returns how much it did)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        amount = work()
        rates.append(amount / (time.perf_counter() - start))
    return max(rates)


def extract_overhead(args: argparse.Namespace) -> dict:
    """Extraction images/s over a bare timm ``forward_features`` loop on the same tensors, in
    the same batches: what the source, the field conversion and shard writing cost. ``bf16``:
    bf16 autocast on a GPU; on a CPU, float32 compute with bf16 storage."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.extract_images, 3, args.img_size, args.img_size, generator=generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(args.arch, img_size=args.img_size, num_classes=0).to(device).eval()
    backbone = FrozenBackbone(args.arch, img_size=args.img_size)
    source = LiveTokens(backbone, {backbone.block: TokenRequest()})
    rates = {}
    for name, dtype, precision in (
        ("fp32", "float32", "32-true"),
        ("bf16", "bfloat16", "bf16-mixed"),
    ):
        bf16 = device == "cuda" and name == "bf16"
        bare = _best_rate(partial(_bare_forward, model, images, args.batch_size, bf16))
        extraction = partial(_extraction, source, images, args.batch_size, dtype, precision)
        ours = _best_rate(extraction)
        rates[name] = {"bare_images_per_s": bare, "extract_images_per_s": ours}
    return {
        "extract_overhead": {
            name: rate["extract_images_per_s"] / rate["bare_images_per_s"]
            for name, rate in rates.items()
        },
        "extract_rates": rates,
    }


def _bare_forward(model, images: torch.Tensor, batch_size: int, bf16: bool) -> int:
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), autocast:
        for batch in images.split(batch_size):
            model.forward_features(batch.to(device)).cpu()
    return len(images)


def _extraction(source, images: torch.Tensor, batch_size: int, dtype: str, precision: str) -> int:
    """One shard of every image through ``mim_agg.cache.extract``, into a temporary cache."""
    split = TensorDataset(images, torch.zeros(len(images), dtype=torch.int64))
    plan = SplitPlan(len(images), views=1, shard_size=len(images))
    layout = source.layout
    with tempfile.TemporaryDirectory() as root:
        cache = TokenCache(root)
        cache.start({"key": "benchmark", "splits": {"train": {"plan": asdict(plan), "shards": []}}})
        target = Target(cache, layout.depth - 1, {"all": (layout.num_tokens, layout.dim)}, {})
        extract(
            [target],
            source,
            {"train": split},
            {"train": plan},
            dtype=dtype,
            batch_size=batch_size,
            num_workers=0,
            augmented=set(),
            precision=precision,
        )
    return len(images)


# The data path: JPEG files to the tensors a backbone reads, per CPU core. CPU time, not wall
# time: the figures hold on a machine that other work loads (its load average is recorded).
IMAGENET_SIZE = (500, 375)  # ImageNet's most common size (width, height)
LARGE_SIZE = (1000, 750)  # photographs kept larger than ImageNet's (own image folders)
DECODES = ("pil", "turbo", "turbo_dct", "gpu")  # dataset.decode; turbo* need simplejpeg
TURBO = (("turbo", None), ("turbo_dct", 256))  # TurboDecode's min_side for each
LOADERS = {  # the data module's own loaders, as a probing run iterates them
    "eval": lambda module: module.test_dataloader(),
    "train": lambda module: module.train_loader(),
}


def photo_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG (quality 90) with a photograph's spectrum: random phases under the 1/f amplitude
    of natural images, luminance and weaker colour. At 500 x 375, about 120 KB, as ImageNet's
    files (107 KB mean)."""
    width, height = size
    frequency = np.hypot(np.fft.rfftfreq(width)[None, :], np.fft.fftfreq(height)[:, None])
    frequency[0, 0] = np.inf  # no constant term: the mean is set below

    def field() -> np.ndarray:
        spectrum = rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)
        values = np.fft.irfft2(spectrum / frequency, s=(height, width))
        return values / values.std()

    luminance = field()
    pixels = 128 + 48 * np.stack([luminance + 0.35 * field() for _ in range(3)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def jpeg_folder(root: Path, files: list[bytes]) -> None:
    """``files`` in the ImageNet layout (two classes), the same files in train/ and val/."""
    for index, data in enumerate(files):
        for split in ("train", "val"):
            path = root / split / f"class{index % 2}" / f"{index:05d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Pillow and simplejpeg decode on one thread anyway
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def per_core(work, items: list, repeats: int = 2) -> float:
    """Items per CPU-second of ``work(item)`` over ``items`` in this process: the best of
    ``repeats`` passes (CPU time, so the machine's other work counts little)."""
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            work(item)
        rates.append(len(items) / (time.process_time() - start))
    return max(rates)


def data_module(root: Path, decode: str, workers: int = 0, batch_size: int = 32):
    """The image-folder data module a probing run on ``root`` builds, at 224 px."""
    dataset = {"name": "image_folder", "root": str(root), "num_classes": 2, "decode": decode}
    dataset.update(heldout_fraction=0.0, num_workers=workers)
    module = ProbeDataModule.from_config(
        dataset, img_size=224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        batch_size=batch_size,
    )  # fmt: skip
    module.setup()
    return module


def data_path(args: argparse.Namespace) -> dict:
    """Images per second per CPU core of the eval (Resize 256 + CenterCrop 224) and training
    (RandomResizedCrop 224 + flip) transforms under each ``dataset.decode``, on
    ``--data-images`` ImageNet-like JPEGs (and a quarter as many of 1000 x 750); and what
    ``turbo``, ``turbo_dct`` and ``gpu`` (on the CPU device here: torchvision's libjpeg-turbo
    decoding and the tensor resize; nvJPEG's own difference is ``gpu_check.py``'s) change in
    the eval tensors and features, on those and on scikit-learn's two sample photographs (real
    JPEGs, 640 x 427). Under ``gpu`` the per-core figures are the loader workers' share (file
    read, header, random draws); ``gpu_finish_on_cpu`` is the device's share done on a CPU core."""
    turbo = importlib.util.find_spec("simplejpeg") is not None
    decodes = tuple(d for d in DECODES if turbo or not d.startswith("turbo"))
    rng = np.random.default_rng(0)
    photos = [photo_jpeg(rng, IMAGENET_SIZE) for _ in range(args.data_images)]
    large = [photo_jpeg(rng, LARGE_SIZE) for _ in range(max(2, args.data_images // 4))]
    real = [Path(name).read_bytes() for name in load_sample_images().filenames]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        folders = {name: Path(root, name) for name in ("synthetic", "large", "photographs")}
        for folder, files in zip(folders.values(), (photos, large, real), strict=True):
            jpeg_folder(folder, files)
        with one_thread():
            rates = data_rates(folders, decodes, args.data_workers)
        differences = {}
        for name in ("synthetic", "photographs"):
            splits = {d: data_module(folders[name], d).splits["test"] for d in decodes}
            splits["pil_bilinear"] = bilinear(splits["pil"])
            differences[name] = eval_differences(splits.pop("pil"), splits)
    return {
        "images": {
            "count": len(photos),
            "size": list(IMAGENET_SIZE),
            "mean_bytes": float(np.mean([len(data) for data in photos])),
            "large_count": len(large),
            "large_size": list(LARGE_SIZE),
            "quality": 90,
        },
        **rates,
        "difference": differences,
        "feature_model": "vit_tiny_patch16_224, random weights (seed 0)",
        "clock": "process CPU time (time.process_time; the loader's workers: getrusage of the "
        "joined children), one torch thread",
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        **({} if turbo else {"note": "simplejpeg is not installed: no turbo figures"}),
    }


def data_rates(folders: dict, decodes: tuple[str, ...], workers: int) -> dict:
    """Per CPU core: decoding alone (``decode_rates``), a split's items (file, decode,
    transform) under each decoder, and images per worker CPU-second through the loaders."""
    modules = {decode: data_module(folders["synthetic"], decode, workers) for decode in decodes}
    large = {decode: data_module(folders["large"], decode) for decode in decodes}
    files = sorted(Path(folders["synthetic"], "val").glob("*/*.JPEG"))
    return {
        "decode_per_core": decode_rates(files, decodes),
        "eval_per_core": split_rates(modules, "test"),
        "train_per_core": split_rates(modules, "train"),
        "eval_large_per_core": split_rates(large, "test"),
        **({"gpu_finish_on_cpu": finish_rates(modules["gpu"])} if "gpu" in modules else {}),
        "loader": {
            "workers": workers,
            "batch_size": 32,
            **{
                f"{split}_{decode}": loader_rates(partial(loader, module), workers)
                for decode, module in modules.items()
                for split, loader in LOADERS.items()
            },
        },
    }


def decode_rates(files: list[Path], decodes: tuple[str, ...]) -> dict:
    """File to 8-bit RGB per CPU-second: Pillow (``pil``), libjpeg-turbo at full size
    (``turbo``) and at the eval resize's scale (``turbo_dct``), and torchvision's
    ``decode_jpeg`` on the CPU (libjpeg-turbo into a tensor; on a GPU it runs nvJPEG)."""
    paths = [str(path) for path in files]
    rates = {"pil": per_core(load_image, paths)}
    for name, side in (turbo for turbo in TURBO if turbo[0] in decodes):
        decode = TurboDecode(side)
        rates[name] = per_core(lambda path, decode=decode: decode(ImageFile(path)), paths)
    rates["torchvision"] = per_core(
        lambda path: decode_jpeg(read_file(path), mode=ImageReadMode.RGB), paths
    )
    return rates


def split_rates(modules: dict, split: str) -> dict:
    """Items of ``split`` (file read, decode, transform: ``TransformedSubset.__getitem__``) per
    CPU-second under each decoder; training items keyed by ``(index, epoch)`` as the loader's."""
    rates = {}
    for decode, module in modules.items():
        subset = module.splits[split]
        keys = [(i, 0) for i in range(len(subset))] if split == "train" else range(len(subset))
        rates[decode] = per_core(subset.__getitem__, list(keys))
    return rates


def finish_rates(module: ProbeDataModule) -> dict:
    """Images per CPU-second of ``finish_images`` on the CPU device (batched ``decode_jpeg``,
    the tensor transform, normalisation) for the test and training loaders' batches of 32:
    what ``gpu`` asks of the device, here done by one CPU core."""
    rates = {}
    for split, loader in LOADERS.items():
        pending = list(loader(module))
        batches = per_core(lambda batch: finish_images(batch[0], "cpu"), pending)
        rates[split] = batches * sum(len(labels) for _, labels in pending) / len(pending)
    return rates


def loader_rates(make_loader, workers: int) -> dict:
    """One pass of the loader ``make_loader()`` builds: images per CPU-second of its workers
    (their CPU time: the finished children's, read once the loader is gone and its workers are
    joined), per worker and second of wall time, and the main process's CPU time per image."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    main, wall = time.process_time(), time.perf_counter()
    loader = make_loader()
    images = sum(len(labels) for _, labels in loader)
    wall, main = time.perf_counter() - wall, time.process_time() - main
    del loader  # its persistent workers are joined as it goes
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    worker_cpu = worker_cpu if workers else main  # no workers: the main process loads
    return {
        "images_per_worker_cpu_s": images / worker_cpu,
        "images_per_worker_wall_s": images / wall / max(workers, 1),
        "main_cpu_ms_per_image": 1e3 * main / images,
    }


def eval_differences(reference: TransformedSubset, others: dict) -> dict:
    """Each of ``others``' eval tensors (splits of the same images) against ``reference``'s,
    in 8-bit levels (the normalised difference times std x 255), and the cosine similarity of
    a random ViT-Ti/16's ``[cls]`` on both (seed 0: pretrained weights cannot be fetched
    offline)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)

    def tensors_and_cls(split: TransformedSubset) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(split, batch_size=32, collate_fn=collate)  # finished as runs do
        images = torch.cat([finish_images(batch, "cpu") for batch, _ in loader])
        with torch.inference_mode():
            return images, model.forward_features(images)[:, 0]

    images, cls = tensors_and_cls(reference)
    figures = {}
    for name, split in others.items():
        other_images, other_cls = tensors_and_cls(split)
        levels = (images - other_images).abs() * std * 255
        cosine = torch.nn.functional.cosine_similarity(cls, other_cls, dim=1)
        figures[name] = {
            "pixel_mean_abs_levels": levels.mean().item(),
            "pixel_max_abs_levels": levels.max().item(),
            "cls_cosine_mean": cosine.mean().item(),
            "cls_cosine_min": cosine.min().item(),
        }
    return figures


def bilinear(split: TransformedSubset) -> TransformedSubset:
    """``split`` resized bilinearly instead of bicubically: a yardstick, what another common
    choice of resampling changes."""
    transform = create_transform(
        224, interpolation="bilinear", crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )  # fmt: skip
    return TransformedSubset(split.base, split.indices, transform)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.data_path_only:
        report = {"setup": setup(args), "data_path": data_path(args)}
    else:
        with tempfile.TemporaryDirectory() as cache_dir:
            report = measure(args, ["probe.features=cached", f"paths.cache_dir={cache_dir}"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.data_path_only:
        print_report(report)
    print_data_path(report["data_path"])


def measure(args: argparse.Namespace, cached: list[str]) -> dict:
    """Every figure; ``cached``: the overrides of a run from the benchmark's token cache."""
    # Warm-up (imports, allocator), which also fills the linear probe's token cache.
    _one_run(args, ["aggregator=cls", *cached])
    single = probe_wall_time(args, ["aggregator=cls"])
    eight = probe_wall_time(args, ["aggregator=cls", f"heads={BENCH8}"])
    # The oracle head's second model is the benchmarked architecture itself (no download).
    every = probe_wall_time(
        args,
        [
            "aggregator=cls",
            "heads=all",
            f"heads.oracle_attn.oracle_arch={args.arch}",
            "heads.oracle_attn.oracle_weights=null",
        ],
    )
    no_oracle = probe_wall_time(args, ["aggregator=cls", "heads=all", "~heads.oracle_attn"])
    # efficient-probing's poolers beside the linear probe, against the linear probe alone, both
    # from tokens cached beforehand: the training cost once the backbone pass is paid.
    single_cached = probe_wall_time(args, ["aggregator=cls", *cached])
    fill_cache(args, ["aggregator=cls", f"heads={EP}", *cached])
    all_poolers = probe_wall_time(args, ["aggregator=cls", f"heads={EP}", *cached])
    layout = skeleton(arch=args.arch, img_size=args.img_size).layout
    heads = {name: head_throughput(name, layout, args) for name in sorted(AGGREGATORS)}
    return {
        "setup": setup(args),
        "single_head_s": single,
        "bench8_s": eight,
        "all_heads_s": every,
        "multihead_ratio": eight / single,
        "all_heads_ratio": every / single,
        "all_heads_without_oracle_s": no_oracle,
        "all_heads_without_oracle_ratio": no_oracle / single,
        "num_all_heads": len(AGGREGATORS),
        "single_head_cached_s": single_cached,
        "all_poolers_s": all_poolers,
        "all_poolers_ratio": all_poolers / single_cached,
        "aggregators": heads,
        "ep_poolers": ep_poolers(args),
        "ep_memory": ep_memory(args.ep_arch, 224, args.ep_batch, args.ep_accumulation),
        **cache_figures(args),
        **extract_overhead(args),
        "data_path": data_path(args),
    }


def setup(args: argparse.Namespace) -> dict:
    return {
        **vars(args),
        "out": str(args.out),
        "images_per_run": 70 * args.classes,
        "torch": torch.__version__,
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def print_report(report: dict) -> None:
    console = Console()
    console.print(
        f"single head {report['single_head_s']:.1f} s | 8 heads {report['bench8_s']:.1f} s "
        f"(ratio {report['multihead_ratio']:.2f}, target <= 1.15) | "
        f"{report['num_all_heads']} heads {report['all_heads_s']:.1f} s "
        f"(ratio {report['all_heads_ratio']:.2f}; "
        f"{report['all_heads_without_oracle_ratio']:.2f} without the oracle's second backbone)"
    )
    table = Table(title=f"heads alone on precomputed tokens ({report['setup']['device']})")
    for column in ("aggregator", "trainable params", "fwd+bwd images/s"):
        table.add_column(column, justify="left" if column == "aggregator" else "right")
    for name, row in report["aggregators"].items():
        table.add_row(name, f"{row['trainable_params']:,}", f"{row['head_images_per_s']:,.0f}")
    console.print(table)
    ep = report["ep_poolers"]
    console.print(
        f"heads={EP}: linear probe + {len(ep['poolers'])} poolers from cached tokens "
        f"{report['all_poolers_s']:.1f} s against the linear probe alone "
        f"{report['single_head_cached_s']:.1f} s (all_poolers_ratio "
        f"{report['all_poolers_ratio']:.2f})"
    )
    table = Table(title=f"heads={EP}: one training step at batch {ep['batch']} ({ep['device']})")
    columns = ("pooler", "trainable params", "tensor MB (counted)", "CUDA peak MB (measured)")
    for column in columns:
        table.add_column(column, justify="left" if column == "pooler" else "right")
    for name, row in ep["poolers"].items():
        peak = f"{row['peak_bytes'] / 1e6:,.1f}" if "peak_bytes" in row else "-"
        table.add_row(
            name, f"{row['trainable_params']:,}", f"{row['tensor_bytes'] / 1e6:,.1f}", peak
        )
    console.print(table)
    memory = report["ep_memory"]
    if "skipped" in memory:
        console.print(f"heads={EP} GPU memory: skipped ({memory['skipped']})")
    else:
        console.print(
            f"heads={EP} at {memory['arch']}, batch {memory['batch_size']} x "
            f"{memory['accumulation']} = {memory['effective_batch']}: peak "
            f"{memory.get('peak_allocated_gb', float('nan')):.1f} GB allocated, "
            f"{memory.get('peak_reserved_gb', float('nan')):.1f} GB reserved ({memory['device']})"
        )
    console.print(
        f"cache: epoch speed-up x{report['cached_epoch_speedup']:.0f} (target >= 100), "
        f"read ratio {report['cache_read_ratio']:.2f} (target >= 0.8), "
        f"{report['cache_bytes_per_image'] / 1e3:.0f} KB per image; extraction overhead "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["extract_overhead"].items())
        + " (target >= 0.95)"
    )


def print_data_path(data: dict) -> None:
    images = data["images"]
    load = ", ".join(f"{value:.1f}" for value in data["load_average"]["before"])
    table = Table(
        title=f"data path: images/s per CPU core, {images['count']} JPEGs of "
        f"{images['size'][0]} x {images['size'][1]} ({images['mean_bytes'] / 1e3:.0f} KB), "
        f"load average {load} on {data['cpu_count']} cores"
    )
    columns = ("decode", "decode alone", "eval", "train", "eval 1000 x 750")
    columns += ("loader eval", "loader train")
    for column in columns:
        table.add_column(column, justify="left" if column == "decode" else "right")
    for decode, rate in data["eval_per_core"].items():
        loaders = [data["loader"][f"{split}_{decode}"] for split in LOADERS]
        alone = data["decode_per_core"].get(decode)  # none under gpu: the device decodes
        table.add_row(
            decode + (" (workers)" if alone is None else ""),
            "device" if alone is None else f"{alone:,.0f}",
            f"{rate:,.0f}",
            f"{data['train_per_core'][decode]:,.0f}",
            f"{data['eval_large_per_core'][decode]:,.0f}",
            *(f"{loader['images_per_worker_cpu_s']:,.0f}" for loader in loaders),
        )
    console = Console()
    console.print(table)
    if "gpu_finish_on_cpu" in data:
        finish = data["gpu_finish_on_cpu"]
        console.print(
            f"gpu's device work on one CPU core (decode_jpeg, tensor transform): eval "
            f"{finish['eval']:,.0f}, train {finish['train']:,.0f} images/s"
        )
    for images, differences in data["difference"].items():
        for decode, difference in differences.items():
            console.print(
                f"{decode} against pil, eval tensors of the {images}: mean |difference| "
                f"{difference['pixel_mean_abs_levels']:.2f} levels (max "
                f"{difference['pixel_max_abs_levels']:.0f}); random ViT-Ti \\[cls] cosine "
                f"mean {difference['cls_cosine_mean']:.5f} (min {difference['cls_cosine_min']:.5f})"
            )


if __name__ == "__main__":
    main()
