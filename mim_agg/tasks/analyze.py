"""The ``analyze`` task: the paper's attention diagnostics for one backbone, with figures.

Streams ``analysis.num_images`` images of one split (eval transform) through the frozen
backbone with every block traced, accumulates the statistics of ``mim_agg.analysis.statistics``
and writes ``attention_stats.json``, ``attention_stats.png``, ``attention_maps.png`` and
``embedding.png`` to the run folder (and to W&B: each figure under ``figures/<name>``, the
statistics as a table).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING, DictConfig
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mim_agg.aggregators import build_aggregator
from mim_agg.analysis.figures import (
    attention_maps_figure,
    context,
    embedding_figure,
    save_figure,
    statistics_figure,
)
from mim_agg.analysis.statistics import StatisticsAccumulator, attention_statistics, update_ratios
from mim_agg.analysis.tracing import trace_blocks
from mim_agg.backbones import FrozenBackbone, Tokens
from mim_agg.backbones.frozen import skeleton
from mim_agg.backbones.tokens import require_finite
from mim_agg.builders import build_backbone, build_datamodule, load_probe_head
from mim_agg.data.device_decode import collate, finish_images
from mim_agg.runs.identity import result_config
from mim_agg.utils.files import write_json
from mim_agg.utils.loggers import build_loggers, finish_loggers, log_figures
from mim_agg.validation import backbone_arguments

SPLITS = {"val": "test", "train": "train"}


log = logging.getLogger(__name__)

SUMMARY = "the paper's attention statistics per block, attention maps, t-SNE"
USES_RUN_FOLDER = True
IGNORED = ()
SETTINGS_GROUP = "analysis"


@dataclass
class Settings:  # values and their meaning: conf/analysis/default.yaml
    split: str = MISSING
    num_images: int = MISSING
    batch_size: int = MISSING
    map_images: int = MISSING
    probe_ckpt: str | None = MISSING
    embedding: list[str] = MISSING
    embedding_images: int = MISSING
    embedding_classes: int = MISSING


def reads(cfg: DictConfig) -> tuple[str, ...]:
    """The config groups the analysis depends on (its run's identity): no aggregator."""
    return ("task", "seed", "backbone", "dataset", "analysis", "trainer")


def run(cfg: DictConfig, watch=None) -> dict:
    """Short and read-only: a preemption signal ends it at the next batch; a rerun starts over."""
    output_dir = Path(cfg.paths.output_dir)
    architecture = skeleton(**backbone_arguments(cfg.backbone))  # checked before any fetching:
    architecture.reader.attention(architecture.block)  # a family without attention maps, by name
    torch.manual_seed(cfg.seed)
    loader = build_loader(cfg)
    backbone = build_backbone(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.to(device)
    probe_head = None
    if cfg.analysis.probe_ckpt:
        probe_head = load_probe_head(cfg, cfg.analysis.probe_ckpt, backbone.layout).to(device)
    collector = Collector(cfg, backbone, probe_head)
    with trace_blocks(backbone.model.blocks) as records:
        for images, targets in tqdm(loader, desc="attention statistics", unit="batch"):
            if watch is not None:
                watch.check()
            images = finish_images(images, device)
            tokens = backbone(images)
            require_finite("The backbone's tokens", tokens.tensors())
            collector.add(images, targets, tokens, records)
    result = {
        "backbone": cfg.backbone.weights or cfg.backbone.arch,
        "family": cfg.backbone.family,
        **collector.statistics.result(backbone.layout.num_patches),
    }
    write_json(output_dir / "attention_stats.json", result)
    figures = collector.figures(result, output_dir)
    log_to_wandb(cfg, output_dir, result, figures)
    log.info(
        "Attention statistics of %d images -> %s, %s",
        result["num_images"],
        "attention_stats.json",
        ", ".join(path.name for path in figures),
    )
    return result


def finished(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "attention_stats.json").read_text())


def build_loader(cfg: DictConfig) -> DataLoader:
    """A seeded sample of ``num_images`` images of the split, with the eval transform."""
    if cfg.analysis.split not in SPLITS:
        raise ValueError(f"analysis.split={cfg.analysis.split!r} is not one of {list(SPLITS)}.")
    dataset = build_datamodule(cfg).eval_split(SPLITS[cfg.analysis.split])
    order = np.random.default_rng(cfg.seed).permutation(len(dataset))
    sample = Subset(dataset, order[: cfg.analysis.num_images].tolist())
    return DataLoader(
        sample,
        batch_size=cfg.analysis.batch_size,
        num_workers=cfg.dataset.num_workers,
        collate_fn=collate,
    )


class Collector:
    """Everything the analysis keeps from each batch: statistics, a few maps, some features."""

    def __init__(self, cfg: DictConfig, backbone: FrozenBackbone, probe_head) -> None:
        self.cfg = cfg.analysis
        self.context = context([result_config(cfg)])  # the figures' title line
        self.num_classes = cfg.dataset.num_classes
        self.backbone = backbone
        self.probe_head = probe_head
        self.statistics = StatisticsAccumulator(len(backbone.model.blocks))
        self.aggregators = {name: self._aggregator(name) for name in self.cfg.embedding}
        shown = {
            "[cls] attention, head mean": "attn_mean",
            "lowest-entropy head": "attn_min_entropy",
        }
        self.map_aggregators = (
            {title: self._aggregator(name) for title, name in shown.items()}
            if backbone.layout.has_cls
            else {}
        )
        for name, aggregator in self.aggregators.items():
            if not aggregator.parameter_free:
                raise ValueError(
                    f"analysis.embedding lists {name!r}, which has trainable parameters; "
                    "list parameter-free aggregators such as cls, mean or attn_mean."
                )
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.images: list[torch.Tensor] = []
        self.map_labels: list[int] = []
        self.features: dict[str, list[torch.Tensor]] = {name: [] for name in self.aggregators}
        self.labels: list[torch.Tensor] = []

    def _aggregator(self, name: str):
        aggregator = build_aggregator(name, self.backbone.layout)
        return aggregator.to(next(self.backbone.parameters()).device)

    def add(self, images, targets, tokens: Tokens, records) -> None:
        prefix, has_cls = self.backbone.layout.num_prefix_tokens, self.backbone.layout.has_cls
        for block, record in enumerate(records):
            self.statistics.add(block, attention_statistics(record.attn, prefix, has_cls))
            self.statistics.add(block, update_ratios(record.input, record.update, prefix, has_cls))
        self.statistics.count(len(images))
        if has_cls:  # what the [cls]-attention poolings drawn in the maps read
            tokens.cls_attn = records[-1].attn[:, :, 0, prefix:]
        self._keep_maps(images, targets, tokens)
        self._keep_features(targets, tokens)

    def _keep_maps(self, images, targets, tokens: Tokens) -> None:
        wanted = self.cfg.map_images - sum(len(i) for i in self.images)
        if wanted <= 0 or not self.backbone.layout.has_cls:
            return
        trimmed = tokens.map(lambda t: t[:wanted])
        maps = {
            title: aggregator.pooling_weights(trimmed)
            for title, aggregator in self.map_aggregators.items()
        }
        if self.probe_head is not None:
            aggregator = self.probe_head.aggregator
            with torch.no_grad():
                maps[f"probe: {aggregator.name} weights"] = aggregator.pooling_weights(trimmed)
        for title, values in maps.items():
            self.maps.setdefault(title, []).append(values.unflatten(1, tokens.layout.grid).cpu())
        self.images.append(self._unnormalize(images[:wanted]))
        self.map_labels += targets[:wanted].tolist()

    def _unnormalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.backbone.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.std).view(1, 3, 1, 1)
        return images.cpu() * std + mean

    def _keep_features(self, targets, tokens: Tokens) -> None:
        if sum(len(label) for label in self.labels) >= self.cfg.embedding_images:
            return
        keep = targets < self.cfg.embedding_classes  # the first classes, as colours stay legible
        self.labels.append(targets[keep])
        for name, aggregator in self.aggregators.items():
            features = aggregator(tokens)[keep.to(tokens.all.device)]
            self.features[name].append(features.float().cpu())

    def figures(self, result: dict, output_dir: Path) -> list[Path]:
        """The PNGs, each titled with the run's backbone, weights, dataset and split."""
        block = self.backbone.block  # as backbone.block counts: 0 = first
        stats_title = (
            f"Attention statistics per block, mean over {result['num_images']} images and "
            f"all heads\n{self.context}"
        )
        figures = {"attention_stats": statistics_figure({result["backbone"]: result}, stats_title)}
        if self.images:
            maps = {title: torch.cat(values) for title, values in self.maps.items()}
            title = (
                f"[cls] -> patch attention, block {block} (the probed one), "
                f"{len(self.map_labels)} images\n{self.context}"
            )
            figures["attention_maps"] = attention_maps_figure(
                torch.cat(self.images), maps, self.map_labels, title
            )
        labels = torch.cat(self.labels).numpy() if self.labels else np.array([])
        if len(labels) > 5:
            features = {name: torch.cat(values) for name, values in self.features.items()}
            chosen = self.num_classes is None or self.num_classes > self.cfg.embedding_classes
            which = f" (ids < analysis.embedding_classes={self.cfg.embedding_classes})"
            title = (
                f"t-SNE of block {block}'s pooled features, {len(labels)} images of "
                f"{len(np.unique(labels))} classes{which if chosen else ''}\n{self.context}"
            )
            figures["embedding"] = embedding_figure(features, labels, title)
        return [save_figure(fig, output_dir / f"{name}.png") for name, fig in figures.items()]


def log_to_wandb(cfg: DictConfig, output_dir: Path, result: dict, figures: list[Path]) -> None:
    """Figures as images and the per-block statistics as a table (no-op when W&B is off)."""
    loggers = build_loggers(cfg)
    try:
        for logger in loggers:
            if hasattr(logger, "log_image"):
                names = list(result["stats"])
                rows = [
                    [block, *(result["stats"][n][block] for n in names)]  # backbone.block numbering
                    for block in range(len(result["stats"][names[0]]))
                ]
                logger.log_table("attention_stats", columns=["block", *names], data=rows)
        log_figures(loggers, figures)
    finally:
        finish_loggers(loggers)
