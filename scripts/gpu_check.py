"""A few minutes on a CUDA machine: throughput figures, then the real CLI end to end on the GPU.

    bash scripts/gpu_check.sh            # on the GPU machine; JSON to $OUT (or outputs/)
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check.json   # the same code on a CPU, tiny

Measures ViT-B/16 all-token extraction images/s under bf16 autocast (synthetic input on the
device, tokens copied into pinned host memory), the same with ``torch.compile``, cached-probing
images/s of an AbMILP head on bf16 tokens, and peak GPU memory; batched JPEG decoding on the
device (``jpeg_decode``: ImageNet-sized files decoded alone, then the ``dataset.decode=gpu``
path through the data module's loaders against ``pil``'s, and nvJPEG's pixels against the
CPU's); then the
peak memory of ``heads=ep`` (the linear probe and efficient-probing's fourteen poolers) at
ViT-B from cached tokens at batch 512 x 8 accumulated = 4096 (``ep_memory`` of
scripts/benchmark.py, the README's figure). Then runs the quickstart and a ``heads=bench8``
probe on the GPU (bf16), online and from the cache, and checks each head's test accuracy
against the same probe on the CPU in fp32. On a machine with several GPUs, last, a distributed
extraction (``trainer=ddp``) must write the cache one GPU writes, byte for byte. Also, the
README's extraction memory table against the GPU's allocations (``extraction_memory``).
``--only`` runs some sections; each section's figures are written as it ends.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import timm
import torch
from benchmark import (  # scripts/benchmark.py: this script's folder is on sys.path
    CONFIG_DIR,
    IMAGENET_SIZE,
    LOADERS,
    data_module,
    ep_memory,
    jpeg_folder,
    photo_jpeg,
)
from hydra import compose, initialize_config_dir
from PIL import Image
from timm.data import IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenRequest, Tokens
from mim_agg.backbones.memory import extraction_memory
from mim_agg.data.device_decode import finish_images
from mim_agg.probe import ProbeHead
from mim_agg.utils.files import write_atomic
from mim_agg.validation import backbone_arguments

ROOT = Path(__file__).resolve().parent.parent

BF16_TOLERANCE = 0.03  # test accuracy, absolute: bf16 tokens and autocast against fp32
# heads=ep memory: (arch, img_size, batch, accumulation); the smoke run's is tiny, on the CPU
EP_MEMORY = ("vit_base_patch16_224", 224, 512, 8)
EP_MEMORY_SMOKE = ("vit_tiny_patch16_224", 64, 8, 2)
# The README's extraction memory table, measured: its rows' configs at cache.batch_size=256
EXTRACTION_MEMORY = (
    "mae_vitb", "dinov3_vitl16", "dinov3_vith16p", "dinov3_vit7b16", "aimv2_vit1b14",
    "metaclip2_vitbigg14_378", "pe_core_vitg14_448", "eva02_clip_vite14",
)  # fmt: skip
SECTIONS = (
    "throughput", "jpeg_decode", "extraction_memory", "ep_memory", "end_to_end",
    "distributed_extraction",
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "outputs")) / "gpu_check.json"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU test)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput figure")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="these sections alone"
    )
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
    """``dataset.decode=gpu`` measured, to choose it or not (README, "Data path"), on
    ImageNet-like JPEGs (500 x 375, quality 90: ``benchmark.photo_jpeg``):

    - ``decode_images_per_s``: torchvision's batched ``decode_jpeg`` on the device alone
      (nvJPEG on a GPU);
    - ``loaders``: images/s of the data module's own eval and training loaders delivering
      finished batches on the device (``finish_images``: under ``gpu`` decoded and transformed
      there, under ``pil`` moved there), with the same loader workers; ``gpu_over_pil``;
    - ``difference``: nvJPEG's RGB against the CPU's decoding of the same files, and the eval
      tensors of ``gpu`` on the device against ``gpu`` on the CPU and against ``pil``, in
      8-bit levels; ``kinds``: how other JPEG kinds fare on the device decoder."""
    count, batch = (8, 4) if args.smoke else (1024, 256)
    workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    files = [photo_jpeg(rng, IMAGENET_SIZE) for _ in range(count)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files[:batch]]
    figures = {
        "device": device_name(device),
        "images": count,
        "batch": batch,
        "loader_workers": workers,
        "decode_images_per_s": timed(
            lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device),
            args.seconds,
            batch,
            sync,
        ),
    }
    with tempfile.TemporaryDirectory() as folder:
        jpeg_folder(Path(folder), files)
        modules = {d: data_module(Path(folder), d, workers, batch) for d in ("pil", "gpu")}
        loaders = {
            f"{split}_{decode}": loader_images_per_s(make(module), device, args.seconds, sync)
            for decode, module in modules.items()
            for split, make in LOADERS.items()
        }
        figures["loaders"] = loaders
        figures["gpu_over_pil"] = {s: loaders[f"{s}_gpu"] / loaders[f"{s}_pil"] for s in LOADERS}
        figures["difference"] = pixel_differences(modules, encoded, device)
    figures["kinds"] = jpeg_kinds(device)
    return figures


def loader_images_per_s(loader, device: str, seconds: float, sync) -> float:
    """Finished batches on ``device`` per second, whole passes of ``loader`` (its workers
    started by a first batch, not timed) until ``seconds`` have passed."""
    next(iter(loader))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        for images, labels in loader:
            finish_images(images, device)
            done += len(labels)
    sync()
    return done / (time.perf_counter() - start)


def pixel_differences(modules: dict, encoded: list[torch.Tensor], device: str) -> dict:
    """In 8-bit levels, mean and max: the device's decoding against the CPU's (the same
    libjpeg-turbo on a CPU device: 0), and ``gpu``'s eval tensors on the device against the
    same on the CPU and against ``pil``'s."""
    on_device = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    on_cpu = decode_jpeg(encoded, mode=ImageReadMode.RGB)
    decoded = torch.cat(
        [(a.cpu().int() - b.int()).abs().flatten() for a, b in zip(on_device, on_cpu, strict=True)]
    )
    pending, _ = next(iter(modules["gpu"].test_dataloader()))
    pil, _ = next(iter(modules["pil"].test_dataloader()))
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)  # data_module's normalisation
    ours = finish_images(pending, device).cpu()
    return {
        "decode_device_vs_cpu": levels(decoded.float()),
        "eval_gpu_device_vs_cpu": levels((ours - finish_images(pending, "cpu")).abs() * std * 255),
        "eval_gpu_device_vs_pil": levels((ours - pil).abs() * std * 255),
    }


def levels(differences: torch.Tensor) -> dict:
    return {"mean": differences.mean().item(), "max": differences.max().item()}


def jpeg_kinds(device: str) -> dict:
    """Per kind of JPEG (Pillow-encoded, 97 x 61: partial blocks at both edges), whether the
    device decoder takes it and its largest difference to the CPU's decoding, in levels
    (``dataset.decode=gpu`` sends CMYK to Pillow before it reaches the device)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    kinds = {
        "4:2:0": {}, "4:4:4": {"subsampling": 0}, "progressive": {"progressive": True},
        "grayscale": {"mode": "L"}, "cmyk": {"mode": "CMYK"},
    }  # fmt: skip
    results = {}
    for kind, options in kinds.items():
        options = dict(options)
        image = Image.fromarray(pixels).convert(options.pop("mode", "RGB"))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, **options)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        try:
            ours = decode_jpeg(data, mode=ImageReadMode.RGB, device=device).cpu()
        except RuntimeError as error:
            results[kind] = {"decoded": False, "error": str(error)[:200]}
            continue
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB)
        difference = (
            (ours.int() - cpu.int()).abs().max().item() if ours.shape == cpu.shape else None
        )
        results[kind] = {"decoded": True, "max_levels_vs_cpu": difference}
    return results


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
    """The quickstart, then bench8 online and cached on the device (bf16, and fp32 to tell its
    part), each against the same run on the CPU in fp32: within ``BF16_TOLERANCE`` per head.
    A like-for-like reference each: a cache stores one augmented view per image where an
    online run draws one every epoch, so the two differ by design."""
    trainer = "trainer=gpu" if device == "cuda" else "trainer=cpu"
    probe = [
        "backbone=vit_tiny", "backbone.img_size=64", "dataset=digits", "heads=bench8",
        "probe=sgd", "probe.blr=0.5", f"probe.epochs={1 if args.smoke else 15}",
        "probe.warmup_epochs=0", "probe.batch_size=64", "logger=csv",
    ]  # fmt: skip
    if args.smoke:
        probe += ["dataset.train_size=300", "dataset.test_size=150"]
    precisions = {"bf16": [], "fp32": ["trainer.precision=32-true"]}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if not args.smoke:  # the CPU suite runs the quickstart already
            results["quickstart"] = cli(root / "quickstart", "experiment=quickstart", trainer)[
                "winner"
            ]
        for features in ("online", "cached"):
            setting = [*probe, f"probe.features={features}"]
            reference = accuracies(cli(root / f"cpu-{features}", *setting, "trainer=cpu"))
            figures = {"cpu_fp32_test_acc1": reference}
            for precision, overrides in precisions.items():
                if device == "cpu":  # the smoke run: the device's run is the CPU's, run once
                    ours = reference
                else:
                    run = cli(root / f"{precision}-{features}", *setting, trainer, *overrides)
                    ours = accuracies(run)
                figures[f"{precision}_test_acc1"] = ours
                figures[f"{precision}_largest_gap_to_cpu"] = max(
                    abs(ours[name] - reference[name]) for name in reference
                )
            figures["within_tolerance"] = figures["bf16_largest_gap_to_cpu"] <= BF16_TOLERANCE
            results[f"bench8_{features}"] = figures
    if device == "cpu":
        results["note"] = "smoke run on the CPU: the device's runs are its reference, no gap"
    return results


def accuracies(metrics: dict) -> dict[str, float]:
    """Each head's test accuracy in a run's metrics.json."""
    return {name: head["test/acc1"] for name, head in metrics["heads"].items()}


def measured_extraction_memory(args: argparse.Namespace, device: str) -> dict:
    """The README's extraction memory table (``extraction_memory``, a count from the model's
    sizes) against what a real extraction allocates on the GPU at ``cache.batch_size=256``:
    each row's config built with random weights, drawn on the device (memory does not depend on
    the values), then one ``LiveTokens`` pass under bf16 autocast from float32 images, plain and
    reading the ``[cls]`` attention rows (the central 3 x 3 window's rows without a ``[cls]``),
    as the table's last column. ``peak_gb`` is
    ``torch.cuda.max_memory_allocated`` from the weights alone on the device to the tokens
    returned; ``count_gb`` the table's figure. The smoke run builds ViT-Ti on the CPU, counts
    and runs it, measuring nothing."""
    rows, batch = (("vit_tiny",), 2) if args.smoke else (EXTRACTION_MEMORY, 256)
    results = {}
    for config in rows:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            backbone_cfg = compose("config", overrides=[f"backbone={config}"]).backbone
        with torch.device(device):  # timm draws its initial weights there
            backbone = FrozenBackbone(**{**backbone_arguments(backbone_cfg), "weights": None})
        layout = backbone.layout
        reading = TokenRequest(
            tokens=True, cls_attn=layout.has_cls, center_rows=0 if layout.has_cls else 3
        )
        results[config] = {
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "plain": measured_pass(
                backbone, backbone_cfg, TokenRequest(tokens=True), batch, device
            ),
            "reading_attention": measured_pass(backbone, backbone_cfg, reading, batch, device),
        }
        del backbone
        gc.collect()  # its attention hooks hold it in a reference cycle
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"batch_size": batch, "device": device_name(device), "rows": results}


def measured_pass(backbone, backbone_cfg, request: TokenRequest, batch: int, device: str) -> dict:
    """One extraction pass of ``backbone`` providing ``request``: the count and, on a GPU, the
    peak allocated (``measured_extraction_memory``)."""
    count = extraction_memory(
        backbone_cfg, batch, reads_attention=request != TokenRequest(tokens=True)
    )
    source = LiveTokens(backbone, {backbone.block: request})
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    images = torch.randn(batch, 3, backbone.img_size, backbone.img_size, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        tokens = source(images)
    figures = {"count_gb": count.total / 1e9, "count_weights_gb": count.weights / 1e9}
    if cuda:
        torch.cuda.synchronize()
        figures["weights_gb"] = weights / 1e9
        figures["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        figures["peak_over_count"] = figures["peak_gb"] / figures["count_gb"]
    del tokens, images
    return figures


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("No CUDA device: run with --smoke for the CPU version of this check.")
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    report["timm"] = timm.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only:
        started = time.perf_counter()
        try:
            report[name] = {**SECTION_MEASURES[name](args, device)}
        except (Exception, SystemExit) as error:  # a GPU lease is short: keep the other figures
            report[name] = {"error": "".join(traceback.format_exception(error))[-4000:]}
            failed.append(name)
        report[name]["section_s"] = round(time.perf_counter() - started, 1)
        write_atomic(args.out, json.dumps(report, indent=2) + "\n")  # each section as it ends
        print(f"gpu_check: {name} done in {report[name]['section_s']} s", flush=True)
    print(json.dumps(report, indent=2))
    probes = report.get("end_to_end", {})
    checks = [
        probes[k]["within_tolerance"] for k in ("bench8_online", "bench8_cached") if k in probes
    ]
    checks.append(report.get("distributed_extraction", {}).get("identical", True))  # True: skipped
    raise SystemExit(0 if all(checks) and not failed else 1)


def ep_memory_section(args: argparse.Namespace, device: str) -> dict:
    sizes = EP_MEMORY_SMOKE if args.smoke else EP_MEMORY
    return ep_memory(*sizes, classes=2 if args.smoke else 8, smoke=args.smoke)


SECTION_MEASURES = {
    "throughput": throughput,
    "jpeg_decode": jpeg_decode,
    "extraction_memory": measured_extraction_memory,
    "ep_memory": ep_memory_section,
    "end_to_end": end_to_end,
    "distributed_extraction": distributed_extraction,
}
assert tuple(SECTION_MEASURES) == SECTIONS


if __name__ == "__main__":
    main()
