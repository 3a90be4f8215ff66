"""A frozen timm model that returns the tokens (and, on request, attention) of one block."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from torch import nn

from mim_agg.backbones.architectures import reader_for, takes_img_size
from mim_agg.backbones.loading import load_checkpoint_into
from mim_agg.backbones.tokens import (
    TokenLayout,
    TokenRequest,
    Tokens,
    center_window,
    window_attention,
)
from mim_agg.errors import ConfigError, UserError

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # backbone.dtype
DEFAULT_DTYPE = "float32"


class FrozenBackbone(nn.Module):
    """A timm ViT (or Hiera, or ConvNeXt) that never trains.

    Blocks after ``block`` are pruned, so asking for an early block also saves compute. The
    module stays in eval mode whatever Lightning asks, holds no trainable parameters and runs
    under ``torch.inference_mode``. What it returns besides the block's tokens is set by
    ``provide(request)``: the ``[cls]`` row of the block's attention and the head-mean rows of
    its central ``K x K`` window of patches (only that block computes explicit attention, every
    other keeps timm's fused kernel, and only those rows are kept), and the ``[cls]`` of the
    last blocks (DINOv2's linear probe). Earlier blocks can be tapped in
    the same pass (``provide(request, block)``, ``forward_blocks``).
    """

    def __init__(
        self,
        arch: str,
        weights: str | None = None,
        block: int = -1,
        final_norm: bool = False,
        img_size: int = 224,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        family: str | None = None,
        arch_kwargs: dict | None = None,
        url: str | None = None,
        sha256: str | None = None,
        dtype: str = DEFAULT_DTYPE,
        summary_tokens: int | None = None,
    ) -> None:
        """The keys of ``conf/backbone/*.yaml``, whose defaults are these (a config says only
        what differs):

        weights: a timm pretrained tag, a checkpoint file, or None (random, from ``seed``).
        block: whose tokens, counted from 0; -1 = the last block.
        final_norm: False probes the block's tokens before the final LayerNorm, as the paper.
        img_size: the input resolution; a multiple of the patch size.
        mean, std: None = the timm tag's pretrained statistics (ImageNet's for files / random).
        arch_kwargs: further timm arguments the checkpoint needs (MoCo v3 ViT-S: 12 heads).
        family: mim | jea | hybrid | vlm | generative | none (random weights), recorded for
            figures and reports.
        url, sha256: where a ``weights`` file comes from (``scripts/download_weights.py``);
            they play no part here.
        dtype: the weights' precision, float32 or bfloat16. bfloat16 halves the memory of the
            models that need it (ViT-7B: 28 GB in float32, EVA-02 CLIP E-14: 17 GB) and
            computes in it, images included; a GPU's bf16 autocast computes in it anyway, but
            its normalisations then see bfloat16 inputs: other numbers, another run and cache.
        summary_tokens: how many prefix tokens, from the first, summarise the image (None: the
            ``[cls]`` alone): RADIO's one per teacher, which ``backbone.linear_input=summary``
            reads concatenated, as their k-NN and linear probe do. A file that names its
            summary tokens (RADIO's) must name these.
        """
        super().__init__()
        self.family = family
        self.weight_dtype = weight_dtype(dtype)
        self.model = create_model(
            arch, weights, img_size, self.weight_dtype, summary_tokens, **(arch_kwargs or {})
        )
        self.reader = reader_for(self.model, arch, img_size)
        self.summary_tokens = summary_tokens
        unit = self.reader.size_multiple
        if img_size % unit:
            raise UserError(
                f"backbone.img_size={img_size} is no multiple of {arch}'s {self.reader.size_unit} "
                f"{unit}: its last {img_size % unit} pixels would be cut off silently. Use "
                f"backbone.img_size={img_size // unit * unit} or {(img_size // unit + 1) * unit}."
            )
        depth = self.reader.depth
        if not -depth <= block < depth:
            raise ConfigError(
                f"backbone.block={block} is out of range for {arch} ({depth} blocks)."
            )
        self.block = block % depth
        self.reader.prune(self.block, final_norm)
        self.final_norm = final_norm
        self.img_size = img_size
        self.mean, self.std = resolve_normalization(weights, mean, std)
        self.layout = self.layout_at(self.block)
        self.requests = {self.block: TokenRequest(tokens=True)}
        self._watched: set[int] = set()  # blocks whose attention rows are kept
        self._attention: dict[int, dict[str, torch.Tensor]] = {}
        self.requires_grad_(False)
        self.eval()

    def layout_at(self, block: int) -> TokenLayout:
        """The layout of block ``block``'s tokens (any block up to the deepest kept one), read
        from the model (``mim_agg/backbones/architectures.py``), its summary tokens from
        ``summary_tokens`` where set."""
        layout = self.reader.layout(block)
        if self.summary_tokens is None:
            return layout
        if not layout.has_cls:
            raise ConfigError(
                f"backbone.summary_tokens={self.summary_tokens}: this model has no [cls] token, "
                "so no summary tokens; leave backbone.summary_tokens null."
            )
        if not 1 <= self.summary_tokens <= layout.num_prefix_tokens:
            raise ConfigError(
                f"backbone.summary_tokens={self.summary_tokens} must lie in [1, "
                f"{layout.num_prefix_tokens}]: this model's prefix tokens, the [cls] first; "
                "null reads the [cls] alone."
            )
        return dataclasses.replace(layout, num_summary_tokens=self.summary_tokens)

    @property
    def request(self) -> TokenRequest:
        return self.requests[self.block]

    def provide(self, request: TokenRequest, block: int | None = None) -> None:
        """Also return what ``request`` asks of block ``block`` (default: the probed one; any
        earlier block is tapped in the same pass, see ``forward_blocks``), its oracle part
        excepted."""
        block = self.block if block is None else block
        if not 0 <= block <= self.block:
            raise ConfigError(
                f"Block {block} is not among the blocks 0..{self.block} this backbone keeps."
            )
        layout = self.layout_at(block)
        if request.cls_blocks > layout.depth:
            raise ConfigError(
                f"{request.cls_blocks} blocks' [cls] tokens were asked for, but backbone.block="
                f"{block} leaves only {layout.depth}."
            )
        if (request.cls_blocks > 1 or request.cls_attn) and not layout.has_cls:
            raise ConfigError(
                "The aggregators read the [cls] token's attention or several blocks' [cls]; this "
                "backbone has no [cls] token."
            )
        if request.center_rows:  # the window must fit both grid axes
            center_window(layout.grid[0], request.center_rows)
            center_window(layout.grid[1], request.center_rows)
        own_part = TokenRequest(
            cls_attn=request.cls_attn,
            cls_blocks=request.cls_blocks,
            center_rows=request.center_rows,
        )  # the oracle and pooled parts are others'
        merged = self.requests.get(block, TokenRequest(tokens=True)) | own_part
        if (merged.cls_attn or merged.center_rows) and block not in self._watched:
            keep = functools.partial(self._keep_rows, block, layout)
            watch_attention(self.reader.attention(block), keep)
            self._watched.add(block)
        self.requests[block] = merged

    def _keep_rows(self, block: int, layout: TokenLayout, attn: torch.Tensor) -> None:
        """The rows block ``block``'s request asks for, copied, so the full ``[B, H, T, T]``
        map is freed: the ``[cls]`` -> patch row of every head, the head-mean rows of the
        central window."""
        request, kept = self.requests[block], {}
        if request.cls_attn:
            kept["cls_attn"] = attn[:, :, 0, layout.num_prefix_tokens :].clone()
        if request.center_rows:
            kept["center_attn"] = window_attention(attn, layout, request.center_rows)
        self._attention[block] = kept

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stay in eval mode: dropout, drop-path and batch statistics must never change."""
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Tokens:
        """The probed block's ``Tokens``."""
        return self.forward_blocks(images)[self.block]

    @torch.inference_mode()
    def forward_blocks(self, images: torch.Tensor) -> dict[int, Tokens]:
        """``Tokens`` of every block ``provide`` was asked for, from one pass of the model
        (a layer-wise sweep pays for the deepest block only)."""
        wanted = {
            index
            for block, request in self.requests.items()
            for index in range(block - request.cls_blocks + 1, block + 1)
        }
        indices = sorted(wanted)
        outputs = self.reader.tokens(images.to(self.weight_dtype), indices, norm=self.final_norm)
        by_index = dict(zip(indices, outputs, strict=True))
        attention, self._attention = self._attention, {}
        return {
            block: self._tokens_of(block, by_index, attention.get(block, {}))
            for block in self.requests
        }

    def _tokens_of(self, block: int, by_index: dict, attention: dict) -> Tokens:
        """Block ``block``'s ``Tokens`` (prefix first) and, where asked, the ``[cls]`` of the
        blocks before it."""
        cls_blocks = self.requests[block].cls_blocks
        block_cls = None
        if cls_blocks > 1:
            taken = range(block - cls_blocks + 1, block + 1)
            block_cls = torch.stack([by_index[i][:, 0] for i in taken], dim=1)
        return Tokens(self.layout_at(block), by_index[block], block_cls=block_cls, **attention)


def watch_attention(attn_module: nn.Module, keep) -> torch.utils.hooks.RemovableHandle:
    """Call ``keep(attn)`` with the softmax attention ``[B, H, T, T]`` of every forward pass.

    timm's fused kernel never materialises the attention, so it is switched off for this
    module; its ``attn_drop`` (identity in eval) then receives the softmax output.
    """
    if not hasattr(attn_module, "attn_drop"):
        raise ConfigError(
            f"{type(attn_module).__name__} does not expose its attention weights, which the "
            "aggregator or analysis needs."
        )
    attn_module.fused_attn = False
    return attn_module.attn_drop.register_forward_hook(lambda _m, _i, output: keep(output))


def skeleton(**backbone_config) -> FrozenBackbone:
    """The backbone's architecture without its weights, on the meta device (no memory, no
    download): what aggregators need to be built and checked before any weights are fetched."""
    with torch.device("meta"):
        return FrozenBackbone(**{**backbone_config, "weights": None})


def weight_dtype(name: str) -> torch.dtype:
    """``backbone.dtype`` as a torch dtype; another name is refused, naming the choices."""
    if name not in WEIGHT_DTYPES:
        raise ConfigError(
            f"backbone.dtype={name!r} is no weight precision mim_agg loads; use "
            f"{' or '.join(WEIGHT_DTYPES)}."
        )
    return WEIGHT_DTYPES[name]


def create_model(
    arch: str,
    weights: str | None,
    img_size: int,
    dtype: torch.dtype,
    summary_tokens: int | None = None,
    **arch_kwargs,
) -> nn.Module:
    """Build ``arch`` (with ``arch_kwargs``, e.g. ``num_heads``) in ``dtype`` with random,
    timm-pretrained (tag) or file weights (whose summary tokens, where it names them, must be
    the first ``summary_tokens``)."""
    if arch not in timm.list_models():
        raise ConfigError(
            f"backbone.arch={arch!r} is not a timm architecture; see timm.list_models('vit_*')."
        )
    kwargs = dict(num_classes=0, **arch_kwargs)
    if takes_img_size(arch):
        kwargs["img_size"] = img_size
    if weights is None:
        return timm_model(arch, False, dtype, **kwargs)
    if is_timm_tag(weights):
        if weights.split(".")[0] != arch:
            raise ConfigError(
                f"backbone.weights={weights!r} belongs to another architecture than "
                f"backbone.arch={arch!r}; use matching arch and tag."
            )
        try:
            return timm_model(weights, True, dtype, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:  # hub errors are OSErrors
            raise UserError(
                f"timm could not fetch the weights backbone.weights={weights!r} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}): the Hugging Face "
                "hub is unreachable and they are not in its cache. Pass a checkpoint file "
                "(backbone.weights=/path/to/model.safetensors or .pth), or fill the cache on a "
                f'machine online with the same HF_HOME: python -c "import timm; '
                f"timm.create_model('{weights}', pretrained=True)\""
            ) from None
    model = timm_model(arch, False, dtype, **kwargs)
    load_checkpoint_into(model, weights, summary_tokens)
    return model


def timm_model(name: str, pretrained: bool, dtype: torch.dtype, **kwargs) -> nn.Module:
    """timm's model ``name``, its parameters built in ``dtype`` directly (timm's ``dtype``
    argument), so a bfloat16 model never exists in float32: a tag's or a file's tensors are
    converted as they are copied in. A class that takes no ``dtype`` (CAPI's) is refused by
    name in bfloat16."""
    if dtype == torch.float32:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, dtype=dtype, **kwargs)
    except TypeError as error:
        if "'dtype'" not in str(error):
            raise
        raise ConfigError(
            f"backbone.dtype=bfloat16: {name.split('.')[0]} cannot be built in it (its model "
            "class takes no dtype); use backbone.dtype=float32."
        ) from None


def is_timm_tag(weights: str) -> bool:
    """``arch.tag`` names a timm pretrained config; anything that exists on disk is a file."""
    return not Path(weights).exists() and weights in timm.list_pretrained(weights)


def resolve_normalization(
    weights: str | None, mean: list[float] | None = None, std: list[float] | None = None
) -> tuple[list[float], list[float]]:
    """Explicit config wins; else the timm tag's pretrained config; else ImageNet statistics.

    Needs no model, so data can be checked before any weights are fetched.
    """
    default_mean, default_std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if weights is not None and is_timm_tag(weights):
        pretrained_cfg = get_pretrained_cfg(weights)
        default_mean, default_std = pretrained_cfg.mean, pretrained_cfg.std
    return list(mean or default_mean), list(std or default_std)
