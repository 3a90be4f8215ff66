"""The ``probe`` task: train linear heads on a frozen backbone, select on held-out, test once."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from mim_agg.aggregators import build_aggregator
from mim_agg.aggregators.base import get_aggregator_class
from mim_agg.backbones import FrozenBackbone
from mim_agg.backbones.frozen import resolve_normalization
from mim_agg.data import ProbeDataModule
from mim_agg.probe import LinearProbe, ProbeHead
from mim_agg.utils.loggers import build_loggers, finish_loggers
from mim_agg.utils.results import print_table, select_winner, write_metrics


def run(cfg: DictConfig) -> dict:
    """Run one probing job and return its ``metrics.json`` content."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # bad data paths fail before any weights are fetched
    model = build_probe(cfg)
    loggers = build_loggers(cfg, output_dir)
    try:
        trainer = instantiate(
            cfg.trainer,
            default_root_dir=str(output_dir),
            logger=loggers,
            callbacks=[
                ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True, save_top_k=0)
            ],
        )
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg, output_dir))
        trainer.test(model, datamodule=datamodule, verbose=False)
        summary = summarize(model, time.perf_counter() - started)
        for logger in loggers:
            logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
    finally:
        finish_loggers(loggers)
    write_metrics(output_dir / "metrics.json", summary)
    print_table(model.results, summary["winner"])
    return summary


def build_datamodule(cfg: DictConfig) -> ProbeDataModule:
    mean, std = resolve_normalization(cfg.backbone.weights, cfg.backbone.mean, cfg.backbone.std)
    return ProbeDataModule(
        **cfg.dataset,
        img_size=cfg.backbone.img_size,
        mean=mean,
        std=std,
        batch_size=cfg.probe.batch_size,
    )


def build_probe(cfg: DictConfig) -> LinearProbe:
    """The frozen backbone and one head per aggregator config (a grid of one, for now)."""
    aggregators = {cfg.aggregator.name: OmegaConf.to_container(cfg.aggregator)}
    needs_attn = any(get_aggregator_class(a["name"]).needs_attn for a in aggregators.values())
    backbone = FrozenBackbone(**cfg.backbone, return_attn=needs_attn)
    heads = {
        name: ProbeHead(
            build_aggregator(
                dim=backbone.dim,
                num_patches=backbone.num_patches,
                num_prefix_tokens=backbone.num_prefix_tokens,
                has_cls=backbone.has_cls,
                **options,
            ),
            cfg.dataset.num_classes,
        )
        for name, options in aggregators.items()
    }
    return LinearProbe(
        backbone,
        heads,
        blrs={name: cfg.probe.blr for name in heads},
        num_classes=cfg.dataset.num_classes,
        batch_size=cfg.probe.batch_size,
        optimizer=cfg.probe.optimizer,
        weight_decay=cfg.probe.weight_decay,
        momentum=cfg.probe.momentum,
        warmup_epochs=cfg.probe.warmup_epochs,
    )


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    last = output_dir / "checkpoints" / "last.ckpt"
    return str(last) if cfg.resume and last.is_file() else None


def summarize(model: LinearProbe, wall_time_s: float) -> dict:
    winner = select_winner(model.results)
    timing = model.timing
    return {
        "winner": winner,
        **model.results[winner],
        "backbone_images_per_s": timing["backbone_images"] / max(timing["backbone_s"], 1e-9),
        "train_images_per_s": timing["train_images"] / max(timing["train_s"], 1e-9),
        "wall_time_s": wall_time_s,
        "heads": model.results,
    }
