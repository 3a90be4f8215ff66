"""Cost of comparing aggregators: one multi-head run against one single-head run, and each
head alone on precomputed tokens. Writes JSON and prints a table.

    python scripts/benchmark.py --out outputs/benchmark.json

Runs go through the real ``probe`` task (Hydra config, timm backbone, Lightning training) on
synthetic images; numbers are only comparable on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from rich.table import Table

from mim_agg.aggregators import AGGREGATORS, build_aggregator
from mim_agg.backbones import TokenLayout, Tokens
from mim_agg.backbones.frozen import skeleton
from mim_agg.cli import CONFIG_DIR
from mim_agg.probe import ProbeHead
from mim_agg.runs.runner import run_task as run

BENCH8 = "bench8"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm architecture")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=4, help="70 synthetic images per class")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--head-seconds", type=float, default=1.0, help="timing per head")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per setting; the fastest counts"
    )
    return parser.parse_args()


def probe_wall_time(args: argparse.Namespace, overrides: list[str]) -> float:
    """Fastest of ``--repeats`` complete probing runs (build, train, select, test, write):
    the minimum is the least disturbed by whatever else the machine does."""
    return min(_one_run(args, overrides) for _ in range(args.repeats))


def _one_run(args: argparse.Namespace, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as root:
        base = [
            "backbone=vit_tiny",
            f"backbone.arch={args.arch}",
            f"backbone.img_size={args.img_size}",
            "dataset=synthetic",
            f"dataset.num_classes={args.classes}",
            "trainer=cpu" if not torch.cuda.is_available() else "trainer=gpu",
            "+trainer.enable_progress_bar=false",
            "logger=csv",
            "probe=sgd",
            "probe.blr=1.0",
            f"probe.epochs={args.epochs}",
            "probe.warmup_epochs=0",
            f"probe.batch_size={args.batch_size}",
            f"paths.root_dir={root}",
            f"paths.output_dir={root}/run",
        ]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*base, *overrides])
        start = time.perf_counter()
        run(cfg)
        return time.perf_counter() - start


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


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    _one_run(args, ["aggregator=cls", "dataset.num_classes=2"])  # warm-up: imports, allocator
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
    layout = skeleton(arch=args.arch, img_size=args.img_size).layout
    heads = {name: head_throughput(name, layout, args) for name in sorted(AGGREGATORS)}
    report = {
        "setup": {
            **vars(args),
            "out": str(args.out),
            "images_per_run": 70 * args.classes,
            "torch": torch.__version__,
            "device": device_name(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "single_head_s": single,
        "bench8_s": eight,
        "all_heads_s": every,
        "multihead_ratio": eight / single,
        "all_heads_ratio": every / single,
        "all_heads_without_oracle_s": no_oracle,
        "all_heads_without_oracle_ratio": no_oracle / single,
        "num_all_heads": len(AGGREGATORS),
        "aggregators": heads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)


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


if __name__ == "__main__":
    main()
