"""Pooled features from the token cache, for the protocols that train no aggregator (k-NN,
logistic regression): every aggregator of a run from one pass over each cached split.

The aggregators are the run's own (parameter-free: nothing here trains them) and, with a
protocol's ``probe_ckpt``, the pooling of a finished probe run's winning head. Images are
described as they are tested (the centre crop, one view), training images included.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader
from tqdm import tqdm

from mim_agg.aggregators import Aggregator
from mim_agg.backbones.tokens import TOKEN_CAUSES, require_finite
from mim_agg.builders import backbone_layout, build_aggregators, load_probe_head
from mim_agg.cache.build import open_cache
from mim_agg.cache.data import CachedSplit, CachedTokens
from mim_agg.errors import ConfigError
from mim_agg.runs.folder import global_rank

Features = dict[str, torch.Tensor]  # aggregator's config key -> [N, out_dim]


def evaluation_config(cfg: DictConfig) -> DictConfig:
    """Training images as they are tested: the centre crop, one view."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.dataset.augment = False
        cfg.cache.views = 1
    return cfg


def frozen_aggregators(cfg: DictConfig, group: str, protocol: str) -> dict[str, Aggregator]:
    """The aggregators ``protocol`` evaluates, by config key: the run's (parameter-free: there
    is no training here) and, with ``<group>.probe_ckpt``, the trained probe's winning head's
    (``probe_<aggregator>``)."""
    layout = backbone_layout(cfg)
    aggregators = build_aggregators(cfg, layout)
    for aggregator in aggregators.values():
        if not aggregator.parameter_free:
            raise ConfigError(
                f"aggregator {aggregator.name!r} has trainable parameters, and {protocol} "
                f"trains no aggregator. Train it with task=probe, then pass {group}.probe_ckpt="
                "<that run>/checkpoints/last.ckpt (with a parameter-free aggregator=, e.g. cls)."
            )
    if cfg[group].probe_ckpt:
        probe = load_probe_head(cfg, cfg[group].probe_ckpt, layout)
        aggregators[f"probe_{probe.aggregator.name}"] = probe.aggregator.requires_grad_(False)
    return aggregators


def pooled_features(
    cfg, datamodule, aggregators: dict, *, group: str, watch=None
) -> PooledFeatures | None:
    """The features of the run's cache, extracted first where missing. A multi-process
    trainer's ranks (``trainer=ddp``) extract together, each its part of every split, as
    ``task=extract`` does; the features are then rank zero's work alone (k-NN and logistic
    regression take seconds to minutes once the tokens exist): None on the other ranks, whose
    work ends with their part."""
    cache = open_cache(cfg, datamodule, list(aggregators.values()), watch, distributed=True)
    if global_rank() != 0:
        return None
    return PooledFeatures(cfg, cache, aggregators, group=group, watch=watch)


class PooledFeatures:
    """The features of ``aggregators`` on the splits of ``cache``, computed on ``device`` (the
    GPU when there is one). Every batch is checked finite: a NaN feature would make any
    protocol chance-level without failing."""

    def __init__(self, cfg, cache, aggregators: dict, *, group: str, watch=None) -> None:
        self.cache = cache
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.source = CachedTokens.of(self.cache).to(self.device)
        self.aggregators = {n: a.to(self.device).eval() for n, a in aggregators.items()}
        self.batch_size, self.num_workers = cfg[group].batch_size, cfg.dataset.num_workers
        self.causes = f"{TOKEN_CAUSES}; for a probe's head also {group}.probe_ckpt"
        self.watch = watch

    def stream(self, split: str, desc: str) -> Iterator[tuple[Features, torch.Tensor]]:
        """``({name: features [b, D]}, labels [b])`` per batch of a cached split."""
        loader = DataLoader(
            CachedSplit(self.cache, split), batch_size=self.batch_size, num_workers=self.num_workers
        )
        for fields, labels in tqdm(loader, desc=f"{desc} {split}", unit="batch"):
            if self.watch is not None:
                self.watch.check()
            tokens = self.source({k: v.to(self.device) for k, v in fields.items()})
            tokens = tokens.map(lambda t: t.float())
            with torch.no_grad():
                features = {name: agg(tokens) for name, agg in self.aggregators.items()}
            for name, values in features.items():
                what = f"The {desc} features of head {name!r} ({split} split)"
                require_finite(what, [values], self.causes)
            yield features, labels.to(self.device)

    def whole(self, split: str, desc: str) -> tuple[Features, torch.Tensor]:
        """All features of a split: ``({name: [N, D]}, labels [N])``, empty where the split
        is (no held-out images)."""
        batches = list(self.stream(split, desc))
        if not batches:
            empty = {
                n: torch.empty(0, a.out_dim, device=self.device)
                for n, a in self.aggregators.items()
            }
            return empty, torch.empty(0, dtype=torch.int64, device=self.device)
        features = {name: torch.cat([b[0][name] for b in batches]) for name in self.aggregators}
        return features, torch.cat([b[1] for b in batches])
