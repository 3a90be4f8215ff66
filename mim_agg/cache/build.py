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
from mim_agg.builders import backbone_layout, build_live_source, head_grid, head_request
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
    that builds them)."""
    datamodule.setup()
    layout = backbone_layout(cfg)
    if aggregators is None:
        with torch.random.fork_rng(devices=[]):  # learned heads are built for their request only
            aggregators = [build_aggregator(layout=layout, **o) for o, _ in head_grid(cfg).values()]
    aggregators = {a.cache_key: a for a in aggregators}
    request = head_request(aggregators.values(), cached=True)
    views = split_views(cfg, datamodule)
    identity = cache_identity(cfg, request, datamodule.splits, views)
    key = cache_key(identity)
    folder = f"{cfg.backbone.arch}-{cfg.dataset.name}-{key}"
    cache = TokenCache(Path(cfg.paths.cache_dir).absolute() / folder)
    out_dims = {k: a.out_dim for k, a in aggregators.items()}
    shapes = field_shapes(layout, request, out_dims)
    plans = {
        split: SplitPlan(len(datamodule.splits[split]), views[split], cfg.cache.shard_size)
        for split in SPLITS
    }
    rebuild = rebuild_command()
    with cache.locked():
        if not cache.complete:
            if not build:
                raise CacheError(f"No complete token cache at {cache.root}. Build it: {rebuild}")
            manifest = {
                "format": FORMAT,
                "key": key,
                "identity": identity,
                "layout": asdict(layout),
                "request": identity["request"],
                "fields": {name: list(shape) for name, shape in shapes.items()},
                "dtype": cfg.cache.dtype,
                "num_classes": datamodule.num_classes,
                "versions": {"torch": torch.__version__, "timm": timm.__version__},
                "splits": {
                    split: {"plan": asdict(plan), "shards": []} for split, plan in plans.items()
                },
            }
            cache.start(manifest)
            describe(cache, plans, shapes, aggregators, cfg.cache.dtype)
            check_disk(cache, plans, bytes_per_view(shapes, cfg.cache.dtype))
            live = build_live_source(cfg, head_request(aggregators.values()))
            poolers = {k: a for k, a in aggregators.items() if k in request.pooled}
            extract(
                cache,
                live,
                datamodule.splits,
                plans,
                poolers,
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


def describe(cache: TokenCache, plans: dict, shapes: dict, aggregators: dict, dtype: str) -> None:
    """Say what will be stored and why, before anything is written."""
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


def rebuild_command() -> str:
    """``python run.py task=extract <this run's overrides>``."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("task=")]
    return " ".join(["python run.py task=extract", *overrides])
