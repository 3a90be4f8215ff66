"""Franca (valeoai/Franca): the DINOv2 codebase's training checkpoints, as Franca publishes them.

``{"teacher": {"backbone.<key>": ..., "dino_head.<key>": ..., "ibot_head.<key>": ...}}``, the
teacher being what the authors evaluate (their hub loader reads ``teacher``, strips ``module.``
and ``backbone.``, drops the heads). The blocks are stored as FSDP chunks,
``blocks.<chunk>.<block>.``, the block index counted over all chunks, so each key drops its
chunk index; the fused SwiGLU's ``w12`` and ``w3`` are timm's ``fc1`` and ``fc2``
(``mim_agg/backbones/franca.py``). The chunks tell these files from iBOT's and DINO's, whose
teacher backbones hold plain ``blocks.<block>.``.
"""

from __future__ import annotations

import re

from mim_agg.backbones.formats import State, checkpoint_format, nested

_CHUNKED_BLOCK = re.compile(r"(?:module\.)?backbone\.blocks\.\d+\.(\d+)\.(.+)")
_SWIGLU = {"mlp.w12.": "mlp.fc1.", "mlp.w3.": "mlp.fc2."}


def is_chunked(teacher: dict) -> bool:
    """A teacher backbone stored in FSDP chunks (``backbone.blocks.<chunk>.<block>.``)."""
    return any(isinstance(key, str) and _CHUNKED_BLOCK.fullmatch(key) for key in teacher)


def is_franca(checkpoint: dict) -> bool:
    return is_chunked(nested(checkpoint, "teacher"))


@checkpoint_format("franca", is_franca)
def convert_franca(checkpoint: dict) -> State:
    """The teacher's backbone under timm's names; its DINO and iBOT heads dropped. A key it
    cannot place keeps its name, so the strict load names it."""
    state = {}
    for key, value in checkpoint["teacher"].items():
        name = key.removeprefix("module.")
        if not name.startswith("backbone."):
            continue  # dino_head, ibot_head: the training objective's projection heads
        block = _CHUNKED_BLOCK.fullmatch(key)
        name = f"blocks.{block[1]}.{block[2]}" if block else name.removeprefix("backbone.")
        for authors, timm_name in _SWIGLU.items():
            name = name.replace(authors, timm_name)
        state[name] = value
    return state
