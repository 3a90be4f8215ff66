"""Perception Encoder (facebookresearch/perception_models): the authors' PE-Core ``.pt`` files
(facebook/PE-Core-B16-224, -L14-336, -G14-448 on Hugging Face), for timm's ``Eva`` PE
architectures (``vit_pe_core_*``).

A published file is the state dict of the authors' ``CLIP`` (``core/vision_encoder/pe.py``):
the image tower under ``visual.``, the text tower and the logit scale beside it; their loader
also takes ``{"state_dict" | "weights": ...}`` and DDP's ``module.``, and the image tower alone
(``VisionTransformer.state_dict()``, no ``visual.``). Its ``Rope2D`` is no module, so no RoPE
table is stored: timm computes the same one. timm's own filter converts these files too, but
drops whatever it cannot place; here a key not placed keeps its name, so the strict load names
it.
"""

from __future__ import annotations

import re

from mim_agg.backbones.formats import State, checkpoint_format

_TOWER = "visual."
# The text tower of their CLIP (``TextTransformer``) and its logit scale: no image encoder reads
# them. Only under a file whose image tower is ``visual.``: alone, ``transformer.`` is the image's.
_TEXT_TOWER = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
    "logit_scale",
    "attn_pool.",
)
_RENAMED = {
    "conv1.weight": "patch_embed.proj.weight",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
    "attn_pool.probe": "attn_pool.latent",
}
_BLOCK_RENAMED = {
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "ls_1.gamma": "gamma_1",
    "ls_2.gamma": "gamma_2",
}
_POOL_RENAMED = {
    "attn_pool.attn.out_proj.": "attn_pool.proj.",
    "attn_pool.layernorm.": "attn_pool.norm.",
    "attn_pool.mlp.c_fc.": "attn_pool.mlp.fc1.",
    "attn_pool.mlp.c_proj.": "attn_pool.mlp.fc2.",
}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_POOL_QKV = re.compile(r"attn_pool\.attn\.in_proj_(weight|bias)")


def weights(checkpoint: dict) -> dict:
    """The state dict as the authors' ``load_ckpt`` reads it: out of a ``state_dict`` or
    ``weights`` entry, DDP's ``module.`` removed."""
    for wrapper in ("state_dict", "weights"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(k, str)}


def image_tower(state: dict) -> str | None:
    """``"visual."`` or ``""``: where the image tower's keys start, recognised by its attention
    pooling (PE-Core's ``probe``) beside the ``resblocks`` of a CLIP-style ViT; else None."""
    for prefix in (_TOWER, ""):
        if f"{prefix}attn_pool.probe" in state and any(
            k.startswith(f"{prefix}transformer.resblocks.") for k in state
        ):
            return prefix
    return None


def is_pe(checkpoint: dict) -> bool:
    return image_tower(weights(checkpoint)) is not None


@checkpoint_format("pe", is_pe)
def convert_pe(checkpoint: dict) -> State:
    """timm's names for the image tower; the text tower dropped. The output projection ``proj``
    (``[width, out]``, applied after the attention pooling) becomes timm's ``head.weight``,
    which a frozen encoder never reads; the pooling's fused q/k/v are split into timm's ``q`` and
    ``kv``."""
    state = weights(checkpoint)
    prefix = image_tower(state)
    converted: State = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix):
            if not key.startswith(_TEXT_TOWER):
                converted[key] = value  # neither tower's: named by the strict load
            continue
        converted.update(renamed(key.removeprefix(prefix), value))
    return converted


def renamed(key: str, value) -> State:
    """One image-tower entry under timm's names (two for the pooling's fused q/k/v)."""
    if key == "class_embedding":
        return {"cls_token": value.reshape(1, 1, -1)}
    if key == "positional_embedding":
        return {"pos_embed": value.unsqueeze(0)}
    if key == "proj":
        return {"head.weight": value.T}
    if pool := _POOL_QKV.fullmatch(key):
        query, key_value = value.split([len(value) // 3, 2 * len(value) // 3])
        return {f"attn_pool.q.{pool.group(1)}": query, f"attn_pool.kv.{pool.group(1)}": key_value}
    if block := _BLOCK.fullmatch(key):
        return {f"blocks.{block.group(1)}.{replaced(block.group(2), _BLOCK_RENAMED)}": value}
    return {replaced(_RENAMED.get(key, key), _POOL_RENAMED): value}


def replaced(name: str, names: dict[str, str]) -> str:
    """``name`` with its leading part renamed by ``names`` (the first that starts it)."""
    for old, new in names.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name
