"""The Hydra entry point: ``python run.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mim_agg.config import register_configs
from mim_agg.tasks import TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
register_configs()
# The frozen backbone stays in eval mode on purpose (FrozenBackbone.train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the configured task; return the held-out accuracy for Hydra sweepers (never test)."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {sorted(TASKS)}.")
    summary = TASKS[cfg.task](cfg)
    return summary.get("val/acc1_best")
