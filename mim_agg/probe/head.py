"""One probe head: aggregator -> BatchNorm1d(affine=False) -> Linear, trained jointly."""

from __future__ import annotations

import torch
from torch import nn

from mim_agg.aggregators import Aggregator
from mim_agg.backbones import Tokens


class ProbeHead(nn.Module):
    """The paper's head. The non-affine BatchNorm standardises features whose scale differs
    wildly across backbones and aggregators, so one learning rate grid fits them all."""

    def __init__(self, aggregator: Aggregator, num_classes: int) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.norm = nn.BatchNorm1d(aggregator.out_dim, affine=False, eps=1e-6)
        self.classifier = nn.Linear(aggregator.out_dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.classifier(self.norm(self.aggregator(tokens)))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
