"""What a head adds to the cost of an image, counted by PyTorch's own FLOP counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mim_agg.backbones import FrozenBackbone, Tokens
from mim_agg.probe.head import ProbeHead


def added_gflops(head: ProbeHead, backbone: FrozenBackbone) -> float:
    """GFLOPs of one image through the head (aggregator, norm, classifier), backbone excluded.

    Runs with autograd on: FlopCounterMode's module tracker fails on parameters under no_grad.
    """
    device = next(head.parameters()).device
    tokens = example_tokens(backbone, head.aggregator.num_blocks, device)
    was_training = head.training
    head.eval()  # BatchNorm cannot train on one image
    with FlopCounterMode(display=False) as counter:
        head(tokens)
    head.train(was_training)
    return counter.get_total_flops() / 1e9


def example_tokens(backbone: FrozenBackbone, num_blocks: int, device) -> Tokens:
    """Zero tokens of one image with every optional field, shaped like ``backbone``'s."""
    num_tokens = backbone.num_prefix_tokens + backbone.num_patches
    uniform = 1.0 / num_tokens
    return Tokens(
        all=torch.zeros(1, num_tokens, backbone.dim, device=device),
        num_prefix_tokens=backbone.num_prefix_tokens,
        has_cls=backbone.has_cls,
        grid=backbone.grid,
        attn=torch.full((1, backbone.num_heads, num_tokens, num_tokens), uniform, device=device),
        block_cls=torch.zeros(1, num_blocks, backbone.dim, device=device),
        oracle_attn=torch.full(
            (1, backbone.num_patches), 1.0 / backbone.num_patches, device=device
        ),
    )
