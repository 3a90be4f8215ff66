"""Watch every block of a frozen ViT: its softmax attention, residual input and attention update."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from mim_agg.backbones.frozen import watch_attention
from mim_agg.errors import ConfigError


class BlockRecord:
    """What one block saw and did in the last forward pass."""

    def __init__(self) -> None:
        self.attn: torch.Tensor | None = None  # [B, H, T, T]
        self.input: torch.Tensor | None = None  # x, [B, T, D]
        self.update: torch.Tensor | None = None  # y, the attention branch output added to x


@contextmanager
def trace_blocks(blocks: nn.ModuleList):
    """Record every block while inside; timm's fused attention is switched off only meanwhile.

    Needs timm's pre-norm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``; in eval mode the
    ``ls1`` output is the update ``y``.
    """
    records = [BlockRecord() for _ in blocks]
    handles, fused = [], []
    for block, record in zip(blocks, records, strict=True):
        if not all(hasattr(block, name) for name in ("attn", "ls1", "norm1")):
            raise ConfigError(
                "task=analyze reads the attention and updates of timm's pre-norm ViT blocks; "
                f"this backbone's blocks are {type(block).__name__}s. Pick a ViT backbone."
            )
        fused.append(block.attn.fused_attn)
        handles += [
            watch_attention(block.attn, partial(setattr, record, "attn")),
            block.register_forward_pre_hook(_keep(record, "input", from_inputs=True)),
            block.ls1.register_forward_hook(_keep(record, "update")),
        ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for block, was_fused in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was_fused


def _keep(record: BlockRecord, field: str, from_inputs: bool = False):
    if from_inputs:
        return lambda _module, inputs: setattr(record, field, inputs[0])
    return lambda _module, _inputs, output: setattr(record, field, output)
