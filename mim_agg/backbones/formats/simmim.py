"""SimMIM (microsoft/SimMIM): the pretraining checkpoint of its BEiT-code ViT."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format, nested
from mim_agg.backbones.formats.beit_code import is_index_buffer


def is_simmim(checkpoint: dict) -> bool:
    """The ViT under ``SimMIM.encoder``: ``encoder.blocks.N.attn.q_bias`` in ``{"model": ...}``
    (a timm ViT there would have ``qkv.bias``)."""
    return any(
        str(k).startswith("encoder.") and str(k).endswith(".attn.q_bias")
        for k in nested(checkpoint, "model")
    )


@checkpoint_format("simmim", is_simmim)
def simmim(checkpoint: dict) -> State:
    """``models/simmim.py``'s ``VisionTransformerForSimMIM``: ``encoder.`` stripped; dropped: the
    pixel decoder (``decoder.*``, a 1x1 conv and pixel shuffle) and the mask token. The
    checkpoint's ``config`` (a yacs node), optimizer and scheduler states sit beside ``model``
    and are not read."""
    return {
        k.removeprefix("encoder."): v
        for k, v in checkpoint["model"].items()
        if not (k.startswith("decoder.") or k == "encoder.mask_token" or is_index_buffer(k))
    }
