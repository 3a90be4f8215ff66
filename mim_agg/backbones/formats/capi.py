"""CAPI (facebookresearch/capi): the authors' published weights, under the names of
``mim_agg/backbones/capi.py``'s encoder."""

from __future__ import annotations

import re

import torch

from mim_agg.backbones.formats import checkpoint_format

# The authors' file: their eval-time ``student_ema`` state dict, ``{"backbone.<EncoderDecoder
# key>": ..., "head.<prediction head key>": ...}``; their hub loader keeps ``backbone.*``. Without
# that prefix it is the state dict of their hub model, also accepted.
_GLOBAL_KEYS = {
    "registers": "reg_token",
    "patch_embed.weight": "patch_embed.proj.weight",
    "patch_embed.bias": "patch_embed.proj.bias",
}
_BLOCK_KEYS = {
    "residual1.norm.weight": "norm1.weight",
    "residual1.fn.q_proj.weight": "attn.q_proj.weight",
    "residual1.fn.k_proj.weight": "attn.k_proj.weight",
    "residual1.fn.v_proj.weight": "attn.v_proj.weight",
    "residual1.fn.proj.weight": "attn.proj.weight",
    "residual1.fn.rope.freqs": "attn.rope.freqs",
    "residual2.norm.weight": "norm2.weight",
    "residual2.fn.fc1.weight": "mlp.fc1.weight",
    "residual2.fn.fc2.weight": "mlp.fc2.weight",
}
_ENCODER_BLOCK = re.compile(r"encoder\.blocks\.(\d+)\.(.+)")
_MARKER = re.compile(r"(backbone\.)?encoder\.blocks\.\d+\.residual1\.fn\.q_proj\.weight")


def is_capi(checkpoint: dict) -> bool:
    """The authors' encoder blocks: ``encoder.blocks.N.residual1.fn.q_proj.weight``, optionally
    under ``backbone.``, a naming no other format of the field uses."""
    return any(isinstance(key, str) and _MARKER.fullmatch(key) for key in checkpoint)


@checkpoint_format("capi", is_capi)
def convert_capi(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The encoder's weights under this module's names; the decoder, its mask token and the
    prediction head (``head.*``, beside ``backbone.*``) are dropped. Any other key, and any
    encoder weight absent, raise: a checkpoint is never loaded half."""
    prefix = "backbone." if any(str(key).startswith("backbone.") for key in checkpoint) else ""
    state: dict[str, torch.Tensor] = {}
    unknown, depth = [], 0
    for key, value in checkpoint.items():
        name = str(key)
        inner = name[len(prefix) :] if name.startswith(prefix) else ""
        block = _ENCODER_BLOCK.fullmatch(inner)
        if inner in _GLOBAL_KEYS:
            state[_GLOBAL_KEYS[inner]] = value
        elif block and block.group(2) in _BLOCK_KEYS:
            state[f"blocks.{block.group(1)}.{_BLOCK_KEYS[block.group(2)]}"] = value
            depth = max(depth, int(block.group(1)) + 1)
        elif not (
            inner == "mask_token"
            or inner.startswith("decoder.")
            or (prefix and name.startswith("head."))
        ):
            unknown.append(name)
    missing = [prefix + theirs for theirs, ours in _GLOBAL_KEYS.items() if ours not in state]
    missing += [
        f"{prefix}encoder.blocks.{i}.{theirs}"
        for i in range(depth)
        for theirs, ours in _BLOCK_KEYS.items()
        if f"blocks.{i}.{ours}" not in state
    ]
    if unknown or missing:
        raise ValueError(
            "The checkpoint does not fit the capi format (CAPI's published weights):\n"
            f"  unknown keys: {', '.join(sorted(unknown)) or 'none'}\n"
            f"  missing keys: {', '.join(missing) or 'none'}"
        )
    return state
