"""Franca's published checkpoint layout (valeoai/Franca: the DINOv2 codebase's training file,
FSDP-chunked blocks, fused SwiGLU) read into ``vit_large_patch14_franca``, against a reference
forward written here from the authors' modules (``franca/models/vision_transformer.py``,
``franca/layers``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mim_agg.backbones import FrozenBackbone, formats
from mim_agg.backbones.franca import swiglu_ratio
from mim_agg.errors import ConfigError

DIM, DEPTH, HEADS, CHUNKS, PATCH = 64, 4, 2, 2, 14
HIDDEN = (int(4 * DIM * 2 / 3) + 7) // 8 * 8  # their SwiGLUFFNFused's width: 176
GRID = 3  # the file's position table: 3 x 3 patches at 42 px
SMALL = {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}
ARCH = "vit_large_patch14_franca"


def authors_checkpoint(seed: int = 0) -> dict:
    """``{"teacher": ...}`` as their training saves it: ``backbone.`` keys, block ``i`` in
    chunk ``i // (depth / chunks)`` (the index counted over all chunks), and the heads."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(shape, generator=generator) * scale

    teacher = {
        "backbone.cls_token": rand(1, 1, DIM),
        "backbone.pos_embed": rand(1, 1 + GRID * GRID, DIM),
        "backbone.mask_token": rand(1, DIM),
        "backbone.patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
        "backbone.patch_embed.proj.bias": rand(DIM),
        "backbone.norm.weight": 1 + rand(DIM),
        "backbone.norm.bias": rand(DIM),
        "dino_head.mlp.0.weight": rand(8, DIM),
        "ibot_head.mlp.0.weight": rand(8, DIM),
    }
    for i in range(DEPTH):
        block = f"backbone.blocks.{i // (DEPTH // CHUNKS)}.{i}."
        teacher |= {
            block + "norm1.weight": 1 + rand(DIM),
            block + "norm1.bias": rand(DIM),
            block + "attn.qkv.weight": rand(3 * DIM, DIM),
            block + "attn.qkv.bias": rand(3 * DIM),
            block + "attn.proj.weight": rand(DIM, DIM),
            block + "attn.proj.bias": rand(DIM),
            block + "ls1.gamma": rand(DIM, scale=1.0),
            block + "norm2.weight": 1 + rand(DIM),
            block + "norm2.bias": rand(DIM),
            block + "mlp.w12.weight": rand(2 * HIDDEN, DIM),
            block + "mlp.w12.bias": rand(2 * HIDDEN),
            block + "mlp.w3.weight": rand(DIM, HIDDEN),
            block + "mlp.w3.bias": rand(DIM),
            block + "ls2.gamma": rand(DIM, scale=1.0),
        }
    return {"teacher": teacher}


def reference_tokens(teacher: dict, images: torch.Tensor) -> torch.Tensor:
    """Their ViT on its own grid (no position interpolation), written from their modules:
    pre-norm blocks ``x + ls1 * attn(norm1(x))``, ``x + ls2 * w3(silu(a) * b)`` with ``a, b``
    the halves of ``w12``, LayerNorm eps 1e-6, then the final norm."""
    w = {k.removeprefix("backbone."): v for k, v in teacher.items()}
    x = F.conv2d(images, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], dim=1) + w["pos_embed"]
    head_dim = DIM // HEADS
    for i in range(DEPTH):
        p = {k.split(f"blocks.{i // (DEPTH // CHUNKS)}.{i}.")[1]: v for k, v in w.items()
             if k.startswith(f"blocks.{i // (DEPTH // CHUNKS)}.{i}.")}  # fmt: skip
        h = F.layer_norm(x, (DIM,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.unflatten(-1, (3, HEADS, head_dim)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).flatten(2)
        x = x + p["ls1.gamma"] * F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        a, b = F.linear(h, p["mlp.w12.weight"], p["mlp.w12.bias"]).chunk(2, dim=-1)
        x = x + p["ls2.gamma"] * F.linear(F.silu(a) * b, p["mlp.w3.weight"], p["mlp.w3.bias"])
    return F.layer_norm(x, (DIM,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def test_the_published_layout_gives_the_authors_tokens(tmp_path):
    checkpoint = authors_checkpoint()
    torch.save(checkpoint, tmp_path / "franca_vitl14_Laion600M.pth")
    backbone = FrozenBackbone(
        ARCH, str(tmp_path / "franca_vitl14_Laion600M.pth"), img_size=GRID * PATCH,
        final_norm=True, arch_kwargs=SMALL,
    )  # fmt: skip
    images = torch.randn(
        2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1)
    )
    tokens = backbone(images)
    expected = reference_tokens(checkpoint["teacher"], images)
    torch.testing.assert_close(tokens.all, expected, rtol=1e-5, atol=1e-5)
    assert (backbone.layout.num_prefix_tokens, backbone.layout.has_cls) == (1, True)


def test_the_sizes_are_the_authors():
    """ViT-L's SwiGLU is 2736 wide (their rounding of 4 x 1024 x 2/3), the test's 176."""
    assert int(1024 * swiglu_ratio(1024)) == 2 * 2736
    assert int(DIM * swiglu_ratio(DIM)) == 2 * HIDDEN


def test_franca_and_ibot_files_are_told_apart():
    checkpoint = authors_checkpoint()
    assert formats.recognise(checkpoint).name == "franca"
    ibot = {"teacher": {"backbone.blocks.0.norm1.weight": torch.ones(2), "head.last.w": None}}
    assert formats.recognise(ibot).name == "ibot"


def test_a_franca_file_in_another_architecture_names_the_format(tmp_path):
    torch.save(authors_checkpoint(), tmp_path / "franca.pth")
    with pytest.raises(ConfigError, match=r"(?s)\(franca format\) does not fit.*mlp\.fc1"):
        FrozenBackbone(
            "vit_large_patch14_dinov2", str(tmp_path / "franca.pth"), img_size=GRID * PATCH,
            arch_kwargs=SMALL,
        )  # fmt: skip
