"""The aggregator contract, its registry and the builder shared by Hydra and notebooks."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from mim_agg.backbones.tokens import TokenLayout, TokenRequest, Tokens
from mim_agg.errors import ConfigError

AGGREGATORS: dict[str, type[Aggregator]] = {}


class Aggregator(nn.Module):
    """Turns ``Tokens`` into an image representation ``[B, out_dim]``.

    Built from a ``TokenLayout``; options are keyword-only constructor arguments, which are
    the aggregator's config schema. ``request()`` says what ``forward`` reads from the token
    source (by default the block's tokens); ``needs_cls`` makes construction fail on
    backbones without a ``[cls]`` token.

    ``output_key`` names the aggregator and every option it was built with
    (``topk_attn(k=16)``), captured at construction for every subclass: a token cache stores a
    parameter-free aggregator's output under it, and calling the aggregator on tokens that hold
    it returns it. (Not ``key``: attention modules name their projections so.)
    """

    name: ClassVar[str]
    needs_cls: ClassVar[bool] = False
    output_key: str

    def __new__(cls, *args, **options) -> Aggregator:
        """Name the aggregator by the options it is built with before any subclass's
        ``__init__`` runs, so no subclass has anything to do for its ``output_key``."""
        aggregator = super().__new__(cls)
        aggregator.output_key = aggregator_key(cls, options)
        return aggregator

    def __init__(self, layout: TokenLayout) -> None:
        super().__init__()
        self.layout = layout
        self.out_dim = layout.dim
        if self.needs_cls and not layout.has_cls:
            serving = sorted(name for name, cls in AGGREGATORS.items() if not cls.needs_cls)
            raise ConfigError(
                f"aggregator={self.name!r} reads the [cls] token, but this backbone has none "
                f"(I-JEPA, CAPI, SigLIP, ...). These aggregators serve it: {', '.join(serving)}."
            )

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    def request(self) -> TokenRequest:
        return TokenRequest(tokens=True)

    @property
    def parameter_free(self) -> bool:
        """Nothing to train: its output is a fixed function of the tokens, so a cache may
        store the output instead of the tokens."""
        return not any(True for _ in self.parameters())

    def __call__(self, tokens: Tokens) -> torch.Tensor:
        """The representation of ``tokens``: the stored output when their source holds this
        aggregator's (a cache of a parameter-free aggregator), else ``forward``'s."""
        stored = tokens.pooled.get(self.output_key)
        return super().__call__(tokens) if stored is None else stored

    def forward(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def pooling_weights(self, tokens: Tokens) -> torch.Tensor:
        """Weight of each patch in the pooled representation, ``[B, N]``."""
        raise NotImplementedError(f"aggregator={self.name!r} does not weight patches.")


class WeightedPatchPool(Aggregator):
    """An aggregator defined by its patch weights: the representation is their weighted sum
    of the patch tokens. Subclasses implement ``pooling_weights`` only."""

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return pool(self.pooling_weights(tokens), tokens.patches)


def token_request(aggregators: Iterable[Aggregator], cached: bool = False) -> TokenRequest:
    """What ``aggregators`` read, merged. From a cache (``cached``) a parameter-free aggregator
    reads only its own stored output (``pooled``, by ``output_key``), so a cache stores the tokens
    only when a learned aggregator reads them."""
    request = TokenRequest()
    for aggregator in aggregators:
        if cached and aggregator.parameter_free:
            request = request | TokenRequest(pooled=(aggregator.output_key,))
        else:
            request = request | aggregator.request()
    return request


def pool(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[b, i] * values[b, i]`` as one batched matmul (no ``[B, N, D]`` temporary)."""
    return torch.bmm(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)


def square_side(layout: TokenLayout, name: str) -> int:
    """The side of a square patch grid; aggregators that need the 2-D layout refuse others."""
    rows, columns = layout.grid
    if rows != columns:
        raise ConfigError(f"aggregator={name!r} needs a square patch grid; got {rows}x{columns}.")
    return rows


def check_num_heads(num_heads: int, dim: int) -> None:
    """Refuse, at build time, an attention head count that does not split the token dim."""
    if dim % num_heads:
        raise ConfigError(f"aggregator.num_heads={num_heads} must divide the token dim {dim}.")


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


def build_aggregator(name: str, layout: TokenLayout, **options) -> Aggregator:
    """Build a registered aggregator by name, inside or outside Hydra."""
    return get_aggregator_class(name)(layout, **options)


def aggregator_key(cls: type[Aggregator], options: dict) -> str:
    """``topk_attn(k=16)``: the name and every option (keyword-only argument), defaults filled
    in, so the same aggregator has one key however its config spells it."""
    defaults = {
        param.name: param.default
        for param in inspect.signature(cls.__init__).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    values = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    name = getattr(cls, "name", cls.__name__)  # a class not registered (yet) has no name
    return f"{name}({','.join(f'{k}={v}' for k, v in sorted(values.items()))})"
