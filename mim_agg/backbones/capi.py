"""CAPI's encoder (Darcet et al., 2025, "Cluster and Predict Latent Patches for Improved Masked
Image Modeling", arXiv:2502.08769) as a timm model; its published weights are converted by
``mim_agg/backbones/formats/capi.py``.

timm holds no architecture that fits CAPI: it has registers but no ``[cls]`` and no absolute
position embedding, RMSNorm, separate bias-free q/k/v projections, bias-free MLPs, no layer scale,
and a 2-d rotary embedding whose frequencies are a ``[2, head_dim]`` parameter of every block.
Only the encoder is rebuilt: the authors' global representation comes from their decoder (mask
tokens cross-attending to the encoder), which a probe of the encoder's tokens never runs.

Positions follow the authors' ``EncoderDecoder.prepare_tokens_and_drop``: patch ``(i, j)`` of an
``h x w`` grid sits at ``(i / (h - 1), j / (w - 1))``, whatever the resolution (no interpolation
is ever needed: a larger image only samples ``[0, 1]`` more finely), and the registers sit on the
border of that square. The rotation is the authors' exactly, quirk included: channel ``c`` turns
by ``coords @ freqs[:, c]`` and is paired with channel ``c +- head_dim / 2`` (``rotate_half``),
while their frequencies give the first half of the channels the row and the second half the
column, so the two channels of a pair turn by different angles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def blocks_to_take(depth: int, indices: int | list[int] | None) -> tuple[list[int], int]:
    """timm's convention for ``forward_intermediates``' ``indices`` (timm keeps its own helper
    in a private module): an int takes the last n blocks, a list the blocks it names (negative
    from the end), None all; also the deepest block needed."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} must lie in [1, {depth}].")
        taken = list(range(depth - indices, depth))
    else:
        taken = [i + depth if i < 0 else i for i in indices]
        if not all(0 <= i < depth for i in taken):
            raise ValueError(f"indices={indices} name blocks outside [0, {depth}).")
    return taken, max(taken)


class CapiRope(nn.Module):
    """2-d rotary embedding: each channel turns by ``coords @ freqs``, a ``[T, head_dim]`` angle.

    ``freqs`` is a parameter because the authors made it one; they train it with a learning-rate
    multiplier of 0 (``optim.rope_lr_mult``), so it keeps its initial value, which
    ``reset_parameters`` reproduces. A checkpoint's own ``freqs`` are loaded nonetheless: they are
    what the authors' model computes with (possibly stored at a lower precision).
    """

    def __init__(self, head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> None:
        super().__init__()
        self.max_freq, self.min_freq = max_freq, min_freq
        self.freqs = nn.Parameter(torch.empty(2, head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``head_dim / 4`` frequencies from ``max_freq`` down to ``min_freq`` (geometric), each
        used twice; the row coordinate drives the first half of the channels, the column the
        second; stored as angular frequencies (times 2 pi)."""
        head_dim = self.freqs.shape[1]
        ratio = self.max_freq / self.min_freq
        steps = torch.linspace(0, -1, head_dim // 4)
        half = torch.cat([self.max_freq * ratio**steps] * 2)
        self.freqs.zero_()
        self.freqs[0, : head_dim // 2] = half
        self.freqs[1, head_dim // 2 :] = half
        self.freqs.mul_(2 * math.pi)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, T, head_dim]``; ``coords``: ``[T, 2]`` (row, column)."""
        angle = coords @ self.freqs
        first, second = x.chunk(2, dim=-1)
        partner = torch.cat([-second, first], dim=-1)
        return x * angle.cos() + partner * angle.sin()


class CapiAttention(nn.Module):
    """Self-attention with bias-free q, k, v and output projections, RoPE on q and k.

    ``fused_attn`` and ``attn_drop`` are timm's hooks: with ``fused_attn`` off the softmax
    attention ``[B, H, T, T]`` is computed explicitly and passes through ``attn_drop`` (an
    identity: CAPI has no attention dropout), where ``watch_attention`` reads it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = CapiRope(self.head_dim)
        self.attn_drop = nn.Identity()

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q = self.rope(heads(self.q_proj), coords)
        k = self.rope(heads(self.k_proj), coords)
        v = heads(self.v_proj)
        if self.fused_attn:
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            mixed = attn @ v
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class CapiMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CapiBlock(nn.Module):
    """Pre-norm block, ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, without layer scale.

    ``ls1`` is an identity on the attention update, kept under timm's name because the
    attention analysis (``mim_agg.analysis.tracing``) reads each block's update there.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = CapiAttention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = CapiMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), coords))
        return x + self.mlp(self.norm2(x))


class CapiEncoder(nn.Module):
    """Registers then patch tokens (no ``[cls]``), ``depth`` blocks, a parameter-free RMSNorm.

    Offers the part of timm's ``VisionTransformer`` interface that ``FrozenBackbone`` uses:
    ``embed_dim``, ``num_prefix_tokens`` (the registers), ``cls_token`` (None), ``patch_embed``,
    ``blocks``, ``norm``, ``forward_intermediates`` and ``prune_intermediate_layers``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_registers: int = 16,
        norm_eps: float = 1e-5,
    ) -> None:
        """``num_classes`` is accepted because timm passes it; CAPI publishes no classifier."""
        super().__init__()
        if num_classes:
            raise ValueError(
                f"CAPI's encoder has no classifier head; got num_classes={num_classes}."
            )
        if num_registers % 4:
            raise ValueError(f"CAPI spreads its registers over 4 edges; got {num_registers}.")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(
                f"CAPI's RoPE needs a head width divisible by 4; embed_dim={embed_dim} with "
                f"num_heads={num_heads} does not give one."
            )
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_registers
        self.cls_token = None
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False
        )
        self.reg_token = nn.Parameter(torch.empty(1, num_registers, embed_dim))
        self.blocks = nn.ModuleList(
            CapiBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' initialisation (``EncoderDecoder.init_weights``), for random-weight
        baselines: Xavier-uniform linear and patch weights, registers ~ N(0, 0.02), RMSNorm
        weights 1, RoPE frequencies from their formula."""
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.reg_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CapiRope):
                module.reset_parameters()

    def token_coords(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """``[P + rows * cols, 2]`` (row, column) positions, in ``like``'s dtype and device.

        Patches span ``[0, 1]`` in row-major order. Register ``k`` of ``4 s`` sits on the
        square's border at ``t = (k mod s) / s`` along edge ``k // s``: ``(t, 0)``, ``(1, t)``,
        ``(1 - t, 1)``, ``(0, 1 - t)``; then scaled to the patches' extent (a no-op unless the
        grid is one patch high or wide, where that extent collapses).
        """
        options = {"dtype": like.dtype, "device": like.device}
        grid = torch.meshgrid(
            torch.linspace(0, 1, rows, **options),
            torch.linspace(0, 1, cols, **options),
            indexing="ij",
        )
        patches = torch.stack(grid, dim=-1).reshape(-1, 2)
        side = self.num_prefix_tokens // 4
        t = torch.arange(side, **options) / side
        zero, one = torch.zeros_like(t), torch.ones_like(t)
        edges = [(t, zero), (one, t), (1 - t, one), (zero, 1 - t)]
        registers = torch.cat([torch.stack(edge, dim=-1) for edge in edges])
        low, high = patches.min(dim=0).values, patches.max(dim=0).values
        return torch.cat([low + registers * (high - low), patches])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Tokens ``[B, P + N, D]`` (registers first), their positions and the patch grid."""
        rows = images.shape[-2] // self.patch_embed.patch_size[0]
        cols = images.shape[-1] // self.patch_embed.patch_size[1]
        patches = self.patch_embed(images)
        registers = self.reg_token.expand(len(images), -1, -1)
        tokens = torch.cat([registers, patches], dim=1)
        return tokens, self.token_coords(rows, cols, patches), (rows, cols)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, registers first: the authors' encoder output (their
        ``registers`` and ``feature_map``); the decoder's global representation is not kept."""
        x, coords, _ = self.embed(images)
        for block in self.blocks:
            x = block(x, coords)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``VisionTransformer.forward_intermediates`` (without its dict output): the
        chosen blocks' patch tokens, ``(patches, prefix)`` pairs with ``return_prefix_tokens``,
        and unless ``intermediates_only`` the normalised last tokens before them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt!r}.")
        take_indices, max_index = blocks_to_take(len(self.blocks), indices)
        batch = len(x)
        x, coords, (rows, cols) = self.embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x, coords)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        patches = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            patches = [
                y.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for y in patches
            ]
        if return_prefix_tokens and self.num_prefix_tokens:
            patches = list(zip(patches, prefix, strict=True))
        if intermediates_only:
            return patches
        return self.norm(x), patches

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` needs (and the final norm)."""
        take_indices, max_index = blocks_to_take(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        return take_indices


default_cfgs = generate_default_cfgs(
    {
        "capi_vitl14": {
            "url": "",  # the authors' file needs converting: FrozenBackbone loads it from disk
            "num_classes": 0,
            "input_size": (3, 224, 224),
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "license": "apache-2.0",
            "paper_ids": "arXiv:2502.08769",
        }
    }
)


@register_model
def capi_vitl14(pretrained: bool = False, **kwargs) -> CapiEncoder:
    """CAPI ViT-L/14: 24 blocks of width 1024, 16 heads of 64, 16 registers (the authors'
    ``default_pretrain_config.yaml``); the only size they publish."""
    if pretrained:
        raise ValueError(
            "CAPI's weights are not on timm's hub: pass the authors' file as backbone.weights "
            "(conf/backbone/capi_vitl.yaml), which mim_agg converts."
        )
    model_args = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_registers=16)
    return build_model_with_cfg(CapiEncoder, "capi_vitl14", pretrained, **{**model_args, **kwargs})
