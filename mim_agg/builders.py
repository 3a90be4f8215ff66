"""Objects built from config, in one place for every task: data, heads, token source, probe.

Heads are built first, on the backbone's architecture alone (``skeleton``: no weights, no
download), so a head that cannot serve this backbone refuses before anything is fetched; what
they need is then merged into one ``TokenRequest`` for the token source.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenLayout, TokenRequest, TokenSource
from mim_agg.backbones.frozen import resolve_normalization, skeleton
from mim_agg.data import ProbeDataModule
from mim_agg.errors import ConfigError
from mim_agg.probe import LinearProbe, ProbeHead


def build_datamodule(cfg: DictConfig) -> ProbeDataModule:
    """Images of ``dataset``, normalised for ``backbone``, batched by ``probe.batch_size``."""
    mean, std = resolve_normalization(cfg.backbone.weights, cfg.backbone.mean, cfg.backbone.std)
    return ProbeDataModule(
        **cfg.dataset,
        img_size=cfg.backbone.img_size,
        mean=mean,
        std=std,
        batch_size=cfg.probe.batch_size,
    )


def backbone_layout(cfg: DictConfig) -> TokenLayout:
    """The probed block's token layout, from the architecture alone (nothing downloaded)."""
    return skeleton(**cfg.backbone).layout


def head_grid(cfg: DictConfig) -> dict[str, tuple[dict, float]]:
    """Every (aggregator options, base learning rate) pair of the run, by head name.

    The aggregators are ``aggregator`` plus the named entries of ``heads``; the rates are
    ``probe.blrs`` (or ``probe.blr`` alone). One rate keeps plain aggregator names.
    """
    aggregators = {cfg.aggregator.name: cfg.aggregator}
    for key, options in cfg.heads.items():
        if key in aggregators and options != aggregators[key]:
            raise ConfigError(
                f"Two different heads are named {key!r}; add one under another name: "
                f"+aggregator@heads.{key}_2={options.name}"
            )
        aggregators[key] = options
    blrs = list(cfg.probe.blrs or [cfg.probe.blr])
    if len(aggregators) * len(blrs) > 1 and cfg.dataset.heldout_fraction == 0:
        raise ConfigError(
            "Choosing among several heads needs held-out data; set dataset.heldout_fraction > 0."
        )
    return {
        head_name(key, blr, len(blrs)): (OmegaConf.to_container(options), blr)
        for key, options in aggregators.items()
        for blr in blrs
    }


def head_name(aggregator_key: str, blr: float, num_blrs: int) -> str:
    """``abmilp``, or ``abmilp_blr0p1`` in a learning-rate grid (no dots: module names)."""
    return aggregator_key if num_blrs == 1 else f"{aggregator_key}_blr{blr:g}".replace(".", "p")


def build_head(seed: int, layout: TokenLayout, options: dict, num_classes: int) -> ProbeHead:
    """Initialise from ``seed`` alone, so a head starts the same alone or in any grid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(build_aggregator(layout=layout, **options), num_classes)


def build_heads(cfg: DictConfig, layout: TokenLayout, num_classes: int) -> dict[str, ProbeHead]:
    return {
        name: build_head(cfg.seed, layout, options, num_classes)
        for name, (options, _) in head_grid(cfg).items()
    }


def head_request(aggregators, cached: bool = False) -> TokenRequest:
    """What the heads read, merged; from a cache, parameter-free aggregators read only their
    stored outputs (``pooled``), and the tokens are stored only when a learned one needs them."""
    request = TokenRequest()
    for aggregator in aggregators:
        if cached and aggregator.parameter_free:
            request = request | TokenRequest(pooled=(aggregator.cache_key,))
        else:
            request = request | aggregator.request()
    return request


def build_backbone(cfg: DictConfig) -> FrozenBackbone:
    """Random weights (``backbone.weights=null``) are drawn from ``seed`` alone: the same
    config gives the same backbone in every task, online or extracting a cache."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FrozenBackbone(**cfg.backbone)


def build_live_source(cfg: DictConfig, request: TokenRequest) -> LiveTokens:
    """The frozen backbone (and oracle) serving ``request``; checked on the architecture
    first, so a request it cannot serve fails before the weights are fetched."""
    skeleton(**cfg.backbone).provide(request)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # a random oracle, too, is the seed's
        return LiveTokens(build_backbone(cfg), request)


def build_probe(
    cfg: DictConfig, num_classes: int | None = None, source: TokenSource | None = None
) -> LinearProbe:
    """One head per grid point over one token source (default: the live backbone).
    ``num_classes``: the data's count (default: ``dataset.num_classes``)."""
    num_classes = num_classes or cfg.dataset.num_classes
    heads = build_heads(cfg, source.layout if source else backbone_layout(cfg), num_classes)
    if source is None:
        source = build_live_source(cfg, head_request(h.aggregator for h in heads.values()))
    return LinearProbe(
        source,
        heads,
        blrs={name: blr for name, (_, blr) in head_grid(cfg).items()},
        num_classes=num_classes,
        batch_size=cfg.probe.batch_size,
        optimizer=cfg.probe.optimizer,
        weight_decay=cfg.probe.weight_decay,
        momentum=cfg.probe.momentum,
        warmup_epochs=cfg.probe.warmup_epochs,
    )
