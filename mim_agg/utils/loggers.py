"""Lightning loggers for a run, from ``logger`` (``_target_`` configs): a CSV log, and W&B
unless it is switched off."""

from __future__ import annotations

import logging
import netrc
import os
import socket
import urllib.parse
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
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


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers of ``cfg.logger`` (``_target_`` configs; one that declines, W&B switched
    off, is left out), each given the run's resolved config."""
    loggers = [instantiate(node) for node in cfg.logger.values() if node is not None]
    loggers = [logger for logger in loggers if logger is not None]
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(hyperparameters)  # W&B: this starts the run
    return loggers


def wandb_logger(
    project: str,
    entity: str | None,
    group: str | None,
    tags: list[str],
    mode: str,
    save_dir: str,
    job_type: str,
) -> WandbLogger | None:
    """W&B for the run folder ``save_dir``: one W&B run per run folder (its id kept in
    ``run.json``, so resumed and requeued attempts log into the same W&B run), grouped by
    sweep, named by what sets it apart from the sweep's other jobs. None when switched off;
    offline, said once, when the server cannot be reached or refuses the run."""
    mode = wandb_mode(mode)
    if mode == "online" and not wandb_reachable():
        log.warning(
            "W&B at %s is unreachable: logging offline (make wandb-sync uploads it later).",
            wandb_url(),
        )
        mode = "offline"
    if mode == "disabled":
        return None
    record = read_json(Path(save_dir) / "run.json", default={})
    options = dict(
        project=project,
        entity=entity,
        group=group or record.get("group", Path(save_dir).name),
        tags=list(tags),
        name=record.get("label", Path(save_dir).name),
        job_type=job_type,
        id=record.get("run_id"),
        resume="allow",
        save_dir=save_dir,
    )
    try:
        return started(WandbLogger(**options, mode=mode))
    except Exception as error:  # wandb's own errors: a bad key, a refusing server
        if mode != "online":
            raise
        log.warning("W&B refused the run (%s): logging offline.", str(error).splitlines()[0])
        return started(WandbLogger(**options, mode="offline"))


def started(logger: WandbLogger) -> WandbLogger:
    """The W&B run begins here, so a refusing server is met before training, not in it."""
    logger.experiment  # noqa: B018  (the property calls wandb.init)
    return logger


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
