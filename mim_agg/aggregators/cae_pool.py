"""CAE's attentive block: one learned query cross-attends to layer-normalised tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set


@register("cae_pool")
class CaePool(Aggregator):
    """The attentive probe of CAE (Chen et al., IJCV 2023, "Context Autoencoder",
    ``AttentiveBlock``) as efficient-probing builds it (its ``cae``:
    ``CAEAttentiveBlock(dim=D)``, ``poolings/cae_att.py``), which is what the defaults give.

    One learned query (zeros at the start), the keys and the values each pass their own
    ``LayerNorm`` (``eps=1e-5``); ``q``, ``k`` and ``v`` maps without bias, 8 heads, softmax
    scaled by ``head_dim^-1/2``, heads concatenated and projected (biased). No residual, no
    MLP. ``4 D^2 + 8 D`` parameters (2,365,440 at D = 768).

    One difference from their module: it also builds a fourth ``LayerNorm`` (``norm2_cross``)
    that its forward never uses, so their count is ``2 D`` higher (2,366,976 at D = 768); it is
    left out here, since a parameter that never gets a gradient stops a DDP run.

    Options:
        num_heads: attention heads (theirs: 8, CAE's default; not ``--num_heads``); must divide
            the token dim.
        tokens: ``patch`` tokens, or ``all``: ``[cls]`` then the patches (registers never).
    """

    def __init__(self, layout, *, num_heads: int = 8, tokens: str = "patch"):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, dim)
        self.tokens = tokens
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        x = token_set(tokens, self.tokens)
        query = self.norm_q(self.query.expand(len(x), -1, -1))
        q, k, v = (
            linear(inputs).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for linear, inputs in (
                (self.q, query),
                (self.k, self.norm_k(x)),
                (self.v, self.norm_v(x)),
            )
        )
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.proj(attended).squeeze(1)
