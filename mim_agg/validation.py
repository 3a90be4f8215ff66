"""Valid ranges of the numeric options, checked before anything is loaded or trained.

Hydra's schemas check types and key names at composition; these rules check values, and each
message names the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from mim_agg.data.decode import DECODERS
from mim_agg.errors import ConfigError

# efficient-probing's leaderboard families (MIM, JEA, Hybrid = MIM + JEA, VLM, GEN), and none:
# random weights. Figures and reports group by them.
FAMILIES = ("mim", "jea", "hybrid", "vlm", "generative", "none")
LINEAR_INPUTS = ("cls", "mean", "summary")  # backbone.linear_input: aggregators of those names
EP_TOKENS = ("patch", "all")  # backbone.ep_tokens: the `tokens` option of the learned poolers
REPRESENTATION_KEYS = ("linear_input", "ep_tokens")  # config for the runs, not for the model

RULES = {
    # key: (test(value, cfg), what is valid)
    "seed": (lambda v, c: type(v) is int, "an integer"),  # the root has no schema to say so
    "probe.epochs": (lambda v, c: v >= 1, "an integer >= 1"),
    "probe.warmup_epochs": (
        lambda v, c: 0 <= v <= c.probe.epochs,
        "in [0, probe.epochs={cfg.probe.epochs}] (for a short run add probe.warmup_epochs=0)",
    ),
    "probe.batch_size": (lambda v, c: v >= 1, "an integer >= 1"),
    "probe.blr": (lambda v, c: positive(v), "finite and > 0"),
    "probe.blrs": (
        lambda v, c: v is None or (len(v) > 0 and all(positive(x) for x in v)),
        "null or a non-empty list of finite rates > 0",
    ),
    "probe.weight_decay": (lambda v, c: non_negative(v), "finite and >= 0"),
    "probe.wds": (
        lambda v, c: v is None or (len(v) > 0 and all(non_negative(x) for x in v)),
        "null or a non-empty list of finite weight decays >= 0",
    ),
    "probe.momentum": (lambda v, c: 0 <= v < 1, "in [0, 1)"),
    "probe.effective_batch": (
        lambda v, c: v is None or (v >= c.probe.batch_size and v % c.probe.batch_size == 0),
        "null or probe.batch_size={cfg.probe.batch_size} x devices x accumulated steps, "
        "a multiple of {cfg.probe.batch_size}",
    ),
    "probe.checkpoint_every_n_steps": (lambda v, c: v >= 0, ">= 0 (0: every epoch only)"),
    "trainer.accelerator": (
        lambda v, c: v not in ("gpu", "cuda") or torch.cuda.is_available(),
        "auto or cpu on a machine without a CUDA GPU (trainer=ddp_sim runs the DDP code on two "
        "CPU processes)",
    ),
    "dataset.heldout_fraction": (lambda v, c: 0 <= v < 1, "in [0, 1)"),
    "dataset.num_workers": (lambda v, c: v >= 0, ">= 0"),
    "dataset.train_size": (lambda v, c: v is None or v >= 1, "null or >= 1"),
    "dataset.test_size": (lambda v, c: v is None or v >= 1, "null or >= 1"),
    "dataset.shots": (lambda v, c: v is None or v >= 1, "null or >= 1"),
    "dataset.fraction": (lambda v, c: v is None or 0 < v <= 1, "null or in (0, 1]"),
    "dataset.decode": (
        lambda v, c: v in DECODERS,
        "pil (Pillow, the reference), turbo (libjpeg-turbo, the same pixels), turbo_dct "
        "(libjpeg-turbo downscaling in the IDCT for the eval resize: other pixels) or gpu "
        "(decoded and resized in batches on the backbone's device: other pixels; README, "
        "'Data path')",
    ),
    "backbone.img_size": (lambda v, c: v >= 1, ">= 1"),
    "backbone.mean": (
        lambda v, c: v is None or (len(v) == 3 and all(math.isfinite(x) for x in v)),
        "null or three finite numbers",
    ),
    "backbone.std": (
        lambda v, c: v is None or (len(v) == 3 and all(0 < x < math.inf for x in v)),
        "null or three finite numbers > 0",
    ),
    "backbone.family": (lambda v, c: v in FAMILIES, "one of " + ", ".join(FAMILIES)),
    "backbone.linear_input": (
        lambda v, c: v in LINEAR_INPUTS,
        "cls, mean (the patch mean) or summary (backbone.summary_tokens concatenated), the "
        "representation the leaderboard's LP and k-NN read",
    ),
    "backbone.ep_tokens": (
        lambda v, c: v in EP_TOKENS,
        "patch or all ([cls] beside the patches), the tokens the leaderboard's EP reads",
    ),
    "probe.features": (lambda v, c: v in ("online", "cached"), "online or cached"),
    "cache.dtype": (
        lambda v, c: v in ("bfloat16", "float16", "float32", "int8"),
        "bfloat16, float16, float32 or int8",
    ),
    "cache.views": (lambda v, c: v >= 1, ">= 1"),
    "cache.shard_size": (lambda v, c: v >= 1, ">= 1"),
    "cache.batch_size": (lambda v, c: v >= 1, ">= 1"),
    "cache.verify": (lambda v, c: isinstance(v, bool) or v == "full", "true, false or full"),
    "cache.part": (
        lambda v, c: v is None or (c.task == "extract" and is_part(v)),
        "null, or i/N with 0 <= i < N (this job extracts part i of N, as a SLURM array task: "
        "cache.part=$SLURM_ARRAY_TASK_ID/N), with task=extract",
    ),
    "knn.k": (lambda v, c: len(v) > 0 and all(k >= 1 for k in v), "a non-empty list of k >= 1"),
    "knn.temperatures": (
        lambda v, c: len(v) > 0 and all(positive(t) for t in v),
        "a non-empty list of finite T > 0",
    ),
    "knn.batch_size": (lambda v, c: v >= 1, ">= 1"),
    "logreg.c_min": (lambda v, c: positive(v), "finite and > 0"),
    "logreg.c_max": (
        lambda v, c: positive(v) and v >= c.logreg.c_min,
        "finite and >= logreg.c_min={cfg.logreg.c_min}",
    ),
    "logreg.c_steps": (lambda v, c: v >= 1, ">= 1"),
    "logreg.max_iter": (lambda v, c: v >= 1, ">= 1"),
    "logreg.tol": (lambda v, c: non_negative(v), "finite and >= 0"),
    "logreg.dtype": (lambda v, c: v in ("float64", "float32"), "float64 or float32"),
    "logreg.batch_size": (lambda v, c: v >= 1, ">= 1"),
    "analysis.num_images": (lambda v, c: v >= 1, ">= 1"),
    "analysis.batch_size": (lambda v, c: v >= 1, ">= 1"),
    "analysis.map_images": (lambda v, c: v >= 0, ">= 0"),
    "evaluate.batch_size": (lambda v, c: v >= 1, ">= 1"),
}


def positive(value: float) -> bool:
    """Finite and > 0 (NaN fails every comparison, so it is refused too)."""
    return 0 < value < math.inf


def non_negative(value: float) -> bool:
    return 0 <= value < math.inf


def is_part(value) -> bool:
    match = re.fullmatch(r"(\d+)/(\d+)", str(value))
    return match is not None and int(match[1]) < int(match[2])


def cache_part(value: str | None) -> tuple[int, int]:
    """``cache.part`` (valid: checked by its rule) as ``(i, N)``; null, the whole cache: (0, 1)."""
    if value is None:
        return 0, 1
    part, parts = str(value).split("/")
    return int(part), int(parts)


def check_ranges(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first option outside its range."""
    for key, (valid, description) in RULES.items():
        group, _, name = key.rpartition(".")  # no group: a key at the top
        parent = cfg.get(group) if group else cfg
        if parent is None or name not in parent:
            continue
        value = parent[name]
        if not valid(value, cfg):
            valid_range = description.format(cfg=cfg)
            raise ConfigError(f"{key}={value} is invalid: it must be {valid_range}.")


def check_required(cfg: DictConfig, groups: tuple[str, ...]) -> None:
    """Refuse a mandatory key left without a value (``???``: ``dataset.root`` of
    ``dataset=image_folder``) in the groups the task reads, by name, before anything runs;
    otherwise OmegaConf raises its traceback wherever the key is first read."""
    for group in groups:
        missing = missing_keys(cfg, group)
        if missing:
            raise ConfigError(
                f"{missing[0]} has no value, and task={cfg.task} needs it: set it on the command "
                f"line ({missing[0]}=...) or in its config file."
            )


def check_declared(cfg: DictConfig) -> None:
    """Refuse a key that ``+`` added on the command line to a group with a schema
    (``+probe.blrs_=[0.1]``): Hydra adds it where asked, nothing reads it, and the run would
    go on as if the option had been set. Free-form groups (``trainer``, ``callbacks``,
    ``backbone.arch_kwargs``) take any key."""
    for key, declared in undeclared_keys(cfg, ""):
        group, _, name = key.rpartition(".")
        nearest = difflib.get_close_matches(name, declared, n=1)
        guess = f"Did you mean {group}.{nearest[0]}? " if nearest else ""
        raise ConfigError(
            f"{key} is no option of {group}: a '+' on the command line added it, and nothing "
            f"reads it. {guess}The options of {group}: {', '.join(sorted(declared))}."
        )


def undeclared_keys(node: DictConfig, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """``(dotted key, the declared keys beside it)`` of every key under ``node`` that its
    schema (a dataclass) does not declare."""
    schema = OmegaConf.get_type(node)
    declared = (
        [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    )
    for key in node:
        if declared is not None and key not in declared:
            yield f"{prefix}{key}", declared
        elif is_set_dict(node, key):
            yield from undeclared_keys(node[key], f"{prefix}{key}.")


def is_set_dict(node: DictConfig, key: str) -> bool:
    """``node[key]`` holds a dict of its own (not ``???``, not an interpolation to follow)."""
    if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
        return False
    return OmegaConf.is_dict(node[key])


def missing_keys(node: DictConfig, key: str) -> list[str]:
    """The dotted keys under ``node[key]`` left ``???`` (interpolations are not followed)."""
    if OmegaConf.is_missing(node, key):
        return [key]
    if not is_set_dict(node, key):
        return []
    child = node[key]
    return [f"{key}.{inner}" for name in child for inner in missing_keys(child, name)]


def backbone_arguments(backbone) -> dict:
    """``FrozenBackbone``'s arguments from ``cfg.backbone``: its keys less the representation
    rules (``REPRESENTATION_KEYS``), which the runs read and the model never needs. Plain
    containers: timm takes lists (ConvNeXt's ``dims``), never a ``ListConfig``."""
    if isinstance(backbone, DictConfig):
        backbone = OmegaConf.to_container(backbone, resolve=True)
    return {k: v for k, v in backbone.items() if k not in REPRESENTATION_KEYS}


def check_representation(backbone, has_cls: bool, arch: str | None = None) -> None:
    """Refuse ``backbone.linear_input=cls`` (or ``summary``) or ``backbone.ep_tokens=all`` for a
    backbone without a ``[cls]`` token (I-JEPA, CAPI, SigLIP), before anything is loaded."""
    if has_cls:
        return
    arch = arch or backbone.get("arch")
    fixes = {"linear_input": (("cls", "summary"), "mean"), "ep_tokens": (("all",), "patch")}
    for key, (need_cls, instead) in fixes.items():
        if (value := backbone.get(key, instead)) in need_cls:
            raise ConfigError(
                f"backbone.{key}={value} reads the [cls] token, but {arch} has none; use "
                f"backbone.{key}={instead} (set it in its conf/backbone/ file)."
            )
