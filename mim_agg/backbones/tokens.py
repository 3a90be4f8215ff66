"""The hand-over between the backbone stage and everything downstream of it.

``TokenLayout``: the shape of a backbone's tokens, all an aggregator is built from.
``TokenRequest``: what the heads of a run need, merged over heads.
``Tokens``: one batch of what was requested, from a live backbone or from a cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch

from mim_agg.errors import ConfigError, UserError

TOKEN_CAUSES = (
    "the weights file (backbone.weights), backbone.mean and backbone.std, on GPU the precision "
    "(trainer.precision=32-true), and for a cache cache.dtype (float16 ends at 65504)"
)


def require_finite(what: str, tensors: Iterable[torch.Tensor], check: str = TOKEN_CAUSES) -> None:
    """The one check of every path from tokens to a number (probe, k-NN, extraction into the
    cache, analysis): refuse NaN or inf. Downstream nothing would fail: a NaN never wins a
    comparison, so accuracy silently drops to chance. ``what`` names the values, ``check``
    the keys or files to look at."""
    if all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
        return
    raise UserError(
        f"{what} are non-finite (NaN or inf), which would make every result chance-level. "
        f"Check {check}."
    )


@dataclass(frozen=True)
class TokenLayout:
    """``P`` prefix tokens (``[cls]`` first when the model has one, then registers) followed
    by ``N = grid[0] * grid[1]`` patch tokens in row-major order, each of width ``dim``;
    ``num_heads`` attention heads in the probed block, which is block ``depth - 1``. The first
    ``num_summary_tokens`` prefix tokens summarise the image: the ``[cls]`` alone, RADIO's one
    per teacher (``backbone.summary_tokens``), none without a ``[cls]``."""

    dim: int
    num_prefix_tokens: int
    has_cls: bool
    grid: tuple[int, int]
    num_heads: int = 1
    depth: int = 1
    num_summary_tokens: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


@dataclass(frozen=True)
class TokenRequest:
    """What aggregators read from the backbone stage; ``a | b`` is what both need.

    tokens: the probed block's tokens ``[B, P + N, D]``.
    cls_attn: that block's ``[cls]`` -> patch attention of every head, ``[B, H, N]`` (the
        ``[cls]`` row only: the full ``[B, H, T, T]`` map is never kept).
    cls_blocks: how many last blocks' ``[cls]`` tokens ``block_cls`` holds (1: none).
    center_rows: the side ``K`` of the central window of patches whose head-mean attention rows
        ``center_attn`` holds (0: none); merged by ``max``, as every smaller central window
        lies inside it (``center_window``).
    oracle: ``(arch, weights)`` of another model whose ``[cls]`` attention is wanted.
    pooled: the keys (``Aggregator.output_key``) of parameter-free aggregators whose outputs a cache
        stores and serves instead of the fields they read.
    """

    tokens: bool = False
    cls_attn: bool = False
    cls_blocks: int = 1
    center_rows: int = 0
    oracle: tuple[str, str | None] | None = None
    pooled: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """Plain JSON values (a cache's identity and manifest). ``center_rows`` is named only
        when set, so the caches of requests without it keep the keys they had before it."""
        values = {**asdict(self), "oracle": list(self.oracle) if self.oracle else None}
        if not self.center_rows:
            del values["center_rows"]
        return values

    def __or__(self, other: TokenRequest) -> TokenRequest:
        if self.oracle and other.oracle and self.oracle != other.oracle:
            raise ConfigError(
                f"One run holds one attention oracle; the aggregators ask for {self.oracle} and "
                f"{other.oracle}. Give every oracle_attn aggregator the same oracle_arch and "
                "oracle_weights."
            )
        return TokenRequest(
            tokens=self.tokens or other.tokens,
            cls_attn=self.cls_attn or other.cls_attn,
            cls_blocks=max(self.cls_blocks, other.cls_blocks),
            center_rows=max(self.center_rows, other.center_rows),
            oracle=self.oracle or other.oracle,
            pooled=tuple(sorted(set(self.pooled) | set(other.pooled))),
        )


TENSOR_FIELDS = ("all", "cls_attn", "block_cls", "oracle_attn", "center_attn")


@dataclass
class Tokens:
    """One batch of what a ``TokenRequest`` asked for; unrequested fields are ``None``.

    ``all``: ``[B, P + N, D]`` (``None`` when a cache serves only pooled vectors);
    ``cls_attn``: ``[B, H, N]``; ``block_cls``: ``[B, n, D]``; ``oracle_attn``: ``[B, N]``;
    ``center_attn``: ``[B, K*K, N]``, the head-mean attention rows of the central ``K x K``
    window of patches (``window_attention``);
    ``pooled``: the stored outputs of parameter-free aggregators by their ``output_key`` (from
    a cache only): calling such an aggregator on these ``Tokens`` returns its own.
    """

    layout: TokenLayout
    all: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    block_cls: torch.Tensor | None = None
    oracle_attn: torch.Tensor | None = None
    center_attn: torch.Tensor | None = None
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prefix(self) -> torch.Tensor:
        return self.require("all")[:, : self.layout.num_prefix_tokens]

    @property
    def patches(self) -> torch.Tensor:
        return self.require("all")[:, self.layout.num_prefix_tokens :]

    @property
    def cls(self) -> torch.Tensor:
        return self.require("all")[:, 0]

    @property
    def summary(self) -> torch.Tensor:
        """The summary tokens, ``[B, S, D]`` (``TokenLayout.num_summary_tokens``)."""
        return self.require("all")[:, : self.layout.num_summary_tokens]

    def require(self, name: str) -> torch.Tensor:
        """A field an aggregator reads; missing means its ``request()`` did not ask for it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"The token source did not provide {name!r}: no aggregator's request() asked for "
                "it, or the token cache holds other fields (see its manifest.json)."
            )
        return value

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this batch holds."""
        present = [getattr(self, name) for name in TENSOR_FIELDS]
        return [t for t in present if t is not None] + list(self.pooled.values())

    def map(self, function) -> Tokens:
        """``function`` applied to every tensor (slicing, device and dtype moves, cloning)."""
        tensors = {
            name: function(getattr(self, name))
            for name in TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        pooled = {key: function(value) for key, value in self.pooled.items()}
        return replace(self, **tensors, pooled=pooled)

    def __len__(self) -> int:
        return len(self.tensors()[0])

    @classmethod
    def example(
        cls, layout: TokenLayout, request: TokenRequest, batch: int = 1, seed: int | None = None
    ) -> Tokens:
        """Tokens of ``batch`` images with every requested field, shaped like ``layout``'s:
        random (from ``seed``) or, with ``seed=None``, zero tokens and uniform attention."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        def values(*shape):
            if generator is None:
                return torch.zeros(shape)
            return torch.randn(shape, generator=generator)

        def distribution(*shape):
            if generator is None:
                return torch.full(shape, 1.0 / shape[-1])
            return torch.randn(shape, generator=generator).softmax(-1)

        num_patches = layout.num_patches
        return cls(
            layout,
            all=values(batch, layout.num_tokens, layout.dim) if request.tokens else None,
            cls_attn=distribution(batch, layout.num_heads, num_patches)
            if request.cls_attn
            else None,
            block_cls=values(batch, request.cls_blocks, layout.dim)
            if request.cls_blocks > 1
            else None,
            oracle_attn=distribution(batch, num_patches) if request.oracle else None,
            center_attn=distribution(batch, request.center_rows**2, num_patches)
            if request.center_rows
            else None,
        )


def center_window(side: int, k: int) -> slice:
    """The central window of ``k`` rows (or columns) of a grid side, by the rule of "Beyond
    [cls]"'s code (gmum/beyond_cls ``ca<k>``): ``[side//2 - ceil(k/2), side//2 + floor(k/2))``;
    refused where it would leave the grid. Windows nest: the ``k``-window lies inside the
    ``K``-window for ``k <= K``, ``ceil(K/2) - ceil(k/2)`` in, whatever the side."""
    start = side // 2 - (k + 1) // 2
    if k < 1 or start < 0:
        raise ConfigError(
            f"aggregator.k={k} must lie in [1, {2 * (side // 2)}] on a grid of side {side}."
        )
    return slice(start, start + k)


def window_attention(attn: torch.Tensor, layout: TokenLayout, k: int) -> torch.Tensor:
    """From a block's full attention ``[B, H, T, T]`` (``T = P + N``), the head-mean attention
    that each patch of the central ``k x k`` window pays every patch: ``[B, k*k, N]``, window
    rows in row-major order, prefix tokens' rows and columns left out, rows not renormalised.
    What a source keeps as ``Tokens.center_attn`` (a copy: the full map is freed)."""
    rows, columns = layout.grid
    prefix = layout.num_prefix_tokens
    patch_attn = attn.mean(dim=1)[:, prefix:, prefix:]  # [B, N, N]
    grid = patch_attn.unflatten(1, (rows, columns))  # [B, rows, columns, N]
    window = grid[:, center_window(rows, k), center_window(columns, k)]
    return window.flatten(1, 2).clone()
