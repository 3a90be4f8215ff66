"""Checkpoint files of the field -> a state dict that fits a timm model, with clear errors.

MAE saves ``{"model": state_dict}``, DINO/iBOT ``{"teacher": ...}`` or plain dicts, SimMIM
prefixes its keys with ``encoder.``, DDP with ``module.``; pretraining checkpoints carry decoder
and mask-token weights a frozen encoder never uses.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mim_agg.backbones.formats import recognise
from mim_agg.errors import MissingFile

WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")
KEY_PREFIXES = ("module.", "encoder.", "backbone.", "model.")
UNUSED_KEY_STARTS = ("decoder", "mask_token", "masked_embed", "head.", "fc_norm.", "lm_head")


# Objects the field's checkpoints pickle beside their weights, allowed by name: iBOT / BEiT v2
# store their argparse arguments, SimMIM its yacs config. A yacs ``CfgNode`` is a dict subclass,
# pickled as its class, its items and its attributes; it is read as an ``OrderedDict`` holding
# the same items and attributes (weights_only fills dict subclasses only of its own allowed
# types), so yacs is never imported and nothing becomes constructible that torch did not allow.
# Nothing else is ever imported while reading a checkpoint.
SAFE_GLOBALS = [argparse.Namespace, (OrderedDict, "yacs.config.CfgNode")]


def require_file(path: str | Path, backbone: str = "<name>") -> Path:
    """``path`` as a checkpoint file that exists; else an error saying how to get it
    (``backbone``: the config whose ``url`` ``scripts/download_weights.py`` fetches)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(
            f"backbone.weights={str(path)!r} is neither an existing checkpoint file nor a timm "
            "pretrained tag like 'vit_base_patch16_224.mae'; check the path, or fetch it: "
            f"python scripts/download_weights.py backbone={backbone}"
        )
    return path


def read_checkpoint(path: str | Path):
    """A ``.safetensors`` or torch checkpoint, read without running code (``weights_only``
    with an allow-list of the plain objects checkpoints of the field carry)."""
    path = require_file(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's encoder weights and the name of the format they were found in."""
    checkpoint = read_checkpoint(path)
    known = recognise(checkpoint)
    if known is not None:
        return known.convert(checkpoint), known.name
    return unwrap(checkpoint), "generic"


def unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """Generic layouts: ``{"model" | "state_dict" | "teacher" | "module": weights}`` or plain."""
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return checkpoint


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop pretraining-only weights."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in KEY_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(UNUSED_KEY_STARTS):
            cleaned[key] = value
    return cleaned


def load_checkpoint_into(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint file into ``model`` (strictly, apart from its classifier head).

    The architecture's own timm filter function runs first, so position embeddings are
    resampled to the model's image size and timm's format conversions apply.
    """
    state_dict, source_format = read_state_dict(path)
    state_dict = normalize_keys(state_dict)
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if timm_filter is not None:
        state_dict = timm_filter(state_dict, model)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(UNUSED_KEY_STARTS)}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            f"Checkpoint {str(path)!r} ({source_format} format) does not fit "
            f"backbone.arch={_arch(model)} ({_describe(model)}).\n"
            f"  missing keys: {_abbrev(missing)}\n"
            f"  unexpected keys: {_abbrev(unexpected)}\n"
            f"  misshaped keys: {_abbrev(misshaped)}\n"
            "Pick the backbone.arch (and backbone.arch_kwargs, e.g. num_heads) the checkpoint "
            "was trained with."
        )
    model.load_state_dict(state_dict, strict=False)


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def _describe(model: nn.Module) -> str:
    embed_dim = getattr(model, "embed_dim", "?")
    depth = len(getattr(model, "blocks", []))
    return f"embed_dim={embed_dim}, depth={depth}"


def _abbrev(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")
