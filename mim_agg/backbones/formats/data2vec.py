"""data2vec (v1) vision in Hugging Face transformers' names (``Data2VecVisionModel``)."""

from __future__ import annotations

import re

import torch

from mim_agg.backbones.formats import State, checkpoint_format
from mim_agg.backbones.formats.beit_code import is_index_buffer

# Hugging Face transformers' Data2VecVisionModel (modeling_data2vec_vision.py): the BEiT
# encoder under BERT-style names, optionally under ``data2vec_vision.`` (the classes with heads).
_D2V_MARKER = re.compile(r"(data2vec_vision\.)?encoder\.layer\.\d+\.lambda_1")
_D2V_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_D2V_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": (
        "rel_pos_bias.relative_position_bias_table"
    ),
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_D2V_BLOCK = {
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.attention.relative_position_bias.relative_position_bias_table": (
        "attn.relative_position_bias_table"
    ),
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
}
_D2V_QKV = tuple(f"attention.attention.{p}.weight" for p in ("query", "key", "value"))


def is_data2vec(checkpoint: dict) -> bool:
    """HF's layer scale ``encoder.layer.N.lambda_1``: BEiT-family only (HF ViT has none)."""
    return any(isinstance(k, str) and _D2V_MARKER.fullmatch(k) for k in checkpoint)


@checkpoint_format("data2vec", is_data2vec)
def data2vec(checkpoint: dict) -> State:
    """data2vec (v1) vision in HF's naming (``facebook/data2vec-vision-base``, converted by HF's
    ``convert_data2vec_vision_original_pytorch_checkpoint_to_pytorch.py`` from the authors' BEiT
    code): ``query`` / ``key`` (bias-free) / ``value`` are stacked into timm's ``qkv`` (the
    authors' own layout), their biases become ``q_bias`` / ``v_bias``. Dropped: the mask token,
    the pooler and classifier (heads) and index buffers. A layer whose q, k or v is missing keeps
    the others under their HF names, so the strict load names them."""
    state: State = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in checkpoint.items():
        inner = key.removeprefix("data2vec_vision.")
        layer = _D2V_LAYER.fullmatch(inner)
        if inner in _D2V_GLOBAL:
            state[_D2V_GLOBAL[inner]] = value
        elif layer and layer.group(2) in _D2V_BLOCK:
            state[f"blocks.{layer.group(1)}.{_D2V_BLOCK[layer.group(2)]}"] = value
        elif layer and layer.group(2) in _D2V_QKV:
            qkv.setdefault(layer.group(1), {})[layer.group(2)] = (key, value)
        elif not (
            inner == "embeddings.mask_token"
            or inner.startswith("pooler.")
            or key.startswith("classifier.")
            or is_index_buffer(inner)
        ):
            state[key] = value
    for index, parts in qkv.items():
        if len(parts) == len(_D2V_QKV):
            state[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[p][1] for p in _D2V_QKV])
        else:
            state.update(parts.values())
    return state
