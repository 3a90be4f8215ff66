"""The aggregator contract, its registry and the builder shared by Hydra and notebooks."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import ClassVar

import torch
from torch import nn

from mim_agg.errors import ConfigError

AGGREGATORS: dict[str, type[Aggregator]] = {}


class Aggregator(nn.Module):
    """Turns block tokens ``[B, P + N, D]`` into an image representation ``[B, out_dim]``.

    Subclasses take their options as keyword-only constructor arguments: those arguments are
    the aggregator's config schema. ``needs`` names the extra ``Tokens`` fields ``forward``
    takes as keyword arguments, which the backbone stage then provides: ``attn`` (the block's
    attention maps), ``block_cls`` (the ``[cls]`` of the last blocks, see ``num_blocks``),
    ``oracle_attn`` (another model's ``[cls]`` attention). ``needs_cls`` makes construction
    fail on backbones without a ``[cls]`` token.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    needs_cls: ClassVar[bool] = False
    num_blocks: int = 1  # how many last blocks' [cls] tokens ``block_cls`` must hold

    def __init__(
        self, dim: int, num_patches: int, num_prefix_tokens: int = 1, has_cls: bool | None = None
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_patches = num_patches
        self.num_prefix_tokens = num_prefix_tokens
        self.has_cls = num_prefix_tokens > 0 if has_cls is None else has_cls
        self.out_dim = dim
        if self.needs_cls and not self.has_cls:
            raise ConfigError(
                f"aggregator={self.name!r} reads the [cls] token, but this backbone has none "
                "(e.g. I-JEPA). Choose an aggregator over patch tokens, such as mean or abmilp."
            )

    def forward(self, tokens: torch.Tensor, attn: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def pooling_weights(self, tokens: torch.Tensor, attn: torch.Tensor | None = None):
        """Weight of each patch in the pooled representation, ``[B, N]``."""
        raise NotImplementedError(f"aggregator={self.name!r} does not weight patches.")

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens :]

    def cls(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]

    def cls_attention_per_head(self, attn: torch.Tensor | None) -> torch.Tensor:
        """``[cls]`` -> patch attention of every head, ``[B, H, N]``."""
        if attn is None:
            raise ValueError(f"aggregator={self.name!r} needs the backbone's attention maps.")
        return attn[:, :, 0, self.num_prefix_tokens :]

    def cls_attention(self, attn: torch.Tensor | None) -> torch.Tensor:
        """Head-averaged ``[cls]`` -> patch attention, ``[B, N]``."""
        return self.cls_attention_per_head(attn).mean(dim=1)


class WeightedPatchPool(Aggregator):
    """An aggregator defined by its patch weights: the representation is their weighted sum
    of the patch tokens. Subclasses implement ``pooling_weights`` only."""

    def forward(self, tokens, attn=None, **inputs):
        return pool(self.pooling_weights(tokens, attn, **inputs), self.patches(tokens))


def pool(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[b, i] * values[b, i]`` as one batched matmul (no ``[B, N, D]`` temporary)."""
    return torch.bmm(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)


def square_side(num_patches: int, name: str) -> int:
    """The side of a square patch grid; aggregators that need the 2-D layout refuse others."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConfigError(
            f"aggregator={name!r} needs a square patch grid; got {num_patches} patches."
        )
    return side


def register(name: str):
    """Class decorator: make an aggregator available as ``aggregator=<name>``."""

    def add(cls: type[Aggregator]) -> type[Aggregator]:
        if name in AGGREGATORS:
            raise ValueError(f"Aggregator {name!r} is registered twice.")
        cls.name = name
        AGGREGATORS[name] = cls
        return cls

    return add


def options_schema(name: str) -> type:
    """A dataclass of the aggregator's options (its keyword-only arguments), for Hydra.

    Config files are validated against it, so a misspelled option fails at composition.
    """
    cls = get_aggregator_class(name)
    hints = typing.get_type_hints(cls.__init__)
    fields = [("name", str, dataclasses.field(default=name))]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            fields.append((param.name, hints[param.name], dataclasses.field(default=param.default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields)


def get_aggregator_class(name: str) -> type[Aggregator]:
    if name not in AGGREGATORS:
        raise ConfigError(
            f"Unknown aggregator {name!r}; available: {', '.join(sorted(AGGREGATORS))}."
        )
    return AGGREGATORS[name]


def build_aggregator(
    name: str,
    dim: int,
    num_patches: int,
    num_prefix_tokens: int = 1,
    has_cls: bool | None = None,
    **options,
) -> Aggregator:
    """Build a registered aggregator by name, inside or outside Hydra."""
    cls = get_aggregator_class(name)
    return cls(dim, num_patches, num_prefix_tokens, has_cls, **options)
