"""I-JEPA (facebookresearch/ijepa): the full training checkpoint."""

from __future__ import annotations

from mim_agg.backbones.formats import State, checkpoint_format, nested, prefixed


def is_ijepa(checkpoint: dict) -> bool:
    encoders = (nested(checkpoint, "encoder"), nested(checkpoint, "target_encoder"))
    return all(any(k.startswith("module.") for k in encoder) for encoder in encoders)


@checkpoint_format("ijepa", is_ijepa)
def ijepa(checkpoint: dict) -> State:
    """The EMA ``target_encoder``, which the authors evaluate ("We use the target-encoder for
    evaluation", Appendix A.1), not the context ``encoder`` that timm's own conversion of these
    files keeps; DDP's ``module.`` removed, the predictor dropped."""
    return prefixed(checkpoint["target_encoder"], "module.")
