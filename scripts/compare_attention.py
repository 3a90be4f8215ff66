"""Overlay the attention statistics of several analysis runs in one figure (MIM vs JEA).

python run.py -m task=analyze backbone=mae_vitb,dino_vitb dataset=imagenet
python scripts/compare_attention.py outputs/multirun/<time>    # -> attention_compare.png

Each line is labelled by the config values that differ between the runs (read from each run
folder's config.yaml, as the report tells jobs apart); the title names what they share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from mim_agg.analysis.figures import context, save_figure, statistics_figure
from mim_agg.cli import CONFIG_DIR
from mim_agg.report.runs import Job
from mim_agg.report.table import column_label, flatten, natural, varying_keys
from mim_agg.runs.identity import result_config
from mim_agg.utils.files import under_root

STATS = "attention_stats.json"


def analysis_runs(folder: Path) -> list[Path]:
    """The run folders holding ``attention_stats.json`` under ``folder``, through the links
    of a sweep folder too (``Path.rglob`` does not follow them), each once."""
    found = {
        Path(root).resolve()
        for root, _, files in os.walk(folder, followlinks=True)
        if STATS in files
    }
    return sorted(found)


def labelled(jobs: list[Job]) -> dict[str, Job]:
    """The runs by ``key=value, ...`` of the result-changing config values that differ
    between them, in the order of those values (img_size 64 before 112); runs that differ in
    none of them (say, only their seed) add their folder's name."""
    keys = varying_keys(jobs)
    values = {job.path: tuple(str(flatten(job.config).get(k)) for k in keys) for job in jobs}
    jobs = sorted(jobs, key=lambda job: natural(values[job.path]))
    names = [column_label(values[job.path], keys) for job in jobs]
    if len(jobs) == 1 or len(set(names)) < len(names):
        names = [
            f"{name} ({job.path.name})" if keys else job.path.name
            for name, job in zip(names, jobs, strict=True)
        ]
    return dict(zip(names, jobs, strict=True))


def project_root() -> str:
    """``paths.root_dir`` as the runs resolve it (``MIM_AGG_ROOT``, else the current folder)."""
    return OmegaConf.load(CONFIG_DIR / "paths" / "default.yaml").root_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a sweep folder holding analysis runs")
    parser.add_argument("--out", type=Path, help="default: <folder>/attention_compare.png")
    args = parser.parse_args()
    folder = under_root(project_root(), args.folder)
    if not folder.is_dir():
        print(
            f"Error: no folder {folder} (a relative path is taken from MIM_AGG_ROOT).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    folders = analysis_runs(folder)
    if not folders:
        print(f"Error: no {STATS} under {folder}; run task=analyze there first.", file=sys.stderr)
        raise SystemExit(2)
    jobs = [
        Job(path.name, "done", path, result_config(OmegaConf.load(path / "config.yaml")))
        for path in folders
    ]
    results = {
        label: json.loads((job.path / STATS).read_text()) for label, job in labelled(jobs).items()
    }
    images = sorted({result["num_images"] for result in results.values()})
    title = (
        f"Attention statistics per block, mean over {'/'.join(map(str, images))} images\n"
        f"{context([job.config for job in jobs]) or 'several backbones and datasets'}"
    )
    out = args.out or folder / "attention_compare.png"
    save_figure(statistics_figure(results, title), out)
    print(f"{len(results)} runs -> {out}")


if __name__ == "__main__":
    main()
