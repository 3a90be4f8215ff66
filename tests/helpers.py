"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mim_agg.cache import TokenCache
from mim_agg.cache.data import CachedSplit
from mim_agg.cli import CONFIG_DIR

PROJECT_ROOT = CONFIG_DIR.parent
TINY_ARCH = "vit_tiny_patch16_224"

# Small and fast (conf/debug/fast.yaml): a 32 px image is a 2x2 patch grid, two epochs, CPU,
# no progress bars.
FAST = ["debug=fast"]


def compose_config(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """Compose ``conf/`` as ``run.py`` would, with paths pointed into ``tmp_path``."""
    paths = []
    if tmp_path is not None:
        paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, *paths])


def cached_features(cache: TokenCache, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A cached split's stored output of the parameter-free aggregator ``key`` (``mean()``)
    and its labels, read image by image: what k-NN and logistic regression must have used."""
    items = [CachedSplit(cache, split)[i] for i in range(len(CachedSplit(cache, split)))]
    features = torch.stack([fields[f"pooled/{key}"] for fields, _ in items]).float().numpy()
    return features, np.array([label for _, label in items])


def cli_environment(root: Path, **env) -> dict:
    """Everything under ``root``, offline, 2 threads, ``tests`` importable (test callbacks)."""
    return {
        **os.environ,
        "MIM_AGG_ROOT": str(root),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2",  # 2 cores
        "PYTHONPATH": str(PROJECT_ROOT),
        **env,
    }


def run_cli(*args: str, root: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess, waited for."""
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "run.py"), *args],
        capture_output=True,
        text=True,
        env=cli_environment(root, **env),
        cwd=root,
        timeout=timeout,
    )


def popen_cli(*args: str, root: Path, **env) -> subprocess.Popen:
    """``python run.py ARGS`` started in the background (output discarded)."""
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "run.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_environment(root, **env),
        cwd=root,
    )
