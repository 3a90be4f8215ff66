"""Gather a sweep's probe runs into results.csv (every head), results.md (best of each
aggregator per backbone, chosen on held-out) and results.png.

    python run.py -m backbone=mae_vitb,dino_vitb heads=bench8 probe.blrs=[0.03,0.1,0.3]
    python scripts/collect_results.py outputs/multirun/<time>
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mim_agg.analysis.sweep_results import (
    COLUMNS,
    best_per_aggregator,
    collect,
    markdown_table,
    plot_bars,
)
from mim_agg.utils.results import write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a sweep (or outputs) folder with probe runs")
    args = parser.parse_args()
    rows = collect(args.folder)
    if not rows:
        raise SystemExit(f"No finished probe runs (heads.csv) under {args.folder}.")
    best = best_per_aggregator(rows)
    write_csv(args.folder / "results.csv", rows, COLUMNS)
    table = markdown_table(best)
    (args.folder / "results.md").write_text(table)
    plot_bars(best, args.folder / "results.png")
    print(table)
    print(f"{len(rows)} heads from {len({r['run'] for r in rows})} runs -> {args.folder}/results.*")


if __name__ == "__main__":
    main()
