"""What a head adds to the cost of an image, counted by PyTorch's own FLOP counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mim_agg.backbones import FrozenBackbone
from mim_agg.probe.head import ProbeHead


def added_gflops(head: ProbeHead, backbone: FrozenBackbone) -> float:
    """GFLOPs of one image through the head (aggregator, norm, classifier), backbone excluded.

    Runs with autograd on: FlopCounterMode's module tracker fails on parameters under no_grad.
    """
    num_tokens = backbone.num_prefix_tokens + backbone.num_patches
    device = next(head.parameters()).device
    tokens = torch.zeros(1, num_tokens, backbone.dim, device=device)
    attn = None
    if head.aggregator.needs_attn:
        attn = torch.full((1, backbone.num_heads, num_tokens, num_tokens), 1.0 / num_tokens)
        attn = attn.to(device)
    was_training = head.training
    head.eval()  # BatchNorm cannot train on one image
    with FlopCounterMode(display=False) as counter:
        head(tokens, attn)
    head.train(was_training)
    return counter.get_total_flops() / 1e9
