"""DINOv3 (facebookresearch/dinov3): the published ``.pth`` files of its ViTs, for timm's ``Eva``
DINOv3 architectures (``vit_*_patch16_dinov3``, ``_qkvb`` where the attention holds q/v biases).

The file is the plain state dict of the authors' ``DinoVisionTransformer``
(``dinov3/models/vision_transformer.py``): ``[cls]``, then ``storage_tokens`` (their registers),
then the patches; LayerScale ``ls1`` / ``ls2``; the RoPE ``periods`` buffer; an ``Mlp``
(``fc1``, ``fc2``) or a ``SwiGLUFFN`` (``w1``, ``w2``, ``w3``); and, in the distilled models, a
qkv bias with a ``bias_mask`` buffer that zeroes its key third (``LinearKMaskedBias``): the
bias the authors compute with is ``bias * bias_mask``. Hugging Face's conversion of the same
weights (the facebook/dinov3-* repositories, in transformers' names) is read too.
"""

from __future__ import annotations

import re

import torch

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


def require_zero_key_bias(k_bias, name: str) -> None:
    """timm's DINOv3 attention keeps no key bias (a fixed zero), as the published models mask it;
    a file whose key bias is not zero is refused: loaded, it would change every attention row
    (RoPE turns a key bias differently at every position)."""
    if bool((k_bias != 0).any()):
        raise ConfigError(
            f"{name} adds a key bias that is not zero, which DINOv3's published models mask and "
            "timm's architecture cannot hold; this file is no published DINOv3 ViT: convert it "
            "with its own code, or pass a published file as backbone.weights."
        )


def split_qkv_bias(checkpoint: dict, prefix: str) -> State:
    """``q_bias`` and ``v_bias`` of the bias the authors' attention adds, ``bias * bias_mask``
    (a file without the mask adds its bias whole), whose key third must be zero."""
    bias = checkpoint[f"{prefix}qkv.bias"]
    mask = checkpoint.get(f"{prefix}qkv.bias_mask")
    effective = bias * mask.to(bias.dtype) if mask is not None else bias
    q_bias, k_bias, v_bias = effective.chunk(3)
    require_zero_key_bias(k_bias, f"{prefix}qkv.bias (its key third, after its bias_mask)")
    return {f"{prefix}q_bias": q_bias, f"{prefix}v_bias": v_bias}


# Hugging Face's conversion of the same weights (facebook/dinov3-*, transformers'
# DINOv3ViTModel: modeling_dinov3_vit.py): q, k, v apart, the key without a bias; the RoPE periods
# are not stored (transformers computes them in float32, as timm does).
_HF_RENAMED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
}
_HF_BLOCK_RENAMED = {
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "attention.q_proj.bias": "attn.q_bias",
    "attention.v_proj.bias": "attn.v_bias",
    "layer_scale1.lambda1": "gamma_1",
    "layer_scale2.lambda1": "gamma_2",
    "mlp.gate_proj.weight": "mlp.fc1_g.weight",  # gated: act(gate_proj x) * up_proj x
    "mlp.gate_proj.bias": "mlp.fc1_g.bias",
}
_HF_MARKER = re.compile(r"layer\.0\.layer_scale1\.lambda1")
_HF_LAYER = re.compile(r"layer\.(\d+)\.(.+)")


def is_dinov3_hf(checkpoint: dict) -> bool:
    """transformers' DINOv3 names: top-level ``layer.N`` with ``layer_scale1.lambda1`` beside
    ``embeddings.patch_embeddings`` (its DINOv2 nests its layers under ``encoder.``)."""
    keys = [key for key in checkpoint if isinstance(key, str)]
    return "embeddings.patch_embeddings.weight" in keys and any(map(_HF_MARKER.fullmatch, keys))


@checkpoint_format("dinov3_hf", is_dinov3_hf)
def convert_dinov3_hf(checkpoint: dict) -> State:
    """timm's names; q, k, v weights stacked as timm's ``qkv``; the up projection is ``fc1``
    (``fc1_x`` beside a gate). A key bias must be zero (see ``split_qkv_bias``); a key not
    placed keeps its name, so the strict load names it."""
    gated = any(key.endswith("mlp.gate_proj.weight") for key in checkpoint)
    state: State = {}
    for key, value in checkpoint.items():
        layer = _HF_LAYER.fullmatch(key)
        if key == "embeddings.mask_token":
            continue
        if not layer:
            state[_HF_RENAMED.get(key, key)] = value
            continue
        prefix, name = f"blocks.{layer.group(1)}.", layer.group(2)
        projections = [f"layer.{layer.group(1)}.attention.{p}_proj.weight" for p in "qkv"]
        if key in projections and all(p in checkpoint for p in projections):
            if key == projections[0]:
                state[f"{prefix}attn.qkv.weight"] = torch.cat([checkpoint[p] for p in projections])
        elif name == "attention.k_proj.bias":
            require_zero_key_bias(value, key)
        elif name in _HF_BLOCK_RENAMED:
            state[prefix + _HF_BLOCK_RENAMED[name]] = value
        elif name.startswith("mlp.up_proj."):
            state[f"{prefix}mlp.{'fc1_x' if gated else 'fc1'}.{name.rsplit('.', 1)[1]}"] = value
        elif name.startswith("mlp.down_proj."):
            state[f"{prefix}mlp.fc2.{name.rsplit('.', 1)[1]}"] = value
        else:
            state[prefix + name] = value  # norm1, norm2: timm's names already
    return state
