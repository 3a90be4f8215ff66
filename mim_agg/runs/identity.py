"""What makes two runs the same run: the config values that can change their results.

A run folder is named after a hash of these values, so rerunning a command finds its own run,
and a folder refuses to resume under a config that differs in any of them. Everything else
(where files go, logging, worker counts, how often to checkpoint) may change between attempts.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from mim_agg.backbones.frozen import DEFAULT_DTYPE
from mim_agg.data.decode import DEFAULT_DECODE

# Keys inside the groups a task reads that never change a run's numbers, for every task.
NOT_RESULTS = (
    "dataset.num_workers",
    "probe.checkpoint_every_n_steps",
    "cache.verify",
    "backbone.family",  # a label for figures and reports
    "backbone.linear_input",  # which aggregator a leaderboard row picks; the aggregator counts
    "backbone.ep_tokens",
    "backbone.url",
    "backbone.sha256",
    "cache.shard_size",
    "cache.blocks",  # which other blocks' caches the same extraction fills
    "cache.also_for",  # what else the cache stores, for another job
    "cache.part",  # which shards an extraction job writes
    "knn.batch_size",
    "dataset.download",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
)

# Keys that enter a run's identity only where they differ from their default, which they
# were added with: the runs named before them keep their names.
NAMED_WHEN_SET = {
    "backbone.dtype": DEFAULT_DTYPE,
    "probe.wds": None,
    "probe.test_each_epoch": False,  # adds a figure (best epoch on test), changes no other
    "dataset.decode": DEFAULT_DECODE,
    "backbone.summary_tokens": None,
}


def result_config(cfg: DictConfig) -> dict:
    """The resolved config values that define a run's results, as a plain nested dict: the
    groups its task ``reads`` (by inclusion, so a group added for another task never enters
    this one's identity and never renames its runs), less the keys inside them that change no
    number (``NOT_RESULTS`` and the task's ``IGNORED``)."""
    from mim_agg.tasks import TASKS  # the tasks import the builders, which import this module

    task = TASKS[cfg.task]
    kept = {}
    for key in task.reads(cfg):
        if key not in cfg:
            continue
        value = cfg[key]
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        kept[key] = value
    defaults = [key for key, default in NAMED_WHEN_SET.items() if _get(kept, key) == default]
    return _drop(kept, [*NOT_RESULTS, *task.IGNORED, *defaults])


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _drop(config: dict, dotted_keys: list[str]) -> dict:
    for dotted in dotted_keys:
        node = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def config_hash(config: dict, digits: int = 10) -> str:
    """The first ``digits`` hex digits of the SHA-256 of the canonical JSON of ``config``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def differing_keys(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (present in either)."""
    keys = []
    for key in sorted(set(stored) | set(current), key=str):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(differing_keys(a, b, f"{name}."))
        elif a != b:
            keys.append(name)
    return keys


def run_name(cfg: DictConfig, choices: dict) -> str:
    """``probe-mae_vitb-abmilp-digits-<hash>``: readable, and unique per result config. The
    aggregator is the one the run trains, also where a preset names it by interpolation
    (``experiment=ep_row``: ``backbone.linear_input``), not the group's default."""
    parts = [cfg.task, choices.get("backbone")]
    if cfg.task in ("probe", "knn", "logreg"):
        parts.append(OmegaConf.select(cfg, "aggregator.name", default=choices.get("aggregator")))
        if choices.get("heads") not in (None, "none"):
            parts.append(f"heads_{choices['heads']}")
    parts += [choices.get("dataset"), low_shot_part(cfg), config_hash(result_config(cfg))]
    return "-".join(str(p) for p in parts if p)


def low_shot_part(cfg: DictConfig) -> str | None:
    """``5shot`` or ``frac0.1`` for a low-shot subset: runs on 5 images per class and on the
    whole set sit side by side in outputs/runs and must not look alike."""
    dataset = cfg.get("dataset") or {}
    if dataset.get("shots"):
        return f"{dataset.shots}shot"
    if dataset.get("fraction"):
        return f"frac{dataset.fraction:g}"
    return None
