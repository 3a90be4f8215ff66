"""The ``probe`` task: train linear heads on a frozen backbone, select on held-out, test once."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from mim_agg.analysis.figures import save_figure
from mim_agg.backbones.loading import read_run_checkpoint
from mim_agg.builders import backbone_layout, build_datamodule, build_heads, build_probe, head_grid
from mim_agg.cache import CachedDataModule, CachedTokens, open_cache
from mim_agg.data.datamodule import SplitLoaders
from mim_agg.errors import ConfigError
from mim_agg.probe import LinearProbe
from mim_agg.probe.checkpoint_io import AtomicCheckpointIO
from mim_agg.probe.flops import added_gflops
from mim_agg.probe.progress import ProbeProgressBar
from mim_agg.report.cost import cost_figure, run_points
from mim_agg.runs.preemption import SignalWatch, StopOnSignal
from mim_agg.utils.files import write_atomic, write_json
from mim_agg.utils.loggers import build_loggers, finish_loggers
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import write_predictions
from mim_agg.utils.results import print_table, select_winner, write_csv, write_metrics

log = logging.getLogger(__name__)


SUMMARY = "train linear heads on the frozen tokens, select on held-out, test once (default)"
USES_RUN_FOLDER = True
Settings = None  # its options are the probe group's: one recipe per file in conf/probe/
IGNORED = ()  # keys inside the read groups that never change a probe's numbers
# {"classes": the names of labels 0..N-1, or null}: what task=evaluate maps other sets onto
CLASSES = "classes.json"


def reads(cfg: DictConfig) -> tuple[str, ...]:
    """The config groups a probe's results depend on (its run's identity): the cache's
    options only when it trains from the cache."""
    groups = ("task", "seed", "heads", "backbone", "aggregator", "callbacks", "dataset", "probe")
    return (*groups, "cache", "trainer") if cfg.probe.features == "cached" else (*groups, "trainer")


def run(cfg: DictConfig, watch: SignalWatch | None = None) -> dict:
    """Train and test every head of the grid; return ``metrics.json``'s content.

    Resumes from ``checkpoints/last.ckpt`` (written every epoch, every
    ``probe.checkpoint_every_n_steps`` steps and on preemption) when ``resume`` is set.
    """
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # bad data fails before any weights are fetched
    class_names = datamodule.class_names
    if datamodule.low_shot:
        write_atomic(output_dir / "subset.txt", datamodule.subset_listing())
    heads = build_heads(cfg, backbone_layout(cfg), datamodule.num_classes)
    source = None
    if cfg.probe.features == "cached":
        aggregators = [head.aggregator for head in heads.values()]
        cache = open_cache(cfg, datamodule, aggregators, watch, distributed=True)
        datamodule = CachedDataModule(
            cache, cfg.probe.batch_size, cfg.dataset.num_workers, cfg.dataset.seed
        )
        source = CachedTokens.of(cache)
    datamodule.test_each_epoch = cfg.probe.test_each_epoch
    model = build_probe(cfg, datamodule.num_classes, source, heads)
    loggers = build_loggers(cfg)
    try:
        trainer = build_trainer(cfg, output_dir, loggers, watch, datamodule)
        checkpoint = resume_path(cfg, output_dir)
        if checkpoint:
            log.info("Resuming from %s", checkpoint)
        trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
        trainer.test(model, datamodule=datamodule, verbose=False)
        summary = summarize(model, time.perf_counter() - started)
        head_rows = describe_heads(cfg, model)
        for logger in loggers:
            logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
    finally:
        finish_loggers(loggers)
    if trainer.is_global_zero:  # DDP ranks share the run folder; one writes
        show(summary)
        warn_if_limited(cfg)
        write_predictions(output_dir / PREDICTIONS, model.predictions)
        write_csv(output_dir / "heads.csv", head_rows)
        title = f"{output_dir.name}\ntest top-1 (%) of each aggregator, held-out-selected rate"
        save_figure(cost_figure(run_points(head_rows), title), output_dir / "cost.png")
        write_json(output_dir / CLASSES, {"classes": class_names})
        write_metrics(output_dir / "metrics.json", summary)
    return summary


def warn_if_limited(cfg: DictConfig) -> None:
    """``debug=limit`` and its like: numbers from part of the data must not pass for results."""
    limits = {
        key: value
        for key, value in cfg.trainer.items()
        if key.startswith("limit_") and value not in (None, 1.0)
    }
    if limits:
        shown = ", ".join(f"trainer.{k}={v}" for k, v in limits.items())
        log.warning("These numbers come from part of the data (%s): not results.", shown)


def finished(output_dir: Path) -> dict:
    """The stored results of a finished run, shown as if it had just run."""
    summary = json.loads((Path(output_dir) / "metrics.json").read_text())
    show(summary)
    return summary


def show(summary: dict) -> None:
    """The results table on the console, the winner's numbers in the text log."""
    print_table(summary["heads"], summary["winner"])
    heldout = summary["val/acc1_best"]
    chosen = (
        "no held-out split: its last epoch"
        if heldout is None
        else f"held-out acc1 {100 * heldout:.2f}% at epoch {summary['best_epoch']}"
    )
    log.info(
        "Winner %s: test acc1 %.2f%% (%s)", summary["winner"], 100 * summary["test/acc1"], chosen
    )


def build_trainer(
    cfg: DictConfig,
    output_dir: Path,
    loggers: list,
    watch: SignalWatch | None,
    datamodule: SplitLoaders,
) -> L.Trainer:
    """The configured Trainer with checkpoints every epoch and every N steps, a stop on
    preemption signals, the user's extra callbacks and gradient accumulation up to
    ``probe.effective_batch`` (at most an epoch's batches of ``datamodule``). Lightning's own
    SLURM requeue stays off: submitit requeues."""
    checkpoints = output_dir / "checkpoints"
    # Both write last.ckpt: top-1 of "no metric" is simply the newest (save_top_k=0 with
    # save_last=True would never save an epoch's end before training ends).
    last_only = dict(filename="last", save_top_k=1, monitor=None, enable_version_counter=False)
    callbacks = [ModelCheckpoint(checkpoints, save_on_train_epoch_end=True, **last_only)]
    if cfg.probe.checkpoint_every_n_steps:
        steps = cfg.probe.checkpoint_every_n_steps
        callbacks.append(ModelCheckpoint(checkpoints, every_n_train_steps=steps, **last_only))
    if watch is not None:
        callbacks.append(StopOnSignal(watch, checkpoints / "last.ckpt"))
    callbacks += [instantiate(callback) for callback in cfg.callbacks.values()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProbeProgressBar())
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(output_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=plugins,
    )
    steps = accumulation(cfg, trainer.world_size)
    trainer.accumulate_grad_batches = within_epoch(steps, datamodule, trainer.world_size)
    return trainer


def within_epoch(steps: int, datamodule: SplitLoaders, world_size: int) -> int:
    """``steps`` accumulated batches, or the batches of one epoch when it holds fewer.

    Lightning steps at an epoch's end whatever was accumulated, and divides every batch's loss
    by the configured count: a step of fewer batches would have its gradient shrunk by that
    ratio on top of the learning rate scaled by the images it saw (``LinearProbe``)."""
    batches, _ = datamodule.train_epoch(world_size)
    if steps > batches:
        log.info(
            "probe.effective_batch=%s needs %d accumulated batches, but an epoch holds %d: "
            "each optimizer step accumulates %d.",
            datamodule.batch_size * world_size * steps,
            steps,
            batches,
            batches,
        )
    return min(steps, batches)


def accumulation(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step so that batch x devices x steps = probe.effective_batch."""
    if cfg.probe.effective_batch is None:
        return 1
    per_step = cfg.probe.batch_size * world_size
    if cfg.probe.effective_batch % per_step:
        raise ConfigError(
            f"probe.effective_batch={cfg.probe.effective_batch} is no multiple of "
            f"probe.batch_size={cfg.probe.batch_size} x {world_size} device(s) = {per_step}; "
            "change probe.batch_size or probe.effective_batch."
        )
    return cfg.probe.effective_batch // per_step


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    last = output_dir / "checkpoints" / "last.ckpt"  # replaced atomically (AtomicCheckpointIO)
    if not (cfg.resume and last.is_file()):
        return None
    check_resumable(last)
    return str(last)


def check_resumable(last: Path) -> None:
    """A damaged or foreign ``last.ckpt`` (a disk that filled, a copy cut short) is named with
    the fix before Lightning reads it: Lightning's own error names no file."""
    fix = "delete it to restart the run from scratch, or pass resume=false"
    read_run_checkpoint(last, fix, keys=("state_dict", "loops"))


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


def describe_heads(cfg: DictConfig, model: LinearProbe) -> list[dict]:
    """The rows of ``heads.csv``: each grid point's identity, cost and accuracy."""
    return [
        {
            "head": name,
            "aggregator": spec.options["name"],
            "blr": spec.blr,
            "wd": spec.wd,
            "added_gflops": added_gflops(model.heads[name], model.source.layout),
            **model.results[name],
        }
        for name, spec in head_grid(cfg).items()
    ]
