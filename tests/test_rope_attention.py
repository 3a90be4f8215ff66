"""The ``[cls]`` attention row a backbone hands aggregators (``TokenRequest(cls_attn=True)``) under
rotary position embeddings: DINOv3 (timm's ``Eva`` with RoPE on the patches, 4 storage tokens
unrotated) and PE-Core (``AttentionRope``, interleaved pairs, ``[cls]`` unrotated). It must be
softmax(q k^T / sqrt(d)) of the *rotated* queries and keys, computed here from the block's
input: the rotation written out, never timm's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mim_agg.backbones import FrozenBackbone, TokenRequest
from tests.test_dinov3 import rope_sin_cos, rotate

SIZE = 48  # 3 x 3 patches of 16 px
IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def dinov3_rotation(backbone: FrozenBackbone, head_dim: int):
    """DINOv3's published RoPE: periods ``100 ** (2 i / (head_dim / 2))``, centred coordinates
    per axis, the rotate-half layout (``tests/test_dinov3.py``)."""
    periods = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    sin, cos = rope_sin_cos(periods, *backbone.layout.grid)
    return lambda x: rotate(x, sin, cos)


def interleaved_rotation(backbone: FrozenBackbone, head_dim: int):
    """EVA-02 / PE's layout: channel pairs (2j, 2j + 1) turned by the angle the RoPE module
    gives for them (its sin / cos table, ``[N, head_dim]`` each)."""
    sin, cos = backbone.model.rope.get_embed().chunk(2, dim=-1)

    def turn(x):
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([-odd, even], dim=-1).flatten(-2) * sin + x * cos

    return turn


CASES = {
    "vit_small_patch16_dinov3_qkvb": ({"embed_dim": 64, "num_heads": 4}, dinov3_rotation),
    "vit_pe_core_tiny_patch16_384": ({}, interleaved_rotation),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_the_cls_row_is_the_softmax_of_the_rotated_queries_and_keys(arch):
    arch_kwargs, rotation = CASES[arch]
    torch.manual_seed(0)
    backbone = FrozenBackbone(arch, img_size=SIZE, arch_kwargs={**arch_kwargs, "depth": 2})
    attn = backbone.model.blocks[-1].attn
    with torch.no_grad():  # sharper attention, random q/v biases: errors cannot hide
        attn.qkv.weight.mul_(10)
        for name in ("q_bias", "v_bias"):
            if getattr(attn, name, None) is not None:
                getattr(attn, name).normal_()
    backbone.provide(TokenRequest(cls_attn=True))
    inputs = []
    attn.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
    captured = backbone(IMAGES).cls_attn

    layout, (x,) = backbone.layout, inputs
    heads, head_dim = layout.num_heads, layout.dim // layout.num_heads
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias
    else:
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, bias).unflatten(-1, (3, heads, head_dim))
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    turn, prefix = rotation(backbone, head_dim), layout.num_prefix_tokens
    q = torch.cat([q[:, :, :prefix], turn(q[:, :, prefix:])], dim=2)
    k = torch.cat([k[:, :, :prefix], turn(k[:, :, prefix:])], dim=2)
    attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
    assert captured.shape == (2, heads, layout.num_patches)
    torch.testing.assert_close(captured, attention[:, :, 0, prefix:], atol=1e-5, rtol=1e-5)
    logits = qkv[:, :, 0].transpose(1, 2) @ qkv[:, :, 1].permute(0, 2, 3, 1) / math.sqrt(head_dim)
    unrotated = logits.softmax(-1)
    assert not torch.allclose(captured, unrotated[:, :, 0, prefix:], atol=1e-3)  # RoPE matters
