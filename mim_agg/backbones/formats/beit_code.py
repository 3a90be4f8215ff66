"""What the BEiT-code formats share (BEiT v2, SimMIM, data2vec: unilm's ``modeling_finetune.py``).

They are ViTs with a shared relative-position table, bias on q and v but not k, layer scale and
no absolute positions. timm's ``Beit`` holds exactly that with ``use_shared_rel_pos_bias=True,
use_rel_pos_bias=False`` (one table, ``rel_pos_bias.*``, added in every block as the authors do)
and ``global_pool="token"`` (their final LayerNorm is ``norm``, not a pooled ``fc_norm``); see
``conf/backbone/``.
"""

from __future__ import annotations

from mim_agg.backbones.formats import nested


def is_index_buffer(key: str) -> bool:
    """BEiT code saves its ``relative_position_index`` buffers; timm regenerates them."""
    return key.endswith("relative_position_index")


def beit_model(checkpoint: dict) -> dict:
    """unilm's BEiT code saves ``{"model": ...}``, under DeepSpeed ``{"module": ...}``."""
    return nested(checkpoint, "model") or nested(checkpoint, "module")
