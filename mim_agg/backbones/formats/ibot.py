"""iBOT and DINO (bytedance/ibot, facebookresearch/dino): full training checkpoints."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format, nested, prefixed


def is_ibot(checkpoint: dict) -> bool:
    return any(k.startswith("backbone.") for k in nested(checkpoint, "teacher"))


@checkpoint_format("ibot", is_ibot)
def ibot(checkpoint: dict) -> State:
    """The teacher's ``backbone.*`` (the student, ``module.backbone.*``, is not what the authors
    evaluate); the projection heads dropped."""
    return prefixed(checkpoint["teacher"], "backbone.")
