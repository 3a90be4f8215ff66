"""Config schemas: every group is validated at composition, so a misspelled key fails early.

Each YAML in ``conf/<group>/`` lists ``/schema/<group>@_here_`` first in its defaults;
aggregators get one schema each (``/schema/aggregator/<name>@_here_``), derived from their
constructor's keyword-only options. Schemas live outside the groups, so they are no options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from mim_agg.aggregators import AGGREGATORS, options_schema
from mim_agg.runs.identity import run_name


@dataclass
class BackboneConfig:
    arch: str
    family: str = MISSING  # mim | jea | vlm | none (random weights): figures and reports read it
    weights: str | None = None
    block: int = -1
    final_norm: bool = False
    img_size: int = 224
    mean: list[float] | None = None
    std: list[float] | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. MoCo v3 ViT-S: num_heads=12
    url: str | None = None  # the official checkpoint, for scripts/download_weights.py
    sha256: str | None = None  # its checksum, when published


@dataclass
class DatasetConfig:
    name: str
    num_classes: int | None = None  # null: the data's own count (class folders, torchvision)
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    heldout_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 8
    verify: bool = False  # decode every image before training, naming each broken file
    augment: bool = True  # false: train on the eval transform (centre crop), as a cache can
    shots: int | None = None  # low-shot: this many training images per class
    fraction: float | None = None  # low-shot: this fraction of each class (ImageNet 1%: 0.01)
    subset_seed: int = II("seed")  # draws the low-shot subset; fix it to hold one subset
    test_split: str | None = None  # image_folder: the test folder (null: val)
    split_file: str | None = None  # image_folder: lists/{split}.txt of "<path> <label>" lines


@dataclass
class ProbeConfig:
    optimizer: str = "lars"
    blr: float = 0.1
    blrs: list[float] | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 90
    warmup_epochs: float = 10
    batch_size: int = 1024  # per device
    effective_batch: int | None = None  # per optimizer step; null: batch_size x devices
    checkpoint_every_n_steps: int = 500  # besides every epoch; 0: epochs only
    features: str = "online"  # online: a live backbone per batch | cached: from the token cache


@dataclass
class CacheConfig:  # values and their meaning: conf/cache/default.yaml
    dtype: str = MISSING
    views: int = MISSING
    shard_size: int = MISSING
    batch_size: int = MISSING
    verify: bool = MISSING
    blocks: list[int] | None = MISSING


@dataclass
class AnalysisConfig:
    split: str = "val"
    num_images: int = 5000
    batch_size: int = 64
    map_images: int = 4
    probe_ckpt: str | None = None
    embedding: list[str] = field(default_factory=lambda: ["cls", "mean"])
    embedding_images: int = 1000
    embedding_classes: int = 10


@dataclass
class KnnConfig:  # values and their meaning: conf/knn/default.yaml
    k: list[int] = MISSING
    temperatures: list[float] = MISSING
    batch_size: int = MISSING
    probe_ckpt: str | None = MISSING


@dataclass
class ReportConfig:
    sweep_dir: Any = None  # a sweep folder, or a list of them
    out_dir: str | None = None  # default: the (first) sweep folder


@dataclass
class WandbConfig:
    project: str = "mim_agg"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"


@dataclass
class LoggerConfig:
    wandb: WandbConfig | None = None


def auto_precision() -> str:
    """bf16 autocast where a GPU supports it (the paper's recipe), full precision elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="backbone", node=BackboneConfig)
    store.store(group="schema", name="dataset", node=DatasetConfig)
    store.store(group="schema", name="probe", node=ProbeConfig)
    store.store(group="schema", name="logger", node=LoggerConfig)
    store.store(group="schema", name="analysis", node=AnalysisConfig)
    store.store(group="schema", name="report", node=ReportConfig)
    store.store(group="schema", name="cache", node=CacheConfig)
    store.store(group="schema", name="knn", node=KnnConfig)
    for name in AGGREGATORS:
        store.store(group="schema/aggregator", name=name, node=options_schema(name))
    resolvers = {"auto_precision": auto_precision, "run_dir": _run_dir}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _run_dir(*, _root_: DictConfig) -> str:
    """``hydra.run.dir`` and ``hydra.sweep.subdir``: ``outputs/runs/<run_name>``, absolute (a
    sweep's jobs live beside single runs, not inside the sweep folder); a report writes into
    the sweep it reads."""
    if _root_.task == "report":
        return os.path.abspath(_root_.report.out_dir or _first(_root_.report.sweep_dir) or ".")
    if _root_.task == "extract":  # the cache is its output; it picks its own folder by key
        return os.path.abspath(_root_.paths.cache_dir)
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default={})
    return os.path.abspath(
        os.path.join(_root_.paths.output_root, "runs", run_name(_root_, choices))
    )


def _first(sweep_dir):
    return sweep_dir[0] if OmegaConf.is_list(sweep_dir) else sweep_dir
