"""BEiT v2 (microsoft/unilm ``beit2``): the pretraining checkpoint."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format
from mim_agg.backbones.formats.beit_code import beit_model, is_index_buffer


def is_beitv2(checkpoint: dict) -> bool:
    """BEiT v2's [cls] pretraining blocks ``cls_pt_layers.*``, which no other code base has."""
    return any(str(k).startswith("cls_pt_layers.") for k in beit_model(checkpoint))


@checkpoint_format("beitv2", is_beitv2)
def beitv2(checkpoint: dict) -> State:
    """``modeling_pretrain.py``'s ``VisionTransformerForMaskedImageModelingCLS``: the encoder
    already has timm's names. Dropped: the mask token, the visual-token head ``lm_head`` and the
    [cls] pretraining path (``cls_pt_layers``: two blocks fed the last [cls] and an early block's
    patches; and ``cls_pt_norm`` / ``cls_pt_lm_head`` when unshared), which the encoder never
    runs."""
    return {
        k: v
        for k, v in beit_model(checkpoint).items()
        if not (k == "mask_token" or k.startswith(("lm_head.", "cls_pt_")) or is_index_buffer(k))
    }
