"""Poolers whose query is the mean token: efficient-probing's ``esimpool`` and ``clip``.

Both follow efficient-probing (Psomas et al., ICLR 2026, billpsomas/efficient-probing,
``probe_heads.py``) at its defaults; each docstring says where that code departs from the
method it is named after.
"""

from __future__ import annotations

from timm.layers import AttentionPool2d
from torch import nn

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set


@register("esimpool")
class EfficientSimPool(Aggregator):
    """SimPool without its linear maps (efficient-probing's ``esimpool``,
    ``poolings/simpool.py: SimPool_nolinears``; SimPool: Psomas et al., ICCV 2023).

    The layer-normalised mean token queries the layer-normalised tokens (one ``LayerNorm``,
    ``eps=1e-6``, shared by query and keys), head by head over ``D / num_heads`` channel
    slices, scaled by ``(D / num_heads) ** -0.5``; each head's attention pools its slice of the
    raw (unnormalised) tokens. The only trainable parameters are the norm's ``2 D``.

    Options (the defaults give their leaderboard's module at ViT-B):
        num_heads: attention heads; must divide the token dim. None: the backbone's head count,
            which is 12 at ViT-B, efficient-probing's fixed value (theirs cannot run at dim
            1024, which 12 does not divide).
        tokens: ``patch`` or ``all`` (``[cls]`` too, in the mean and as a key and value:
            their ``esimpool_all``).
    """

    def __init__(self, layout, *, num_heads: int | None = None, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        num_heads = layout.num_heads if num_heads is None else num_heads
        check_num_heads(num_heads, layout.dim)
        self.tokens = tokens
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(layout.dim, eps=1e-6)

    def forward(self, tokens):
        x = token_set(tokens, self.tokens)
        heads = self.num_heads
        query = self.norm(x.mean(dim=1, keepdim=True)).unflatten(-1, (heads, -1)).transpose(1, 2)
        keys = self.norm(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        values = x.unflatten(-1, (heads, -1)).transpose(1, 2)
        pooled = nn.functional.scaled_dot_product_attention(query, keys, values)
        return pooled.flatten(1)  # [B, heads, 1, D / heads] -> [B, D]


@register("clip_pool")
class ClipAttentionPool(Aggregator):
    """CLIP's attention pooling (Radford et al., 2021, ``AttentionPool2d``) as efficient-probing
    runs it (their ``clip``, ``poolings/clip/attention_pool2d.py``): a ``LayerNorm``
    (``eps=1e-6``) of the patch tokens, then timm's ``AttentionPool2d``: the mean token is
    prepended, a learned position embedding of ``N + 1`` rows is added, a multi-head
    self-attention with one fused ``qkv`` projection (biased) and an output projection runs,
    and token 0 is the output. ``num_heads=4`` is theirs; the init is theirs and timm's
    (``qkv`` weights and position embedding truncated-normal with std ``D ** -0.5``, zero
    ``qkv`` bias, a default ``Linear`` projection).

    Their departures from CLIP, kept: the ``LayerNorm`` before pooling (CLIP has none), and the
    position embedding sized for the patch grid (theirs fixes 14 x 14, 16 x 16 for CAPI; here
    it is the backbone's grid).

    Options (the defaults are theirs):
        num_heads: attention heads (theirs: 4); must divide the token dim.
        tokens: ``patch`` only: the position embedding is laid out on the patch grid, which has
            no place for ``[cls]`` (their ``clip_all`` fails: ``N + 2`` tokens meet ``N + 1``
            positions).
    """

    def __init__(self, layout, *, num_heads: int = 4, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name, grid=True)
        check_num_heads(num_heads, layout.dim)
        self.norm = nn.LayerNorm(layout.dim, eps=1e-6)
        self.pool = AttentionPool2d(layout.dim, feat_size=layout.grid, num_heads=num_heads)

    def forward(self, tokens):
        patches = self.norm(tokens.patches)  # [B, N, D], row-major over the grid
        grid = patches.transpose(1, 2).unflatten(-1, self.layout.grid)  # [B, D, rows, columns]
        return self.pool(grid)
