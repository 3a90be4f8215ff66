"""Lightning loggers for a run: always a CSV log, and W&B unless it is switched off."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from mim_agg.utils.files import read_json


def wandb_mode(requested: str) -> str:
    """``WANDB_MODE`` wins; ``auto`` means online only when an API key is configured, so a
    run never stops to prompt for a login."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    return "online" if _has_wandb_key() else "offline"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """A CSV log, and W&B: one run per run folder (its id kept in ``run.json``, so resumed
    and requeued attempts log into the same W&B run), grouped by sweep, named by overrides."""
    # One version folder per attempt: a resumed run never overwrites the log of the last one.
    loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name="csv")]
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg is not None and wandb_mode(wandb_cfg.mode) != "disabled":
        record = read_json(output_dir / "run.json", default={})
        wandb = WandbLogger(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            group=wandb_cfg.group or record.get("group", output_dir.name),
            tags=list(wandb_cfg.tags),
            name=",".join(record.get("overrides", [])) or output_dir.name,
            job_type=cfg.task,
            id=record.get("run_id"),
            resume="allow",
            save_dir=str(output_dir),
            mode=wandb_mode(wandb_cfg.mode),
        )
        wandb.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(wandb)
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the W&B run so that the next multirun job starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
