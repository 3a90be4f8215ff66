"""iBOT and DINO (bytedance/ibot, facebookresearch/dino): full training checkpoints."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format, nested, prefixed
from mim_agg.backbones.formats.franca import is_chunked


def is_ibot(checkpoint: dict) -> bool:
    """A teacher backbone whose blocks are not FSDP chunks (those are Franca's files)."""
    teacher = nested(checkpoint, "teacher")
    return any(k.startswith("backbone.") for k in teacher) and not is_chunked(teacher)


@checkpoint_format("ibot", is_ibot)
def ibot(checkpoint: dict) -> State:
    """The teacher's ``backbone.*`` (the student, ``module.backbone.*``, is not what the authors
    evaluate); the projection heads dropped."""
    return prefixed(checkpoint["teacher"], "backbone.")
