"""MoCo v3 (facebookresearch/moco-v3): the full training checkpoint."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format, nested, prefixed


def is_mocov3(checkpoint: dict) -> bool:
    return any(k.startswith("module.base_encoder.") for k in nested(checkpoint, "state_dict"))


@checkpoint_format("mocov3", is_mocov3)
def mocov3(checkpoint: dict) -> State:
    """The evaluation encoder is ``module.base_encoder`` (not the momentum one); its ``head`` is
    a BatchNorm MLP projector, dropped."""
    encoder = prefixed(checkpoint["state_dict"], "module.base_encoder.")
    return {k: v for k, v in encoder.items() if not k.startswith("head.")}
