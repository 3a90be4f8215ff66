"""What a head adds to the cost of an image, counted by PyTorch's own FLOP counter."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from mim_agg.backbones import TokenLayout, Tokens
from mim_agg.probe.head import ProbeHead


def added_gflops(head: ProbeHead, layout: TokenLayout) -> float:
    """GFLOPs of one image through the head (aggregator, norm, classifier), backbone excluded.

    Runs with autograd on: FlopCounterMode's module tracker fails on parameters under no_grad.
    """
    device = next(head.parameters()).device
    tokens = Tokens.example(layout, head.aggregator.request()).map(lambda t: t.to(device))
    was_training = head.training
    head.eval()  # BatchNorm cannot train on one image
    with FlopCounterMode(display=False) as counter:
        head(tokens)
    head.train(was_training)
    return counter.get_total_flops() / 1e9
