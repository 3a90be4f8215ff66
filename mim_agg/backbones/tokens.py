"""The one hand-over between a backbone and everything downstream of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    """Tokens of one transformer block.

    ``all`` is ``[B, P + N, D]``: ``P`` prefix tokens (``[cls]`` first when the model has one,
    then registers) followed by ``N`` patch tokens in row-major order over ``grid``.
    ``attn`` is that block's softmax attention ``[B, H, P + N, P + N]``, present only when an
    aggregator asked for it.
    """

    all: torch.Tensor
    num_prefix_tokens: int
    has_cls: bool
    grid: tuple[int, int]
    attn: torch.Tensor | None = None

    @property
    def prefix(self) -> torch.Tensor:
        return self.all[:, : self.num_prefix_tokens]

    @property
    def patches(self) -> torch.Tensor:
        return self.all[:, self.num_prefix_tokens :]

    def detach(self) -> Tokens:
        """A copy usable with autograd: inference-mode tensors cannot be saved for backward."""
        attn = None if self.attn is None else self.attn.clone()
        return Tokens(self.all.clone(), self.num_prefix_tokens, self.has_cls, self.grid, attn)
