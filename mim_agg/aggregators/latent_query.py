"""Poolers where learned queries cross-attend to the tokens: efficient-probing's ``siglip``,
``aim`` and ``coca`` (Psomas et al., ICLR 2026, billpsomas/efficient-probing,
``probe_heads.py``), each at the settings that file builds it with.
"""

from __future__ import annotations

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set
from mim_agg.errors import ConfigError


@register("siglip_pool")
class SiglipMapPool(Aggregator):
    """SigLIP's multihead attention pooling (MAP) head (Zhai et al., 2023) as efficient-probing
    builds it (their ``siglip``: timm's ``AttentionPoolLatent(in_features=D)``, which is what
    this is): one learned latent query (truncated-normal, std ``D ** -0.5``) through a ``q``
    projection cross-attends to ``kv``-projected tokens (biased projections, 8 heads), then an
    output projection and a residual MLP (``4 D`` hidden, GELU); token 0 is the output.

    Their oddity, kept: ``norm_layer`` is left unset, so there is no ``LayerNorm`` before the
    MLP (SigLIP's head has one) and none on the input.

    Options (the defaults are theirs):
        num_heads: attention heads (theirs: 8); must divide the token dim.
        tokens: ``patch`` or ``all`` (``[cls]`` as a key and value too: their ``siglip_all``).
    """

    def __init__(self, layout, *, num_heads: int = 8, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, layout.dim)
        self.tokens = tokens
        self.pool = AttentionPoolLatent(layout.dim, num_heads=num_heads, norm_layer=None)

    def forward(self, tokens):
        return self.pool(token_set(tokens, self.tokens))


@register("aim_pool")
class AimAttentionPool(Aggregator):
    """AIM's attention-pooling classifier (El-Nouby et al., 2024, ``AttentionPoolingClassifier``
    without its linear layer) as efficient-probing builds it (their ``aim``,
    ``poolings/aim.py``, with ``--num_heads 16``, their default).

    The tokens pass a non-affine ``BatchNorm1d`` over channels (``eps=1e-6``; statistics over
    the batch and the tokens, running statistics in eval). A learned query (``randn * 0.02``,
    not projected) attends over ``k``- and ``v``-projected tokens (no biases), head by head;
    the heads' outputs are concatenated, with no output projection and no MLP. Trainable
    parameters: ``2 D^2 + D``.

    Options (the defaults are theirs):
        num_heads: attention heads (theirs: 16); must divide the token dim.
        tokens: ``patch`` or ``all`` (``[cls]`` in the norm and as a key and value: their
            ``aim_all``).
    """

    def __init__(self, layout, *, num_heads: int = 16, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, layout.dim)
        dim = layout.dim
        self.tokens = tokens
        self.num_heads = num_heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens):
        x = token_set(tokens, self.tokens)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, heads, T, D / heads]
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        query = heads(self.query.to(x.dtype).expand(len(x), -1, -1))
        pooled = nn.functional.scaled_dot_product_attention(
            query, heads(self.k(x)), heads(self.v(x))
        )
        return pooled.flatten(1)


@register("coca_pool")
class CocaAttentionPool(Aggregator):
    """CoCa's attentional pooler (Yu et al., 2022) in lucidrains' ``CrossAttention`` as
    efficient-probing builds it (their ``coca``: ``CrossAttention(dim=D)``,
    ``poolings/coca_pytorch.py``): learned queries (``randn``, std 1) pass a ``LayerNorm``
    without bias (``eps=1e-5``), a ``to_q`` projection to ``num_heads x head_dim`` (8 x 64 =
    512, whatever ``D``), and attend multi-query style over ONE shared key/value head (a
    ``to_kv`` projection to ``2 x head_dim``); heads are merged by ``to_out`` back to ``D``. No
    biases anywhere, no norm on the tokens, no feed-forward.

    Their oddity, kept: 196 queries are learned but only the first one's output is returned
    (``out[:, 0]``), so the other 195 never reach the output. They are held here so the
    trainable-parameter count equals theirs (``1349 D`` at the defaults), and not computed,
    since each query's output depends on its own row only.

    Options (the defaults are theirs):
        num_queries: learned queries held (theirs: 196); only the first is used.
        num_heads: query heads (theirs: 8).
        head_dim: width of each head and of the shared key/value head (theirs: 64).
        tokens: ``patch`` or ``all`` (``[cls]`` as a key and value too: their ``coca_all``).
    """

    def __init__(
        self,
        layout,
        *,
        num_queries: int = 196,
        num_heads: int = 8,
        head_dim: int = 64,
        tokens: str = "patch",
    ):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        if num_queries < 1:
            raise ConfigError(f"aggregator.num_queries={num_queries} must be at least 1.")
        dim, inner = layout.dim, num_heads * head_dim
        self.tokens = tokens
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, tokens):
        x = token_set(tokens, self.tokens)
        query = self.to_q(self.norm(self.queries[:1].to(x.dtype)))  # [1, heads x head_dim]
        query = query.view(1, self.num_heads, 1, self.head_dim).expand(len(x), -1, -1, -1)
        shared = self.to_kv(x).unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        keys, values = shared.chunk(2, dim=-1)  # one head, [B, heads, T, head_dim] as a view
        pooled = nn.functional.scaled_dot_product_attention(query, keys, values)
        return self.to_out(pooled.flatten(1))
