"""The cache a run needs: planned from config, found by its key, extracted when missing.

Planning needs no weights: heads are built on the architecture alone, their merged request
says which fields to store (pooled vectors for parameter-free heads, tokens only when a learned
head reads them), and the data module's splits give the images. Only when shards are missing
is the backbone loaded and run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mim_agg.aggregators import Aggregator, build_aggregator
from mim_agg.builders import backbone_layout, build_live_source, grid_aggregators, head_request
from mim_agg.cache.extract import bytes_per_view, check_disk, extract, field_shapes, human
from mim_agg.cache.identity import cache_identity, cache_key
from mim_agg.cache.store import FORMAT, CacheError, SplitPlan, TokenCache
from mim_agg.data import ProbeDataModule
from mim_agg.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "test")


def open_cache(
    cfg: DictConfig,
    datamodule: ProbeDataModule,
    watch=None,
    build: bool = True,
    aggregators: list[Aggregator] | None = None,
) -> TokenCache:
    """The complete, checked cache for ``aggregators`` (default: this run's heads) on this
    data; missing shards are extracted first when ``build`` (else refused with the command
    that builds them). A complete cache is checked under a shared lock, so many jobs read one
    at once; extraction holds it alone."""
    datamodule.setup()
    layout = backbone_layout(cfg)
    if aggregators is None:
        with torch.random.fork_rng(devices=[]):  # learned heads are built for their request only
            aggregators = [build_aggregator(layout=layout, **o) for o in grid_aggregators(cfg)]
    aggregators = {a.cache_key: a for a in aggregators}
    request = head_request(aggregators.values(), cached=True)
    live_request = head_request(aggregators.values())
    views = split_views(cfg, datamodule)
    identity = cache_identity(cfg, request, datamodule.splits, views, live_request.oracle)
    key = cache_key(identity)
    folder = f"{cfg.backbone.arch}-{cfg.dataset.name}-{key}"
    cache = TokenCache(Path(cfg.paths.cache_dir).absolute() / folder)
    rebuild = rebuild_command(cfg)
    with cache.locked(shared=True):
        if cache.complete:
            log.info("Checking the token cache %s", cache.root)
            cache.check(key, rebuild, deep=cfg.cache.verify)
            return cache
    if not build:
        raise CacheError(f"No complete token cache at {cache.root}. Build it: {rebuild}")
    out_dims = {k: a.out_dim for k, a in aggregators.items()}
    shapes = field_shapes(layout, request, out_dims)
    with cache.locked():
        if not cache.complete:  # another process may have finished it meanwhile
            plans = {
                split: SplitPlan(len(datamodule.splits[split]), views[split], cfg.cache.shard_size)
                for split in SPLITS
            }
            cache.start(
                {
                    "format": FORMAT,
                    "key": key,
                    "identity": identity,
                    "layout": asdict(layout),
                    "request": identity["request"],
                    "fields": {name: list(shape) for name, shape in shapes.items()},
                    "dtype": cfg.cache.dtype,
                    "num_classes": datamodule.num_classes,
                    "versions": {"torch": torch.__version__, "timm": timm.__version__},
                    "splits": {s: {"plan": asdict(p), "shards": []} for s, p in plans.items()},
                }
            )
            # Resuming keeps the plan the first attempt wrote (its shard size, say).
            plans = {s: SplitPlan(**cache.manifest_entry(s)["plan"]) for s in SPLITS}
            describe(cache, plans, shapes, aggregators, cfg, datamodule.augment)
            check_disk(cache, plans, bytes_per_view(shapes, cfg.cache.dtype))
            extract(
                cache,
                build_live_source(cfg, live_request),
                datamodule.splits,
                plans,
                {k: a for k, a in aggregators.items() if k in request.pooled},
                shapes,
                cfg.cache.dtype,
                cfg.cache.batch_size,
                cfg.dataset.num_workers,
                augmented={"train"} if datamodule.augment else set(),
                precision=identity["precision"],
                watch=watch,
            )
        log.info("Checking the token cache %s", cache.root)
        cache.check(key, rebuild, deep=cfg.cache.verify)
    return cache


def split_views(cfg: DictConfig, datamodule: ProbeDataModule) -> dict[str, int]:
    """``cache.views`` augmented views of each training image; one centre crop elsewhere."""
    if cfg.cache.views > 1 and not datamodule.augment:
        raise ConfigError(
            f"cache.views={cfg.cache.views} with dataset.augment=false would store "
            "identical views; use cache.views=1, or dataset.augment=true."
        )
    return {"train": cfg.cache.views, "heldout": 1, "test": 1}


def describe(cache, plans: dict, shapes: dict, aggregators: dict, cfg, augment: bool) -> None:
    """Say what will be stored and why, before anything is written."""
    dtype = cfg.cache.dtype
    log.info("Token cache %s (%s):", cache.root, dtype)
    learned = sorted({a.name for a in aggregators.values() if not a.parameter_free})
    if "all" in shapes:
        log.info(
            "Full tokens are stored (%s per view) because learned heads read them: %s.",
            human(bytes_per_view({"all": shapes["all"]}, dtype)),
            ", ".join(learned),
        )
    else:
        log.info("Only the parameter-free heads' pooled vectors are stored (no learned head).")
    if augment and plans["train"].views == 1:
        log.warning(
            "cache.views=1 with dataset.augment=true: every epoch trains on the same random crop "
            "of each image (online, each epoch draws a new one). For the centre crop set "
            "dataset.augment=false; for online-like training, cache.views=<epochs>."
        )


def rebuild_command(cfg: DictConfig) -> str:
    """``python run.py task=extract <this run's overrides>`` (k-NN's fixed choices added)."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("task=")]
    if cfg.task == "knn":
        overrides += ["dataset.augment=false", "cache.views=1"]
    return " ".join(["python run.py task=extract", *overrides])
