"""What extracting tokens needs of one GPU, computed from the model's sizes, not measured.

The README's memory table and the warning an extraction gives on a GPU with less free memory
both come from ``extraction_memory``; ``tests/test_memory.py`` checks the count against the
allocations a CPU forward of small models makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mim_agg.backbones.architectures import HieraReader, ViTReader
from mim_agg.backbones.frozen import FrozenBackbone, skeleton
from mim_agg.errors import ConfigError
from mim_agg.validation import backbone_arguments

COMPUTE = torch.bfloat16  # what trainer=gpu's autocast computes in


@dataclass(frozen=True)
class ExtractionMemory:
    """Bytes one backbone pass over ``batch_size`` images holds at its peak: ``weights``,
    ``activations`` (the images and the largest set of tensors alive inside one block) and
    ``attention`` (what the tapped block's explicit attention map adds to that peak; 0 when no
    aggregator reads it). CUDA's context and the allocator's slack come on top."""

    batch_size: int
    parameters: int
    weights: int
    activations: int
    attention: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.attention

    def batch_size_within(self, free: int) -> int:
        """The largest batch whose estimate fits in ``free`` bytes (0: not even one image):
        everything but the weights grows with the batch."""
        growing = self.activations + self.attention
        return max(0, (free - self.weights) * self.batch_size // growing)


def extraction_memory(
    backbone_cfg, batch_size: int, reads_attention: bool, autocast: bool = True
) -> ExtractionMemory:
    """What extracting ``backbone_cfg``'s tokens (``cfg.backbone``: its dtype, img_size, block)
    holds on a GPU at ``batch_size`` images, ``reads_attention`` when an aggregator reads the
    block's attention (``[cls]`` rows, ``center_attn``), under bf16 ``autocast`` as
    ``trainer=gpu`` runs (False: everything in the weights' dtype). Read from the model built
    on the meta device (no memory, no download): its parameters and buffers, each kept block's
    tokens, width, projections and heads, RoPE's table.

    Two counts were written before this one: one (the big models') took a block's MLP as its
    peak, the other (DINOv3's) the larger of its attention and its MLP. This follows the
    second, the more complete: under RoPE the attention can be the peak (rotating k in float32
    beside q, k and v outweighs a small MLP), which the first misses. Its MLP is the first's,
    though: a SwiGLU holds four hidden-wide tensors (gate, value, activated gate, product),
    where the second counted three. Per image, in the block whose set is largest, beside the
    images (float32 from the loader, and a copy in bfloat16 weights' dtype):

    - the block's input, in the weights' dtype (the loop over blocks holds it throughout);
    - then either its attention: the pre-norm's output (float32: autocast normalises in
      float32), q, k and v (their projections' widths), and the larger of rotating k (the
      rotated q beside ``x * cos``, ``rot(x) * sin`` and their sum, on the patches, in the
      wider of bfloat16 and RoPE's table: float32 for DINOv3 and EVA-02) and mixing (the
      rotated q and k, the fused attention's output and its heads merged: memory that grows
      with the tokens, never their square);
    - or its MLP: the residual and the attention's update (timm's Eva block holds it; a ViT's
      does not, so one copy too many there), their pre-norm in float32, and twice the width of
      its input projections in bfloat16 (before and after the activation; a SwiGLU's two, a
      fused GLU's one of twice the width).

    Hiera's blocks differ per stage: each is counted with the tokens that enter it and those
    that leave it. ``reads_attention`` makes the tapped block's mixing hold an explicit map,
    ``[heads, T, T]`` logits in bfloat16 and, while autocast's float32 softmax runs, its
    float32 copy of them and its output (measured on an H200: without the copy the count fell
    up to 31% short where the map dominates), and the ``attention`` this returns is what the
    peak grows by (nothing where the MLP's set stays larger); Hiera exposes no map and is
    refused, as its extraction would be. ``tests/test_memory.py`` measures the allocations of
    CPU forwards of small models of each family against this count, ``scripts/gpu_check.py``
    (its ``extraction_memory``) the README's rows on a GPU."""
    backbone = skeleton(**backbone_arguments(backbone_cfg))
    if not isinstance(backbone.reader, ViTReader | HieraReader):
        raise ConfigError(
            f"mim_agg cannot estimate the memory backbone.arch={backbone.reader.arch} needs: it "
            "counts the attention and MLP blocks of timm's ViTs (Eva and Beit among them) and "
            "Hiera."
        )
    weight = backbone.weight_dtype
    compute = COMPUTE if autocast else weight
    sizes = Itemsizes(
        stored=weight.itemsize,
        compute=compute.itemsize,
        normed=(torch.float32 if autocast else weight).itemsize,
        rotary=rotary_itemsize(backbone.model, compute.itemsize),
    )
    blocks = range(backbone.block + 1)
    peak = max(block_bytes(backbone, i, sizes) for i in blocks)
    attention = 0
    if reads_attention:
        backbone.reader.attention(backbone.block)  # refuses a family without maps
        layout = backbone.layout
        upcast = sizes.normed if sizes.normed != sizes.compute else 0  # softmax's float32 input
        per_entry = sizes.compute + upcast + sizes.normed
        explicit = layout.num_heads * layout.num_tokens**2 * per_entry
        attention = max(peak, block_bytes(backbone, backbone.block, sizes, explicit)) - peak
    pixels = 3 * backbone.img_size**2  # float32 from the loader, and a copy in bfloat16 weights'
    images = pixels * (4 + (sizes.stored if weight != torch.float32 else 0))
    tensors = [*backbone.model.parameters(), *backbone.model.buffers()]
    return ExtractionMemory(
        batch_size=batch_size,
        parameters=sum(p.numel() for p in backbone.model.parameters()),
        weights=sum(t.numel() * t.element_size() for t in tensors),
        activations=batch_size * (images + peak),
        attention=batch_size * attention,
    )


@dataclass(frozen=True)
class Itemsizes:
    """Bytes per element: of the weights and the residual stream (``stored``), of autocast's
    matmuls (``compute``), of its normalisations and softmax (``normed``), of RoPE's
    temporaries (``rotary``; None: no RoPE)."""

    stored: int
    compute: int
    normed: int
    rotary: int | None


def block_bytes(backbone: FrozenBackbone, index: int, sizes: Itemsizes, explicit: int = 0) -> int:
    """Per image, the bytes alive at the peak of block ``index`` (``extraction_memory``), whose
    attention computes an ``explicit`` map of that many bytes instead of a fused one."""
    block = backbone.model.blocks[index]
    entering, leaving = backbone.layout_at(max(index - 1, 0)), backbone.layout_at(index)
    elements_in = entering.num_tokens * entering.dim  # per image
    elements_out = leaving.num_tokens * leaving.dim
    compute = sizes.compute
    qkv = entering.num_tokens * input_width(block, "attn", backbone) * compute
    rotating, rotated = 0, 0
    if sizes.rotary is not None:  # the rotated q beside k's three temporaries (on the patches)
        rotating = elements_out * compute + leaving.num_patches * leaving.dim * 3 * sizes.rotary
        rotated = 2 * compute  # then q and k, rotated, beside their originals in qkv
    if explicit:  # q scaled, the map
        mixing = elements_out * (rotated + compute) + explicit
    else:  # the output and its heads merged
        mixing = elements_out * (rotated + 2 * compute)
    attention = elements_in * sizes.normed + qkv + max(rotating, mixing)
    hidden = leaving.num_tokens * 2 * input_width(block, "mlp", backbone) * compute
    mlp = elements_out * (2 * sizes.stored + sizes.normed) + hidden
    return elements_in * sizes.stored + max(attention, mlp)


def input_width(block: nn.Module, part: str, backbone: FrozenBackbone) -> int:
    """The summed output width of the input projections of ``block``'s ``part`` (``attn``:
    q, k, v; ``mlp``: fc1, or a SwiGLU's two): every linear layer but the last, the output
    projection."""
    linears = [m for m in getattr(block, part, nn.Identity()).modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ConfigError(
            f"{type(backbone.model).__name__}: mim_agg cannot estimate its memory, its blocks "
            f"have no `{part}` with linear input and output projections (timm's ViT, Eva, Beit "
            "and Hiera blocks have)."
        )
    return sum(linear.out_features for linear in linears[:-1])


def rotary_itemsize(model: nn.Module, compute: int) -> int | None:
    """The itemsize of the rotation's temporaries, or None without RoPE: timm's Eva family
    keeps one table (``model.rope``, float32 or the weights' dtype), multiplied by the
    ``compute``-sized q and k at the wider of the two; CAPI's rotary modules compute their
    angles by a matmul, in the compute dtype."""
    table = getattr(model, "rope", None)
    if table is not None:
        embed = table.get_embed(shape=list(model.patch_embed.grid_size))
        return max(compute, (embed[0] if isinstance(embed, tuple) else embed).dtype.itemsize)
    if any(hasattr(block.attn, "rope") for block in model.blocks):
        return compute
    return None


def memory_warning(need: ExtractionMemory, free: int) -> str | None:
    """Why the extraction may run out of GPU memory, and the ``cache.batch_size`` that fits
    ``free`` bytes by the estimate; None when it fits."""
    if need.total <= free:
        return None
    fits = need.batch_size_within(free)
    advice = (
        f"use cache.batch_size={fits} or less"
        if fits
        else "not even one image fits beside the weights: free the GPU, take a larger one, or "
        "load float32 weights in backbone.dtype=bfloat16"
    )
    return (
        f"cache.batch_size={need.batch_size} needs about {gigabytes(need.total)} on this GPU "
        f"({breakdown(need)}; mim_agg/backbones/memory.py), but only {gigabytes(free)} are "
        f"free: {advice}."
    )


def breakdown(need: ExtractionMemory) -> str:
    """``weights 8.7 GB, activations 5.5 GB``, and the attention map's share where it has one."""
    parts = f"weights {gigabytes(need.weights)}, activations {gigabytes(need.activations)}"
    return parts + (f", attention map {gigabytes(need.attention)}" if need.attention else "")


def gigabytes(size: int) -> str:
    """``size`` bytes as the README's memory table writes them (GB = 10^9 bytes)."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e9:.2f} GB"
