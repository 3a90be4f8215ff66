"""Per-step learning-rate factor: linear warm-up, then half-cosine to zero (MAE's schedule)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0 at start, 1 after warm-up)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
