"""DINOv3 (facebookresearch/dinov3): the published ``.pth`` files of its ViTs, for timm's ``Eva``
DINOv3 architectures (``vit_*_patch16_dinov3``, ``_qkvb`` where the attention holds q/v biases).

The file is the plain state dict of the authors' ``DinoVisionTransformer``
(``dinov3/models/vision_transformer.py``): ``[cls]``, then ``storage_tokens`` (their registers),
then the patches; LayerScale ``ls1`` / ``ls2``; the RoPE ``periods`` buffer; an ``Mlp``
(``fc1``, ``fc2``) or a ``SwiGLUFFN`` (``w1``, ``w2``, ``w3``); and, in the distilled models, a
qkv bias with a ``bias_mask`` buffer that zeroes its key third (``LinearKMaskedBias``): the
bias the authors compute with is ``bias * bias_mask``.
"""

from __future__ import annotations

import re

from mim_agg.backbones.formats import State, checkpoint_format
from mim_agg.errors import ConfigError

_MARKER = "rope_embed.periods"
_RENAMED = {
    "storage_tokens": "reg_token",
    "rope_embed.periods": "rope.periods",
}
_BLOCK_RENAMED = {
    "ls1.gamma": "gamma_1",
    "ls2.gamma": "gamma_2",
    "mlp.w1.weight": "mlp.fc1_g.weight",  # SwiGLU: silu(w1 x) * (w2 x), then w3
    "mlp.w1.bias": "mlp.fc1_g.bias",
    "mlp.w2.weight": "mlp.fc1_x.weight",
    "mlp.w2.bias": "mlp.fc1_x.bias",
    "mlp.w3.weight": "mlp.fc2.weight",
    "mlp.w3.bias": "mlp.fc2.bias",
}
# Pretraining-only: the mask token of the iBOT loss, the norm of local crops' [cls] ("never used
# during eval", their model code).
_DROPPED = ("mask_token", "local_cls_norm.")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def is_dinov3(checkpoint: dict) -> bool:
    """The RoPE periods buffer at top level beside ViT blocks: DINOv3's own naming
    (``rope_embed``), which no other format of the field uses."""
    return _MARKER in checkpoint and any(
        isinstance(key, str) and key.startswith("blocks.") for key in checkpoint
    )


@checkpoint_format("dinov3", is_dinov3, buffers=("rope.periods",))
def convert_dinov3(checkpoint: dict) -> State:
    """timm's names; the RoPE periods kept as the file stores them (rounded to bfloat16 in the
    published files, which the authors' model computes with; timm recomputes them in float32,
    so they are carried into its buffer). A key not placed here keeps its name, so the strict
    load names it (``cls_norm``, the untied [cls] norm no published file has, for one)."""
    state: State = {}
    for key, value in checkpoint.items():
        if key.startswith(_DROPPED) or key.endswith(".bias_mask"):
            continue
        block = _BLOCK.fullmatch(key)
        if block and block.group(2) == "attn.qkv.bias":
            state.update(split_qkv_bias(checkpoint, f"blocks.{block.group(1)}.attn."))
        elif block and block.group(2) in _BLOCK_RENAMED:
            state[f"blocks.{block.group(1)}.{_BLOCK_RENAMED[block.group(2)]}"] = value
        else:
            state[_RENAMED.get(key, key)] = value
    return state


def split_qkv_bias(checkpoint: dict, prefix: str) -> State:
    """``q_bias`` and ``v_bias`` of the bias the authors' attention adds, ``bias * bias_mask``
    (a file without the mask adds its bias whole). timm's attention keeps no key bias (a fixed
    zero), so a file whose masked key third is not zero is refused: loaded, it would change
    every attention row (RoPE turns the key bias differently at every position)."""
    bias = checkpoint[f"{prefix}qkv.bias"]
    mask = checkpoint.get(f"{prefix}qkv.bias_mask")
    effective = bias * mask.to(bias.dtype) if mask is not None else bias
    q_bias, k_bias, v_bias = effective.chunk(3)
    if bool((k_bias != 0).any()):
        raise ConfigError(
            f"{prefix}qkv.bias adds a non-zero key bias (its key third, after "
            f"{prefix}qkv.bias_mask), which DINOv3's published models mask to zero and timm's "
            "architecture cannot hold; this file is no published DINOv3 ViT: convert it with "
            "its own code, or pass a published file as backbone.weights."
        )
    return {f"{prefix}q_bias": q_bias, f"{prefix}v_bias": v_bias}
