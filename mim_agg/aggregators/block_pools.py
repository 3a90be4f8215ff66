"""One transformer block as the pooler: efficient-probing's ``cait`` (a class-attention block)
and ``dinovit`` (a ViT block, then the mean), both in ``poolings/other_pool.py`` of
billpsomas/efficient-probing (Psomas et al., ICLR 2026), built with timm's blocks.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.cait import ClassAttn, LayerScaleBlockClassAttn
from timm.models.vision_transformer import Block
from torch import nn

from mim_agg.aggregators.base import Aggregator, check_num_heads, register
from mim_agg.aggregators.token_sets import check_token_set, token_set


@register("cait_pool")
class CaitClassAttentionPool(Aggregator):
    """One CaiT class-attention block (Touvron et al., ICCV 2021) as efficient-probing builds
    it (their ``cait``: ``CAPooling(embed_dim=D)``, one iteration), which is timm's
    ``LayerScaleBlockClassAttn`` with ``ClassAttn``: a learned class token (zeros, then
    truncated-normal std 0.02) is layer-normalised together with the tokens, queries them all
    (itself included) through biased ``q``/``k``/``v`` projections and an output projection,
    4 heads; LayerScale (``init 1e-5``) on that residual and on the MLP's (``4 D``, GELU); then
    a final ``LayerNorm`` of the class token is the output. Block norms use ``eps=1e-6``.

    Their oddity, kept: the final ``LayerNorm`` is ``nn.LayerNorm(D)`` with torch's default
    ``eps=1e-5``, unlike the block's (CaiT's own head norm uses ``1e-6``).

    Options (the defaults are theirs):
        num_heads: attention heads (theirs: 4); must divide the token dim.
        tokens: ``patch`` or ``all`` (``[cls]`` attended beside the patches: their
            ``cait_all``).
    """

    def __init__(self, layout, *, num_heads: int = 4, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, layout.dim)
        dim = layout.dim
        self.tokens = tokens
        self.block = LayerScaleBlockClassAttn(
            dim,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_block=ClassAttn,
            init_values=1e-5,
        )
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=0.02)

    def forward(self, tokens):
        x = token_set(tokens, self.tokens)
        cls_token = self.block(x, self.cls_token.to(x.dtype).expand(len(x), -1, -1))
        return self.norm(cls_token[:, 0])


@register("vit_block_pool")
class VitBlockPool(Aggregator):
    """One pre-norm ViT block of self-attention over the tokens, then their mean, as
    efficient-probing builds it (their ``dinovit``: ``DinoViTBlockPooling(d_model=D)``, a
    DINOv2 ``Block``), which is timm's ``Block`` with their settings: 8 heads, ``qkv``
    without bias, biased output projection and MLP (``4 D``, GELU), no LayerScale, default
    ``Linear`` init. The norms are ``nn.LayerNorm`` with torch's default ``eps=1e-5`` (timm's
    blocks default to ``1e-6``; theirs is the DINOv2 block's default), kept.

    Options (the defaults are theirs):
        num_heads: attention heads (theirs: 8); must divide the token dim.
        tokens: ``patch`` or ``all`` (``[cls]`` in the block and in the mean: their
            ``dinovit_all``).
    """

    def __init__(self, layout, *, num_heads: int = 8, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name)
        check_num_heads(num_heads, layout.dim)
        self.tokens = tokens
        self.block = Block(
            layout.dim,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=False,
            proj_bias=True,
            norm_layer=nn.LayerNorm,
        )

    def forward(self, tokens):
        return self.block(token_set(tokens, self.tokens)).mean(dim=1)
