"""The checkpoint formats of the field, each turned into a timm state dict.

A format is recognised from the checkpoint's own keys; its converter keeps the evaluation
encoder and renames its keys to timm's. Unknown layouts fall back to the generic unwrapping
(``{"model": ...}``, ``module.`` / ``encoder.`` / ``backbone.`` prefixes). What a converter
cannot place is reported by ``load_checkpoint_into``, which names the recognised format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mim_agg.backbones.capi import convert_capi, is_capi

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict], State]


def _prefixed(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _nested(checkpoint: dict, key: str) -> dict:
    value = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    return value if isinstance(value, dict) else {}


def _is_mocov3(checkpoint: dict) -> bool:
    return any(k.startswith("module.base_encoder.") for k in _nested(checkpoint, "state_dict"))


def _mocov3(checkpoint: dict) -> State:
    """MoCo v3: the evaluation encoder is ``module.base_encoder`` (not the momentum one); its
    ``head`` is a BatchNorm MLP projector, dropped."""
    encoder = _prefixed(checkpoint["state_dict"], "module.base_encoder.")
    return {k: v for k, v in encoder.items() if not k.startswith("head.")}


def _is_ibot(checkpoint: dict) -> bool:
    teacher = _nested(checkpoint, "teacher")
    return any(k.startswith("backbone.") for k in teacher)


def _ibot(checkpoint: dict) -> State:
    """iBOT / DINO full checkpoints: the teacher's ``backbone.*`` (the student,
    ``module.backbone.*``, is not what the authors evaluate); the projection heads dropped."""
    return _prefixed(checkpoint["teacher"], "backbone.")


FORMATS = (
    Format("mocov3", _is_mocov3, _mocov3),
    Format("ibot", _is_ibot, _ibot),
    Format("capi", is_capi, convert_capi),
)


def recognise(checkpoint) -> Format | None:
    return next((f for f in FORMATS if isinstance(checkpoint, dict) and f.detect(checkpoint)), None)
