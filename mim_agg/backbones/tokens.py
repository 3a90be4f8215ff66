"""The one hand-over between the backbone stage and everything downstream of it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Tokens:
    """Tokens of one transformer block, plus what aggregators asked the backbone stage for.

    ``all`` is ``[B, P + N, D]``: ``P`` prefix tokens (``[cls]`` first when the model has one,
    then registers) followed by ``N`` patch tokens in row-major order over ``grid``.
    Present only on request:
    ``attn``: that block's softmax attention ``[B, H, P + N, P + N]``;
    ``block_cls``: the ``[cls]`` token of the last blocks up to this one, ``[B, n, D]``;
    ``oracle_attn``: another model's ``[cls]`` attention over these patches, ``[B, N]``.
    """

    all: torch.Tensor
    num_prefix_tokens: int
    has_cls: bool
    grid: tuple[int, int]
    attn: torch.Tensor | None = None
    block_cls: torch.Tensor | None = None
    oracle_attn: torch.Tensor | None = None

    @property
    def prefix(self) -> torch.Tensor:
        return self.all[:, : self.num_prefix_tokens]

    @property
    def patches(self) -> torch.Tensor:
        return self.all[:, self.num_prefix_tokens :]

    def inputs(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The extra fields an aggregator ``needs``, as keyword arguments."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"The backbone stage did not provide {missing}; nobody asked for it.")
        return {name: getattr(self, name) for name in names}

    def detach(self) -> Tokens:
        """A copy usable with autograd: inference-mode tensors cannot be saved for backward."""
        tensors = {
            f.name: getattr(self, f.name).clone()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)
