"""Overlay the attention statistics of several analysis runs in one figure (MIM vs JEA).

python run.py -m task=analyze backbone=mae_vitb,dino_vitb dataset=imagenet
python scripts/compare_attention.py outputs/multirun/<time>    # -> attention_compare.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mim_agg.analysis.figures import plot_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a sweep folder holding analysis runs")
    parser.add_argument("--out", type=Path, help="default: <folder>/attention_compare.png")
    args = parser.parse_args()
    files = sorted(args.folder.rglob("attention_stats.json"))
    if not files:
        raise SystemExit(f"No attention_stats.json under {args.folder}; run task=analyze first.")
    results = {}
    for path in files:
        result = json.loads(path.read_text())
        label = result["backbone"]
        if label in results:  # the same backbone twice (e.g. two splits): name the run too
            label = f"{label} ({path.parent.name})"
        results[label] = result
    out = args.out or args.folder / "attention_compare.png"
    plot_statistics(results, out)
    print(f"{len(results)} runs -> {out}")


if __name__ == "__main__":
    main()
