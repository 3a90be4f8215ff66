"""Attentive probes: learned queries cross-attend to the patch tokens."""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.errors import ConfigError


@register("attentive_probe")
class AttentiveProbe(Aggregator):
    """Multi-head cross-attention from learned queries, with key/value projections and an
    optional MLP block (the attentive probes of V-JEPA, AIM and CAPI; timm's
    ``AttentionPoolLatent``). Per-query outputs are averaged. The input is layer-normalised,
    since the paper probes tokens taken before the backbone's final norm.

    Options:
        num_queries: learned queries; their outputs are averaged.
        num_heads: attention heads; must divide the token dim (16 divides the ViT-Ti/S/B/L/H
            widths).
        mlp: the output projection, norm and MLP block after the cross-attention (off: the
            attention output itself).
        mlp_ratio: the MLP's hidden width over the token dim.
    """

    def __init__(
        self,
        layout,
        *,
        num_queries: int = 1,
        num_heads: int = 16,
        mlp: bool = True,
        mlp_ratio: float = 4.0,
    ):
        super().__init__(layout)
        dim = layout.dim
        if dim % num_heads:
            raise ConfigError(f"aggregator.num_heads={num_heads} must divide the token dim {dim}.")
        self.input_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = AttentionPoolLatent(
            dim,
            out_features=dim if mlp else 0,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            latent_len=num_queries,
            pool_type="avg",
            norm_layer=nn.LayerNorm,
        )

    def forward(self, tokens):
        return self.pool(self.input_norm(tokens.patches))


@register("efficient_probe")
class EfficientProbe(Aggregator):
    """Efficient probing (Psomas et al., arXiv 2506.10178): multi-query cross-attention with
    no query or key projection and a single value projection.

    Query ``j`` attends over the raw patch tokens, ``a_j = softmax(q_j K^T / sqrt(D))``, and
    pools its own ``D / (d_out * M)`` slice of the projected values; the ``M`` slices are
    concatenated into a ``D / d_out`` representation.

    Options:
        num_queries: ``M``, the learned queries; ``num_queries x d_out`` must divide the token dim.
        d_out: compression of the output, ``D / d_out`` wide.
    """

    def __init__(
        self,
        layout,
        *,
        num_queries: int = 32,
        d_out: int = 1,
    ):
        super().__init__(layout)
        dim = layout.dim
        if dim % (num_queries * d_out):
            raise ConfigError(
                f"aggregator.num_queries={num_queries} x d_out={d_out} must divide the dim {dim}."
            )
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.values = nn.Linear(dim, dim // d_out, bias=False)
        self.out_dim = dim // d_out

    def forward(self, tokens):
        patches = tokens.patches
        weights = self.query_attention(patches)  # [B, M, N]
        values = self.values(patches).unflatten(-1, (self.num_queries, -1))  # [B, N, M, d]
        pooled = torch.einsum("bmn,bnmd->bmd", weights, values)
        return pooled.flatten(1)

    def pooling_weights(self, tokens):
        """Query-averaged attention over patches."""
        return self.query_attention(tokens.patches).mean(dim=1)

    def query_attention(self, patches: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("md,bnd->bmn", self.queries.to(patches.dtype), patches)
        return (scores * self.dim**-0.5).softmax(dim=-1)


@register("simpool")
class SimPool(Aggregator):
    """SimPool (Psomas et al., ICCV 2023): the mean patch token queries the layer-normalised
    patches through linear query/key maps; the attention pools the normalised patches.

    Options:
        gamma: exponent of a generalised weighted mean (None: the plain weighted mean).
    """

    def __init__(self, layout, *, gamma: float | None = None):
        super().__init__(layout)
        dim = layout.dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.gamma = gamma

    def forward(self, tokens):
        patches = tokens.patches
        weights = self._weights(patches).unsqueeze(1)
        values = self.norm(patches)
        if self.gamma is None:
            return (weights @ values).squeeze(1)
        shifted = values - values.amin(dim=(1, 2), keepdim=True) + 1e-6
        return (weights @ shifted.pow(self.gamma)).squeeze(1).pow(1.0 / self.gamma)

    def pooling_weights(self, tokens):
        return self._weights(tokens.patches)

    def _weights(self, patches: torch.Tensor) -> torch.Tensor:
        query = self.query(patches.mean(dim=1, keepdim=True))
        keys = self.key(self.norm(patches))
        return ((query @ keys.transpose(1, 2)).squeeze(1) * self.dim**-0.5).softmax(dim=-1)
