"""A few minutes on a CUDA machine: throughput figures, then the real CLI end to end on the GPU.

    bash scripts/gpu_check.sh            # on the GPU machine; JSON to $OUT (or outputs/)
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check.json   # the same code on a CPU, tiny

Measures ViT-B/16 all-token extraction images/s under bf16 autocast (synthetic input on the
device, tokens copied into pinned host memory), the same with ``torch.compile``, cached-probing
images/s of an AbMILP head on bf16 tokens, and peak GPU memory; batched JPEG decoding on the
device (``jpeg_decode``: ImageNet-sized files, alone and with the eval transform); then the
peak memory of ``heads=ep`` (the linear probe and efficient-probing's fourteen poolers) at
ViT-B from cached tokens at batch 512 x 8 accumulated = 4096 (``ep_memory`` of
scripts/benchmark.py, the README's figure). Then runs the quickstart and a ``heads=bench8``
probe on the GPU (bf16), online and from the cache, and checks each head's test accuracy
against the same probe on the CPU in fp32. On a machine with several GPUs, last, a distributed
extraction (``trainer=ddp``) must write the cache one GPU writes, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmark import (  # scripts/benchmark.py: this script's folder is on sys.path
    IMAGENET_SIZE,
    ep_memory,
    photo_jpeg,
)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenRequest, Tokens
from mim_agg.probe import ProbeHead

ROOT = Path(__file__).resolve().parent.parent

BF16_TOLERANCE = 0.03  # test accuracy, absolute: bf16 tokens and autocast against fp32
# heads=ep memory: (arch, img_size, batch, accumulation); the smoke run's is tiny, on the CPU
EP_MEMORY = ("vit_base_patch16_224", 224, 512, 8)
EP_MEMORY_SMOKE = ("vit_tiny_patch16_224", 64, 8, 2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "outputs")) / "gpu_check.json"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU test)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput figure")
    return parser.parse_args()


def timed(step, seconds: float, batch: int, sync) -> float:
    """Images/s of ``step()`` over ``seconds`` after three warm-up calls."""
    for _ in range(3):
        step()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        step()
        done += batch
    sync()
    return done / (time.perf_counter() - start)


def throughput(args: argparse.Namespace, device: str) -> dict:
    arch, batch, size = (
        ("vit_tiny_patch16_224", 4, 64) if args.smoke else ("vit_base_patch16_224", 512, 224)
    )
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    backbone = FrozenBackbone(arch, img_size=size)
    source = LiveTokens(backbone, {backbone.block: TokenRequest(tokens=True)}).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    layout = source.layout
    host = torch.empty(batch, layout.num_tokens, layout.dim, dtype=torch.bfloat16, pin_memory=cuda)

    def extract_step(forward):
        with torch.inference_mode(), autocast:
            host.copy_(forward(images).all.to(torch.bfloat16), non_blocking=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    figures = {"arch": arch, "batch": batch, "img_size": size, "device": device_name(device)}
    figures["extract_images_per_s"] = timed(lambda: extract_step(source), args.seconds, batch, sync)
    if cuda:
        figures["extract_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        compiled = torch.compile(source.backbone.model)
        original, source.backbone.model = source.backbone.model, compiled
        try:
            figures["extract_compiled_images_per_s"] = timed(
                lambda: extract_step(source), args.seconds, batch, sync
            )
        finally:
            source.backbone.model = original
    head = ProbeHead(build_aggregator("abmilp", layout), num_classes=1000).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    tokens = Tokens.example(layout, TokenRequest(tokens=True), batch, seed=0).map(
        lambda t: t.to(device, torch.bfloat16)
    )
    targets = torch.randint(1000, (batch,), device=device)

    def probe_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(head(tokens.map(lambda t: t.float())), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    figures["cached_probe_abmilp_images_per_s"] = timed(probe_step, args.seconds, batch, sync)
    if cuda:
        figures["cached_probe_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return figures


def jpeg_decode(args: argparse.Namespace, device: str) -> dict:
    """Images/s of torchvision's batched ``decode_jpeg`` on the device (nvJPEG on a GPU) of
    ImageNet-like JPEGs (500 x 375, quality 90: ``benchmark.photo_jpeg``), alone and with the
    eval transform on the device (bicubic antialiased resize of the shorter side to 256,
    centre crop 224, normalisation, image by image as sizes differ in real data): what a GPU
    decoding path (``dataset.decode=gpu``, not implemented yet) would feed a backbone, the
    loader only reading files. README, "Data path"."""
    batch = 2 if args.smoke else 128
    rng = np.random.default_rng(0)
    files = [
        torch.frombuffer(bytearray(photo_jpeg(rng, IMAGENET_SIZE)), dtype=torch.uint8)
        for _ in range(batch)
    ]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def decode() -> list[torch.Tensor]:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)

    def decode_and_transform() -> torch.Tensor:
        crops = [
            F.center_crop(F.resize(image, [256], F.InterpolationMode.BICUBIC), [224])
            for image in decode()
        ]
        return (torch.stack(crops).float() / 255 - mean) / std

    return {
        "batch": batch,
        "device": device_name(device),
        "decode_images_per_s": timed(decode, args.seconds, batch, sync),
        "decode_eval_transform_images_per_s": timed(
            decode_and_transform, args.seconds, batch, sync
        ),
    }


def run_py(root: Path, *overrides: str) -> None:
    """``python run.py OVERRIDES`` under ``root``; a failure ends the check with its log."""
    env = {**os.environ, "MIM_AGG_ROOT": str(root), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides], env=env, capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"run.py {' '.join(overrides)} failed:\n{result.stderr[-4000:]}")


def cli(root: Path, *overrides: str) -> dict:
    """``python run.py OVERRIDES`` under ``root``; the run's metrics.json."""
    run_py(root, *overrides)
    (metrics,) = (root / "outputs" / "runs").glob("*/metrics.json")  # one run per root
    return json.loads(metrics.read_text())


def distributed_extraction(args: argparse.Namespace, device: str) -> dict:
    """``task=extract`` on every GPU of the machine (``trainer=ddp``) against one GPU: the two
    caches must be byte for byte the same (plan, manifest and every shard), and the time
    each took. One GPU cannot show it (skipped, said so); the smoke run uses
    ``trainer=ddp_sim`` (two CPU processes) against ``trainer=cpu``."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and gpus < 2:
        return {"skipped": f"{gpus} GPU here: distributed extraction needs two or more"}
    trainers = {"one": "trainer=gpu", "all": "trainer=ddp"}
    if device != "cuda":
        trainers = {"one": "trainer=cpu", "all": "trainer=ddp_sim"}
    extract = [
        "task=extract", "backbone=vit_tiny", "backbone.img_size=64", "dataset=digits",
        "aggregator=abmilp", "cache.shard_size=64", "cache.batch_size=32",
    ]  # fmt: skip
    if args.smoke:
        extract += ["dataset.train_size=96", "dataset.test_size=32", "cache.shard_size=16"]
    seconds, served = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, trainer in trainers.items():
            started = time.perf_counter()
            run_py(Path(folder) / name, *extract, trainer)
            seconds[name] = time.perf_counter() - started
            (cache,) = (Path(folder) / name / "cache").iterdir()
            served[name] = cache_files(cache)
    one, every = served["one"], served["all"]
    differing = sorted(
        name for name in one.keys() | every.keys() if one.get(name) != every.get(name)
    )
    return {
        "processes": gpus or 2,
        "one_process_s": seconds["one"],
        "distributed_s": seconds["all"],
        "files_compared": len(one),
        "identical": not differing,
        "differing_files": differing[:10],
    }


def cache_files(cache: Path) -> dict[str, bytes]:
    """What a cache serves: its plan, manifest and shards (the writers' records and locks
    differ by design: they hold modification times and ranks)."""
    files = [cache / "plan.json", cache / "manifest.json", *cache.glob("*/shard-*.safetensors")]
    return {str(path.relative_to(cache)): path.read_bytes() for path in sorted(files)}


def end_to_end(args: argparse.Namespace, device: str) -> dict:
    """Quickstart and bench8 online / cached on the device, against the CPU in fp32."""
    trainer = "trainer=gpu" if device == "cuda" else "trainer=cpu"
    probe = [
        "backbone=vit_tiny", "backbone.img_size=64", "dataset=digits", "heads=bench8",
        "probe=sgd", "probe.blr=1.0", f"probe.epochs={1 if args.smoke else 5}",
        "probe.warmup_epochs=0", "probe.batch_size=64", "logger=csv",
    ]  # fmt: skip
    if args.smoke:
        probe += ["dataset.train_size=300", "dataset.test_size=150"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if not args.smoke:  # the CPU suite runs the quickstart already
            results["quickstart"] = cli(root / "quickstart", "experiment=quickstart", trainer)[
                "winner"
            ]
        reference = cli(root / "cpu", *probe, "trainer=cpu")
        for features in ("online", "cached"):
            run = cli(root / features, *probe, trainer, f"probe.features={features}")
            gaps = {
                name: abs(head["test/acc1"] - reference["heads"][name]["test/acc1"])
                for name, head in run["heads"].items()
            }
            results[f"bench8_{features}"] = {
                "test_acc1": {n: h["test/acc1"] for n, h in run["heads"].items()},
                "largest_gap_to_cpu_fp32": max(gaps.values()),
                "within_tolerance": max(gaps.values()) <= BF16_TOLERANCE,
            }
        results["cpu_fp32_test_acc1"] = {n: h["test/acc1"] for n, h in reference["heads"].items()}
    return results


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("No CUDA device: run with --smoke for the CPU version of this check.")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "throughput": throughput(args, device),
        "jpeg_decode": jpeg_decode(args, device),
    }
    sizes = EP_MEMORY_SMOKE if args.smoke else EP_MEMORY
    report["ep_memory"] = ep_memory(*sizes, classes=2 if args.smoke else 8, smoke=args.smoke)
    report["end_to_end"] = end_to_end(args, device)
    report["distributed_extraction"] = distributed_extraction(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    checks = [
        report["end_to_end"][k]["within_tolerance"] for k in ("bench8_online", "bench8_cached")
    ]
    checks.append(report["distributed_extraction"].get("identical", True))  # True: skipped
    raise SystemExit(0 if all(checks) else 1)


if __name__ == "__main__":
    main()
