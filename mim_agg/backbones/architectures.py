"""How ``FrozenBackbone`` reads a timm model: one small reader per family of architectures.

timm's ViTs (``VisionTransformer``, ``Eva``, ``Beit``, and CAPI's encoder here) share one
interface: prefix tokens (``[cls]``, registers, RADIO's per-teacher summaries) before a fixed
patch grid, blocks whose attention passes its softmax through ``attn_drop``, and
``forward_intermediates(..., return_prefix_tokens=True)``. Hiera is hierarchical: no prefix
tokens, a grid and a width that change at each stage, windowed mask-unit attention and tokens
kept in an unrolled order that timm rolls back into the grid. ConvNeXt is convolutional: no
prefix tokens, no attention, a feature map per stage, built for any image size. Each reader
answers the same questions (the layout of a block's tokens, how to prune, the tokens of some
blocks, the module whose attention can be watched), so ``FrozenBackbone`` reads any of them
alike.
"""

from __future__ import annotations

import torch
from timm.models import model_entrypoint
from timm.models.convnext import ConvNeXt
from timm.models.hiera import Hiera
from torch import nn

from mim_agg.backbones.tokens import TokenLayout
from mim_agg.errors import ConfigError


class Reader:
    """What every family shares: the model, its name for messages, a flat list of blocks."""

    size_unit: str  # what ``size_multiple`` is, in words

    def __init__(self, model: nn.Module, arch: str) -> None:
        self.model, self.arch = model, arch

    @property
    def depth(self) -> int:
        return len(self.model.blocks)


class ViTReader(Reader):
    """timm's ViT interface: ``[B, P + N, D]`` tokens, prefix first, at every block."""

    size_unit = "patch size"

    @property
    def size_multiple(self) -> int:
        """What ``img_size`` must be a multiple of, so no pixel is cut off."""
        return self.model.patch_embed.patch_size[0]

    def layout(self, block: int) -> TokenLayout:
        """Read from the model: its prefix tokens (``[cls]`` first when it has one), grid,
        width and the block's heads."""
        has_cls = getattr(self.model, "cls_token", None) is not None
        return TokenLayout(
            dim=self.model.embed_dim,
            num_prefix_tokens=self.model.num_prefix_tokens,
            has_cls=has_cls,
            grid=tuple(self.model.patch_embed.grid_size),
            num_heads=self.model.blocks[block].attn.num_heads,
            depth=block + 1,
            num_summary_tokens=int(has_cls),
        )

    def prune(self, block: int, final_norm: bool) -> None:
        self.model.prune_intermediate_layers([block], prune_norm=not final_norm)

    def tokens(self, images: torch.Tensor, indices: list[int], norm: bool) -> list[torch.Tensor]:
        """``[B, P + N, D]`` of each block in ``indices``, from one pass. Prefix tokens are
        asked for only where there are some: timm's ``Eva`` (PE-Core G, without [cls]) fails
        when asked for none."""
        outputs = self.model.forward_intermediates(
            images,
            indices=indices,
            return_prefix_tokens=self.model.num_prefix_tokens > 0,
            norm=norm,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )  # (patches, prefix) pairs where the model has prefix tokens
        return [torch.cat(out[::-1], dim=1) if isinstance(out, tuple) else out for out in outputs]

    def attention(self, block: int) -> nn.Module:
        """The module whose ``attn_drop`` receives the block's softmax attention."""
        return self.model.blocks[block].attn


class HieraReader(Reader):
    """Hiera (Ryali et al., 2023): four stages; each of the later ones starts by pooling the
    grid 2 x 2 and doubling the width. A block's tokens are its stage's grid in row-major order
    (timm's ``reroll``), so the last block's are the final stage's grid (7 x 7 at 224 px),
    which aggregators and the cache see; no prefix tokens, no ``[cls]``."""

    size_unit = "patch stride x mask-unit size"

    @property
    def size_multiple(self) -> int:
        """A mask unit (8 x 8 tokens at stride 4: 32 px) is the grid's smallest whole cell."""
        return self.model.patch_stride[0] * self.model.mask_unit_size[0]

    def layout(self, block: int) -> TokenLayout:
        rows, columns = self.model.reroll.schedule[block][1]  # that block's grid, as timm rolls it
        return TokenLayout(
            dim=self.model.blocks[block].dim_out,
            num_prefix_tokens=0,
            has_cls=False,
            num_summary_tokens=0,
            grid=(rows, columns),
            num_heads=self.model.blocks[block].attn.heads,
            depth=block + 1,
        )

    def prune(self, block: int, final_norm: bool) -> None:
        if final_norm:
            raise ConfigError(
                f"backbone.final_norm=true: {self.arch} (Hiera) normalises after pooling, in its "
                "classifier head, so its tokens have no final norm; use backbone.final_norm=false."
            )
        self.model.prune_intermediate_layers([block], coarse=False)

    def tokens(self, images: torch.Tensor, indices: list[int], norm: bool) -> list[torch.Tensor]:
        outputs = self.model.forward_intermediates(
            images,
            indices=indices,
            stop_early=True,
            output_fmt="NHWC",
            intermediates_only=True,
            coarse=False,
        )
        return [out.flatten(1, 2) for out in outputs]

    def attention(self, block: int) -> nn.Module:
        raise ConfigError(
            f"{self.arch} (Hiera) does not expose attention maps: its mask-unit attention "
            "attends within windows and pools its queries, so no token's row over the grid "
            "exists to keep. Aggregators that read the backbone's attention (center_attn, and "
            "those of [cls], which Hiera lacks) and task=analyze cannot serve it; pick one that "
            "reads the tokens."
        )


class ConvNeXtReader(Reader):
    """ConvNeXt (Liu et al., 2022), DINOv3's ConvNeXts distilled from its ViT-7B among them:
    four stages of depthwise-convolution blocks, each after a downsampling (the stem 4 x 4, then
    2 x 2) that widens the map. ``block`` indexes the stages, as timm's ``forward_intermediates``
    taps them: a stage's tokens are its feature map in row-major order, the last one's 7 x 7 at
    224 px. No prefix tokens, no ``[cls]``: the model's own output is the global average,
    normalised in its head."""

    size_unit = "total stride"

    def __init__(self, model: nn.Module, arch: str, img_size: int) -> None:
        super().__init__(model, arch)
        self.img_size = img_size  # a convolutional net is built for none: its grid follows it

    @property
    def depth(self) -> int:
        return len(self.model.stages)

    @property
    def size_multiple(self) -> int:
        """The last stage's stride (32 px): each of its cells then covers whole pixels."""
        return self.model.feature_info[-1]["reduction"]

    def layout(self, block: int) -> TokenLayout:
        stage = self.model.feature_info[block]  # width and stride of each stage, as timm lists
        side = self.img_size // stage["reduction"]
        return TokenLayout(
            dim=stage["num_chs"],
            num_prefix_tokens=0,
            has_cls=False,
            num_summary_tokens=0,
            grid=(side, side),
            num_heads=1,  # no attention: aggregators that follow the backbone's heads use one
            depth=block + 1,
        )

    def prune(self, block: int, final_norm: bool) -> None:
        if final_norm:
            self.check_final_norm(block)
        self.model.prune_intermediate_layers([block], prune_norm=not final_norm)

    def check_final_norm(self, block: int) -> None:
        """timm's ConvNeXts normalise the last stage's map (``norm_pre``, the ``head_norm_first``
        ones) or only the pooled vector, in the head (the rest, DINOv3's and the original
        ConvNeXts among them): their tokens have a final norm in the first case only."""
        if isinstance(self.model.norm_pre, nn.Identity):
            raise ConfigError(
                f"backbone.final_norm=true: {self.arch} (ConvNeXt) normalises after pooling, in "
                "its classifier head, so its tokens have no final norm; use "
                "backbone.final_norm=false."
            )
        if block != self.depth - 1:
            raise ConfigError(
                f"backbone.final_norm=true: {self.arch} (ConvNeXt)'s final norm is sized for its "
                f"last stage, not stage {block}; use backbone.final_norm=false or "
                "backbone.block=-1."
            )

    def tokens(self, images: torch.Tensor, indices: list[int], norm: bool) -> list[torch.Tensor]:
        outputs = self.model.forward_intermediates(
            images,
            indices=indices,
            norm=norm,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return [out.flatten(2).transpose(1, 2).contiguous() for out in outputs]

    def attention(self, block: int) -> nn.Module:
        raise ConfigError(
            f"{self.arch} (ConvNeXt) has no attention maps: it mixes tokens with depthwise "
            "convolutions, so no token attends to any. Aggregators that read the backbone's "
            "attention (center_attn, and those of [cls], which ConvNeXt lacks) and task=analyze "
            "cannot serve it; pick one that reads the tokens."
        )


def takes_img_size(arch: str) -> bool:
    """timm's ConvNeXt takes no ``img_size`` argument: a convolutional net is built for any
    size (``ConvNeXtReader`` reads its grids from the size). Every other family takes one."""
    return model_entrypoint(arch).__module__ != ConvNeXt.__module__


def reader_for(model: nn.Module, arch: str, img_size: int) -> Reader:
    """The reader of ``model``'s family; an architecture none reads is refused by name."""
    if isinstance(model, Hiera):
        return HieraReader(model, arch)
    if isinstance(model, ConvNeXt):
        return ConvNeXtReader(model, arch, img_size)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and hasattr(model, "blocks") and hasattr(model, "forward_intermediates"):
        return ViTReader(model, arch)
    raise ConfigError(
        f"backbone.arch={arch} builds a {type(model).__name__}, which mim_agg cannot read: it "
        "reads timm's ViTs (a fixed patch grid after prefix tokens), Hiera and ConvNeXt. For a "
        "NaFlex model use its fixed-resolution twin (naflexvit_base_patch16_siglip -> "
        "vit_base_patch16_siglip_224, naflexvit_base_patch16_radio_v3 -> "
        "vit_base_patch16_radio_v3)."
    )
