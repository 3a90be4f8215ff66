"""Lightning loggers for a run: always a CSV log, and W&B unless it is switched off."""

from __future__ import annotations

import logging
import netrc
import os
import socket
import urllib.parse
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from mim_agg.utils.files import read_json

log = logging.getLogger(__name__)


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


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_reachable(timeout_s: float = 3.0) -> bool:
    """Whether W&B's server accepts a connection within a few seconds: without network,
    wandb.init would otherwise wait minutes and then fail the run."""
    url = urllib.parse.urlsplit(wandb_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """A CSV log, and W&B: one run per run folder (its id kept in ``run.json``, so resumed
    and requeued attempts log into the same W&B run), grouped by sweep, named by what sets it
    apart from the sweep's other jobs."""
    # One version folder per attempt: a resumed run never overwrites the log of the last one.
    loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name="csv")]
    wandb_cfg = cfg.logger.wandb
    mode = wandb_mode(wandb_cfg.mode) if wandb_cfg is not None else "disabled"
    if mode == "online" and not wandb_reachable():
        log.warning(
            "W&B at %s is unreachable: logging offline (make wandb-sync uploads it later).",
            wandb_url(),
        )
        mode = "offline"
    if mode == "disabled":
        return loggers
    try:
        loggers.append(start_wandb(cfg, output_dir, mode))
    except Exception as error:  # wandb's own errors: a bad key, a refusing server
        if mode != "online":
            raise
        log.warning("W&B refused the run (%s): logging offline.", str(error).splitlines()[0])
        loggers.append(start_wandb(cfg, output_dir, "offline"))
    return loggers


def start_wandb(cfg: DictConfig, output_dir: Path, mode: str) -> WandbLogger:
    wandb_cfg = cfg.logger.wandb
    record = read_json(output_dir / "run.json", default={})
    wandb = WandbLogger(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group or record.get("group", output_dir.name),
        tags=list(wandb_cfg.tags),
        name=record.get("label", output_dir.name),
        job_type=cfg.task,
        id=record.get("run_id"),
        resume="allow",
        save_dir=str(output_dir),
        mode=mode,
    )
    wandb.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # starts the run
    return wandb


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the W&B run so that the next multirun job starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def log_figures(loggers: list[Logger], paths: list[Path]) -> None:
    """Each saved PNG as a W&B image under its own key, ``figures/<file stem>``, all in one
    step: figures of different sizes under one key make W&B warn that their sizes do not
    match, and show them distorted."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics(
                {f"figures/{p.stem}": wandb.Image(str(p), caption=p.name) for p in paths}
            )
