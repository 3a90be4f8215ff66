"""Per-step learning-rate factor: linear warm-up, then half-cosine to zero (MAE's schedule)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0 at start, 1 after warm-up)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scaled_lr(blr: float, images_per_step: int) -> float:
    """The linear scaling rule (Goyal et al. 2017; MAE's ``lr = blr x batch / 256``).

    ``images_per_step`` is what one optimizer step averages its gradient over: the configured
    batch x devices x accumulated steps, or fewer when an epoch holds fewer training images
    (a low-shot subset under a large ``probe.batch_size``). Scaling by the nominal batch there
    would multiply the rate by nominal / actual (10000 / 150, say) with nothing to justify it;
    refusing the batch instead would make a low-shot sweep set a batch size per shot count.
    """
    return blr * images_per_step / 256
