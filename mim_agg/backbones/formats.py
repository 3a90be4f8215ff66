"""The checkpoint formats of the field, each turned into a timm state dict.

A format is recognised from the checkpoint's own keys; its converter keeps the evaluation
encoder and renames its keys to timm's. Unknown layouts fall back to the generic unwrapping
(``{"model": ...}``, ``module.`` / ``encoder.`` / ``backbone.`` prefixes). What a converter
cannot place it keeps under the checkpoint's own name, so ``load_checkpoint_into`` reports it,
naming the recognised format.

BEiT v2, SimMIM and data2vec are BEiT-code ViTs (unilm's ``modeling_finetune.py``): a shared
relative-position table, bias on q and v but not k, layer scale, no absolute positions. timm's
``Beit`` holds exactly that with ``use_shared_rel_pos_bias=True, use_rel_pos_bias=False`` (one
table, ``rel_pos_bias.*``, added in every block as the authors do) and ``global_pool="token"``
(their final LayerNorm is ``norm``, not a pooled ``fc_norm``); see ``conf/backbone/``.
"""

from __future__ import annotations

import re
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


def _is_ijepa(checkpoint: dict) -> bool:
    encoders = (_nested(checkpoint, "encoder"), _nested(checkpoint, "target_encoder"))
    return all(any(k.startswith("module.") for k in encoder) for encoder in encoders)


def _ijepa(checkpoint: dict) -> State:
    """I-JEPA: the EMA ``target_encoder``, which the authors evaluate ("We use the
    target-encoder for evaluation", Appendix A.1), not the context ``encoder`` that timm's own
    conversion of these files keeps; DDP's ``module.`` removed, the predictor dropped."""
    return _prefixed(checkpoint["target_encoder"], "module.")


def _is_ibot(checkpoint: dict) -> bool:
    teacher = _nested(checkpoint, "teacher")
    return any(k.startswith("backbone.") for k in teacher)


def _ibot(checkpoint: dict) -> State:
    """iBOT / DINO full checkpoints: the teacher's ``backbone.*`` (the student,
    ``module.backbone.*``, is not what the authors evaluate); the projection heads dropped."""
    return _prefixed(checkpoint["teacher"], "backbone.")


def _is_index(key: str) -> bool:
    """BEiT code saves its ``relative_position_index`` buffers; timm regenerates them."""
    return key.endswith("relative_position_index")


def _beit_model(checkpoint: dict) -> dict:
    """unilm's BEiT code saves ``{"model": ...}``, under DeepSpeed ``{"module": ...}``."""
    return _nested(checkpoint, "model") or _nested(checkpoint, "module")


def _is_beitv2(checkpoint: dict) -> bool:
    """BEiT v2's [cls] pretraining blocks ``cls_pt_layers.*``, which no other code base has."""
    return any(str(k).startswith("cls_pt_layers.") for k in _beit_model(checkpoint))


def _beitv2(checkpoint: dict) -> State:
    """BEiT v2 pretraining (unilm ``beit2/modeling_pretrain.py``,
    ``VisionTransformerForMaskedImageModelingCLS``): the encoder already has timm's names.
    Dropped: the mask token, the visual-token head ``lm_head`` and the [cls] pretraining path
    (``cls_pt_layers``: two blocks fed the last [cls] and an early block's patches; and
    ``cls_pt_norm`` / ``cls_pt_lm_head`` when unshared), which the encoder never runs."""
    return {
        k: v
        for k, v in _beit_model(checkpoint).items()
        if not (k == "mask_token" or k.startswith(("lm_head.", "cls_pt_")) or _is_index(k))
    }


def _is_simmim(checkpoint: dict) -> bool:
    """SimMIM's BEiT-code ViT under ``SimMIM.encoder``: ``encoder.blocks.N.attn.q_bias`` in
    ``{"model": ...}`` (a timm ViT there would have ``qkv.bias``)."""
    return any(
        str(k).startswith("encoder.") and str(k).endswith(".attn.q_bias")
        for k in _nested(checkpoint, "model")
    )


def _simmim(checkpoint: dict) -> State:
    """SimMIM ViT (microsoft/SimMIM ``models/simmim.py``, ``VisionTransformerForSimMIM``):
    ``encoder.`` stripped; dropped: the pixel decoder (``decoder.*``, a 1x1 conv and pixel
    shuffle) and the mask token. The checkpoint's ``config`` (a yacs node), optimizer and
    scheduler states sit beside ``model`` and are not read."""
    return {
        k.removeprefix("encoder."): v
        for k, v in checkpoint["model"].items()
        if not (k.startswith("decoder.") or k == "encoder.mask_token" or _is_index(k))
    }


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


def _is_data2vec(checkpoint: dict) -> bool:
    """HF's layer scale ``encoder.layer.N.lambda_1``: BEiT-family only (HF ViT has none)."""
    return any(isinstance(k, str) and _D2V_MARKER.fullmatch(k) for k in checkpoint)


def _data2vec(checkpoint: dict) -> State:
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
            or _is_index(inner)
        ):
            state[key] = value
    for index, parts in qkv.items():
        if len(parts) == len(_D2V_QKV):
            state[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[p][1] for p in _D2V_QKV])
        else:
            state.update(parts.values())
    return state


FORMATS = (
    Format("mocov3", _is_mocov3, _mocov3),
    Format("ibot", _is_ibot, _ibot),
    Format("ijepa", _is_ijepa, _ijepa),
    Format("capi", is_capi, convert_capi),
    Format("beitv2", _is_beitv2, _beitv2),
    Format("simmim", _is_simmim, _simmim),
    Format("data2vec", _is_data2vec, _data2vec),
)


def recognise(checkpoint) -> Format | None:
    return next((f for f in FORMATS if isinstance(checkpoint, dict) and f.detect(checkpoint)), None)
