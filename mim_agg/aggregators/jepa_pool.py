"""V-JEPA's attentive pooler: one learned query, one cross-attention block with an MLP."""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set


@register("jepa_pool")
class JepaPool(Aggregator):
    """V-JEPA's ``AttentivePooler`` (Bardes et al., 2024, facebookresearch/jepa,
    ``src/models/attentive_pooler.py``) as efficient-probing builds it (its ``jepa``:
    ``AttentivePooler(embed_dim=D, num_heads=--num_heads)``, one query, depth 1, ``qkv_bias``).

    A learned query ``q`` (truncated normal, std 0.02) cross-attends to the tokens, which a
    ``LayerNorm`` normalises (``eps=1e-5``); the query goes through a biased ``q`` map, the
    tokens through a biased ``kv`` map, heads are concatenated and projected, and the result is
    *added to the query*: ``q' = q + proj(attn)``; then ``q' + MLP(LayerNorm(q'))`` (hidden
    ``mlp_ratio * D``, exact GELU) is the output. Linear weights start truncated normal
    (std 0.02) with zero biases, the two residual projections (``proj``, ``fc2``) divided by
    ``sqrt(2)``, as V-JEPA initialises them. ``12 D^2 + 14 D`` parameters at ``mlp_ratio=4``
    (7,088,640 at D = 768).

    The defaults are efficient-probing's leaderboard ``jepa`` (``--num_heads 16``, its default);
    ``jepa_all`` is ``tokens=all``. ``attentive_probe`` has the same parameter count but is timm's
    ``AttentionPoolLatent`` (no residual to the query, its own norms and init).

    Options:
        num_heads: attention heads (theirs: 16); must divide the token dim.
        mlp_ratio: the MLP's hidden width over the token dim.
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never).
    """

    def __init__(
        self, layout, *, num_heads: int = 16, mlp_ratio: float = 4.0, tokens: str = "patch"
    ):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, dim)
        self.tokens = tokens
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        for linear in (self.q, self.kv, self.proj, self.mlp.fc1, self.mlp.fc2):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():  # V-JEPA's rescale of the block's residual branches (layer 1)
            self.proj.weight.div_(math.sqrt(2.0))
            self.mlp.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, tokens):
        x = self.norm_kv(token_set(tokens, self.tokens))
        batch, length, dim = x.shape
        query = self.query.expand(batch, -1, -1)
        q = self.q(query).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        query = query + self.proj(attended)
        query = query + self.mlp(self.norm_mlp(query))
        return query.squeeze(1)
