"""CBAM channel then spatial attention over the 2-D patch grid, then average pooling."""

from __future__ import annotations

from timm.layers.cbam import CbamModule
from torch.nn import functional as F

from mim_agg.aggregators.base import Aggregator, register
from mim_agg.aggregators.token_sets import check_token_set
from mim_agg.errors import ConfigError


@register("cbam_pool")
class CbamPool(Aggregator):
    """CBAM (Woo et al., ECCV 2018) as efficient-probing pools with it (its ``cbam``:
    ``CbamPooling(channels=D, spatial_kernel_size=7)``, ``poolings/cbam.py``, built from timm's
    CBAM modules, which this uses: ``timm.layers.cbam.CbamModule``), which the defaults give.

    On the patch grid ``x = [B, D, H, W]``: channel attention (the spatial mean and the spatial
    max each through a shared ``D -> D/16 -> D`` 1x1-convolution MLP without biases, ReLU;
    summed, sigmoid), then spatial attention (the channel mean and max, a 7x7 convolution
    without bias, ``BatchNorm2d(1)``, sigmoid); then ``relu(x + cbam(x))`` averaged over the
    grid. ``D^2 / 8 + 100`` parameters (73,828 at D = 768): the two MLP maps, the 98 kernel
    weights and the norm's 2.

    efficient-probing has no ``cbam_all`` that runs (``1 + N`` tokens are no square grid);
    here ``tokens=all`` is refused at build time.

    Options:
        kernel_size: the spatial attention's convolution (theirs: 7); odd.
        tokens: ``patch`` only (the grid has no place for ``[cls]``).
    """

    def __init__(self, layout, *, kernel_size: int = 7, tokens: str = "patch"):
        super().__init__(layout)
        check_token_set(layout, tokens, self.name, grid=True)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"aggregator.kernel_size={kernel_size} must be odd and positive.")
        self.cbam = CbamModule(layout.dim, spatial_kernel_size=kernel_size)

    def forward(self, tokens):
        grid = tokens.patches.transpose(1, 2).unflatten(-1, self.layout.grid)
        return F.relu(self.cbam(grid) + grid).mean(dim=(2, 3))
