"""DOLG's spatial attention over the 2-D patch grid."""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.aggregators.token_sets import check_token_set


@register("dolg_pool")
class DolgPool(Aggregator):
    """The local branch's spatial attention of DOLG (Yang et al., ICCV 2021,
    ``SpatialAttention2d``) as efficient-probing builds it (its ``dolg``:
    ``SpatialAttention2d(in_c=D, s3_dim=D, with_aspp=False)``, ``poolings/dolg/dolg.py``),
    which is what the defaults give.

    The patch grid ``[B, D, H, W]`` goes through a 1x1 convolution ``D -> D`` and a
    ``BatchNorm2d`` (``eps=1e-5``, momentum 0.1): ``f``. The attention score of a position
    is ``softplus(conv(relu(f)))`` (a 1x1 convolution ``D -> 1``); the output is the mean over
    positions of the score times ``f`` L2-normalised over channels. So the representation
    is built from the projected features, not from the tokens themselves. Both convolution
    weights start normal with std ``sqrt(2 / fan_out)`` (DOLG's ResNet-style init; ``sqrt(2)``
    for the scorer), their biases at PyTorch's default. ``D^2 + 4 D + 1`` parameters
    (592,897 at D = 768).

    efficient-probing has no ``dolg_all`` that runs: its reshape of ``1 + N`` tokens into a
    square grid fails; here ``tokens=all`` is refused at build time.

    Options:
        tokens: ``patch`` only (the grid has no place for ``[cls]``).
    """

    def __init__(self, layout, *, tokens: str = "patch"):
        super().__init__(layout)
        dim = layout.dim
        check_token_set(layout, tokens, self.name, grid=True)
        self.conv = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim, eps=1e-5, momentum=0.1)
        self.score = nn.Conv2d(dim, 1, 1)
        for conv in (self.conv, self.score):  # DOLG's init_weights: std sqrt(2 / fan_out)
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / conv.out_channels))

    def forward(self, tokens):
        grid = tokens.patches.transpose(1, 2).unflatten(-1, self.layout.grid)
        features = self.bn(self.conv(grid))
        score = F.softplus(self.score(F.relu(features)))  # [B, 1, H, W]
        return (score * F.normalize(features, dim=1)).flatten(2).mean(-1)
