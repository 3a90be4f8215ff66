"""Attentive probes: learned queries cross-attend to the patch tokens."""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set
from mim_agg.errors import ConfigError


@register("attentive_probe")
class AttentiveProbe(Aggregator):
    """Multi-head cross-attention from learned queries, with key/value projections and an
    optional MLP block (the attentive probes of V-JEPA, AIM and CAPI; timm's
    ``AttentionPoolLatent``). Per-query outputs are averaged. The input is layer-normalised,
    since the paper probes tokens taken before the backbone's final norm.

    Not V-JEPA's attentive pooler (``jepa_pool``, efficient-probing's ``jepa``), although at one
    query their parameter counts are equal (``12 D^2 + 14 D``): here the attention output
    replaces the query (V-JEPA adds it to the query), the input norm sits outside the block
    with ``eps=1e-6`` (V-JEPA's key/value norm: ``1e-5``), and the initialisation is timm's.

    Options:
        num_queries: learned queries; their outputs are averaged.
        num_heads: attention heads; must divide the token dim (16 divides the ViT-Ti/S/B/L/H
            widths).
        mlp: the output projection, norm and MLP block after the cross-attention (off: the
            attention output itself).
        mlp_ratio: the MLP's hidden width over the token dim.
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never).
    """

    def __init__(
        self,
        layout,
        *,
        num_queries: int = 1,
        num_heads: int = 16,
        mlp: bool = True,
        mlp_ratio: float = 4.0,
        tokens: str = "patch",
    ):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name)
        self.tokens = tokens
        check_num_heads(num_heads, dim)
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
        return self.pool(self.input_norm(token_set(tokens, self.tokens)))


@register("efficient_probe")
class EfficientProbe(Aggregator):
    """Efficient probing (Psomas et al., arXiv 2506.10178): multi-query cross-attention with
    no query or key projection and a single value projection.

    Query ``j`` attends over the raw patch tokens, ``a_j = softmax(q_j K^T / sqrt(D))``, and
    pools its own ``D / (d_out * M)`` slice of the projected values; the ``M`` slices are
    concatenated into a ``D / d_out`` representation.

    This is efficient-probing's ``ep`` (billpsomas/efficient-probing, ``poolings/ep.py``) at
    every option: the defaults are its leaderboard's (``--ep_queries 32 --d_out 1``; ``ep_all``
    is ``tokens=all``): ``M D + D^2 / d_out`` parameters (614,400 at D = 768).

    Options:
        num_queries: ``M``, the learned queries; ``num_queries x d_out`` must divide the token dim.
        d_out: compression of the output, ``D / d_out`` wide.
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never).
    """

    def __init__(
        self,
        layout,
        *,
        num_queries: int = 32,
        d_out: int = 1,
        tokens: str = "patch",
    ):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name)
        self.tokens = tokens
        if dim % (num_queries * d_out):
            raise ConfigError(
                f"aggregator.num_queries={num_queries} x d_out={d_out} must divide the dim {dim}."
            )
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.values = nn.Linear(dim, dim // d_out, bias=False)
        self.out_dim = dim // d_out

    def forward(self, tokens):
        keys = token_set(tokens, self.tokens)
        weights = self.query_attention(keys)  # [B, M, N]
        values = self.values(keys).unflatten(-1, (self.num_queries, -1))  # [B, N, M, d]
        pooled = torch.einsum("bmn,bnmd->bmd", weights, values)
        return pooled.flatten(1)

    def pooling_weights(self, tokens):
        """Query-averaged attention over patches (with ``tokens=all``, [cls]'s left out)."""
        weights = self.query_attention(token_set(tokens, self.tokens)).mean(dim=1)
        return weights[:, -self.num_patches :]

    def query_attention(self, patches: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("md,bnd->bmn", self.queries.to(patches.dtype), patches)
        return (scores * self.dim**-0.5).softmax(dim=-1)


@register("simpool")
class SimPool(Aggregator):
    """SimPool (Psomas et al., ICCV 2023): the mean patch token queries the layer-normalised
    patches through linear query/key maps; the attention pools the normalised patches.

    At the defaults this is efficient-probing's ``simpool`` (billpsomas/efficient-probing,
    ``poolings/simpool.py``: one head, no ``qkv`` bias, ``gamma=None``; ``simpool_all`` is
    ``tokens=all``): ``2 D^2 + 2 D`` parameters (1,181,184 at D = 768). With ``gamma`` set,
    the shift before the power is each image's own minimum; SimPool's code takes the minimum
    over the whole batch, which makes an image's output depend on its batch.

    Options:
        gamma: exponent of a generalised weighted mean (None: the plain weighted mean).
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never):
            the query is then the mean of both, and both are keys and values.
    """

    def __init__(self, layout, *, gamma: float | None = None, tokens: str = "patch"):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name)
        self.tokens = tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.gamma = gamma

    def forward(self, tokens):
        patches = token_set(tokens, self.tokens)
        weights = self._weights(patches).unsqueeze(1)
        values = self.norm(patches)
        if self.gamma is None:
            return (weights @ values).squeeze(1)
        shifted = values - values.amin(dim=(1, 2), keepdim=True) + 1e-6
        return (weights @ shifted.pow(self.gamma)).squeeze(1).pow(1.0 / self.gamma)

    def pooling_weights(self, tokens):
        """Attention over patches (with ``tokens=all``, [cls]'s left out)."""
        return self._weights(token_set(tokens, self.tokens))[:, -self.num_patches :]

    def _weights(self, patches: torch.Tensor) -> torch.Tensor:
        query = self.query(patches.mean(dim=1, keepdim=True))
        keys = self.key(self.norm(patches))
        return ((query @ keys.transpose(1, 2)).squeeze(1) * self.dim**-0.5).softmax(dim=-1)
