"""CAPI's encoder (mim_agg/backbones/capi.py) against a reference forward written here from the
authors' description, on checkpoints in their published key layout (``backbone.`` + their
``EncoderDecoder`` names, decoder and prediction head beside the encoder; random values, small
width and depth) and, on the meta device, at the real ViT-L/14 names and shapes."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mim_agg.backbones import FrozenBackbone, formats
from mim_agg.backbones.formats.capi import convert_capi, is_capi
from mim_agg.backbones.frozen import skeleton, watch_attention

PATCH, REGISTERS, EPS = 14, 16, 1e-5
SMALL = {"embed_dim": 128, "depth": 2, "num_heads": 2}  # heads of 64 channels, as in ViT-L
SIZE = 56  # a 4 x 4 grid


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """The paper's RoPE: ``head_dim / 4`` frequencies 7 * 10^(-4 k / (n - 1)) (7 down to 7e-4),
    angular, each used twice; rows drive the first half of the channels, columns the second."""
    n = head_dim // 4
    freqs = torch.zeros(2, head_dim)
    for c in range(head_dim // 2):
        omega = 2 * math.pi * 7 * 10 ** (-4 * (c % n) / (n - 1))
        freqs[0, c] = omega
        freqs[1, head_dim // 2 + c] = omega
    return freqs


def authors_checkpoint(
    dim: int = 128,
    depth: int = 2,
    heads: int = 2,
    decoder_depth: int = 1,
    clusters: int = 32,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Their ``student_ema`` state dict: ``backbone.`` (``EncoderDecoder``: registers, patch
    conv, encoder and cross-attending decoder blocks, mask token; parameter-free final norms)
    and ``head.`` (the weight-normed prediction head)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(*shape, generator=generator) * scale

    def blocks(name: str, count: int) -> dict[str, torch.Tensor]:
        state = {}
        for i in range(count):
            block = {
                "residual1.norm.weight": 1 + rand(dim, scale=0.1),
                "residual1.fn.q_proj.weight": rand(dim, dim, scale=dim**-0.5),
                "residual1.fn.k_proj.weight": rand(dim, dim, scale=dim**-0.5),
                "residual1.fn.v_proj.weight": rand(dim, dim, scale=dim**-0.5),
                "residual1.fn.proj.weight": rand(dim, dim, scale=dim**-0.5),
                "residual1.fn.rope.freqs": rope_frequencies(dim // heads).to(device)
                * (1 + rand(2, dim // heads, scale=0.01)),
                "residual2.norm.weight": 1 + rand(dim, scale=0.1),
                "residual2.fn.fc1.weight": rand(4 * dim, dim, scale=dim**-0.5),
                "residual2.fn.fc2.weight": rand(dim, 4 * dim, scale=(4 * dim) ** -0.5),
            }
            state.update({f"backbone.{name}.blocks.{i}.{k}": v for k, v in block.items()})
        return state

    return {
        "backbone.mask_token": rand(1, dim, scale=0.02),
        "backbone.registers": rand(1, REGISTERS, dim, scale=1.0),
        "backbone.patch_embed.weight": rand(dim, 3, PATCH, PATCH, scale=0.05),
        "backbone.patch_embed.bias": rand(dim, scale=0.1),
        **blocks("encoder", depth),
        **blocks("decoder", decoder_depth),
        "head.last_layer.weight_g": rand(clusters, 1, scale=1.0),
        "head.last_layer.weight_v": rand(clusters, dim, scale=0.02),
    }


def positions(rows: int, cols: int) -> torch.Tensor:
    """(row, column) of the registers, then of the patches in row-major order: patches evenly
    over [0, 1] x [0, 1]; register k on the border, edges (t, 0), (1, t), (1 - t, 1), (0, 1 - t)
    with t = (k mod 4) / 4, scaled to the patches' extent."""
    patches = torch.tensor(
        [
            [i / (rows - 1) if rows > 1 else 0.0, j / (cols - 1) if cols > 1 else 0.0]
            for i in range(rows)
            for j in range(cols)
        ]
    )
    side = REGISTERS // 4
    registers = []
    for k in range(REGISTERS):
        edge, t = k // side, (k % side) / side
        registers.append([(t, 0.0), (1.0, t), (1 - t, 1.0), (0.0, 1 - t)][edge])
    low, high = patches.min(0).values, patches.max(0).values
    return torch.cat([low + torch.tensor(registers) * (high - low), patches])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return x if weight is None else x * weight


def rotary(t: torch.Tensor, freqs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The paper's RoPE on ``[B, H, T, C]``: channel c turns by row * freqs[0, c] + column *
    freqs[1, c], paired with channel c + C / 2 (first half) or c - C / 2 (second half)."""
    angle = coords[:, :1] * freqs[0] + coords[:, 1:] * freqs[1]
    cos, sin, half = angle.cos(), angle.sin(), t.shape[-1] // 2
    first, second = t[..., :half], t[..., half:]
    return torch.cat(
        [
            first * cos[:, :half] - second * sin[:, :half],
            second * cos[:, half:] + first * sin[:, half:],
        ],
        dim=-1,
    )


def reference(state: dict, images: torch.Tensor, heads: int):
    """Every encoder block's tokens and softmax attention, and the normalised last tokens.

    Pre-norm blocks without biases or layer scale: x += proj(attn(RMSNorm(x))) with RoPE on
    q and k, x += fc2(GELU(fc1(RMSNorm(x)))); a parameter-free RMSNorm at the end.
    """
    w = {k.removeprefix("backbone."): v for k, v in state.items()}
    batch, (rows, cols) = len(images), (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
    x = F.conv2d(images, w["patch_embed.weight"], w["patch_embed.bias"], stride=PATCH)
    x = torch.cat([w["registers"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    coords = positions(rows, cols)
    tokens, dim = x.shape[1:]
    head_dim = dim // heads
    outputs, attentions = [], []
    depth = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder."))
    for i in range(depth):
        b = {
            k.removeprefix(f"encoder.blocks.{i}."): v
            for k, v in w.items()
            if k.startswith(f"encoder.blocks.{i}.")
        }
        h = rms_norm(x, b["residual1.norm.weight"])
        q, k, v = (
            (h @ b[f"residual1.fn.{name}.weight"].T)
            .view(batch, tokens, heads, head_dim)
            .transpose(1, 2)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        q = rotary(q, b["residual1.fn.rope.freqs"], coords)
        k = rotary(k, b["residual1.fn.rope.freqs"], coords)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + mixed @ b["residual1.fn.proj.weight"].T
        h = rms_norm(x, b["residual2.norm.weight"])
        x = x + F.gelu(h @ b["residual2.fn.fc1.weight"].T) @ b["residual2.fn.fc2.weight"].T
        outputs.append(x)
        attentions.append(attention)
    return outputs, attentions, rms_norm(x)


def small_model(state: dict) -> torch.nn.Module:
    model = timm.create_model("capi_vitl14", num_classes=0, img_size=SIZE, **SMALL).eval()
    model.load_state_dict(convert_capi(state), strict=True)
    return model


def images(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("height, width", [(42, 56), (14, 42)])  # 3 x 4 and 1 x 3 grids
def test_every_block_gives_the_reference_tokens(height, width):
    state = authors_checkpoint()
    model, batch = small_model(state), images(height, width)
    blocks, _, normed = reference(state, batch, heads=2)
    with torch.inference_mode():
        outputs = model.forward_intermediates(
            batch, [0, 1], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        for (patches, prefix), expected in zip(outputs, blocks, strict=True):
            assert prefix.shape[1] == REGISTERS
            torch.testing.assert_close(
                torch.cat([prefix, patches], 1), expected, atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(model(batch), normed, atol=1e-5, rtol=1e-5)


def test_watched_attention_is_the_reference_softmax():
    state = authors_checkpoint(seed=1)
    model, batch = small_model(state), images()
    seen = []
    watch_attention(model.blocks[-1].attn, seen.append)
    with torch.inference_mode():
        model.forward_intermediates(batch, indices=[1], output_fmt="NLC", intermediates_only=True)
    _, attentions, _ = reference(state, batch, heads=2)
    (attention,) = seen
    assert attention.shape == (2, 2, REGISTERS + 16, REGISTERS + 16)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, REGISTERS + 16))
    torch.testing.assert_close(attention, attentions[-1], atol=1e-5, rtol=1e-5)


def test_frozen_backbone_loads_the_authors_file(tmp_path):
    state = authors_checkpoint(seed=2)
    torch.save(state, tmp_path / "capi_vitl14_lvd.pth")
    batch = images()
    blocks, _, _ = reference(state, batch, heads=2)
    path = str(tmp_path / "capi_vitl14_lvd.pth")
    backbone = FrozenBackbone("capi_vitl14", path, img_size=SIZE, arch_kwargs=SMALL)
    layout = backbone.layout
    assert (layout.has_cls, layout.num_prefix_tokens, layout.grid) == (False, REGISTERS, (4, 4))
    assert (layout.dim, layout.num_heads, layout.depth) == (128, 2, 2)
    torch.testing.assert_close(backbone(batch).all, blocks[-1], atol=1e-5, rtol=1e-5)
    first = FrozenBackbone(
        "capi_vitl14", path, block=0, final_norm=True, img_size=SIZE, arch_kwargs=SMALL
    )
    assert len(first.model.blocks) == 1
    torch.testing.assert_close(first(batch).all, rms_norm(blocks[0]), atol=1e-5, rtol=1e-5)


def test_vitl14_takes_the_published_names_and_shapes():
    state = authors_checkpoint(1024, 24, 16, decoder_depth=12, clusters=16384, device="meta")
    assert formats.recognise(state).name == "capi"
    converted = {k: tuple(v.shape) for k, v in convert_capi(state).items()}
    with torch.device("meta"):
        model = timm.create_model("capi_vitl14", pretrained=False, num_classes=0, img_size=224)
    assert converted == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 303  # README: 302M
    layout = skeleton(arch="capi_vitl14", img_size=224).layout
    assert (layout.dim, layout.num_prefix_tokens, layout.has_cls) == (1024, REGISTERS, False)
    assert (layout.grid, layout.num_heads, layout.depth) == ((16, 16), 16, 24)


def test_random_init_has_the_papers_rope_frequencies():
    model = timm.create_model("capi_vitl14", num_classes=0, img_size=SIZE, **SMALL)
    for block in model.blocks:
        torch.testing.assert_close(block.attn.rope.freqs.detach(), rope_frequencies(64))


def test_the_authors_layout_and_only_it_is_recognised():
    state = authors_checkpoint()
    hub_model = {k.removeprefix("backbone."): v for k, v in state.items() if "backbone." in k}
    assert is_capi(state) and is_capi(hub_model)
    torch.testing.assert_close(convert_capi(hub_model), convert_capi(state))
    vit = {"cls_token": 0, "pos_embed": 0, "blocks.0.attn.qkv.weight": 0, "norm.weight": 0}
    others = {
        "timm": vit,
        "mocov3": {"state_dict": {f"module.base_encoder.{k}": v for k, v in vit.items()}},
        "ibot": {"teacher": {f"backbone.{k}": v for k, v in vit.items()}, "student": {}},
        "mae": {"model": {**vit, "decoder_blocks.0.attn.qkv.weight": 0, "mask_token": 0}},
        "simmim": {f"encoder.{k}": v for k, v in vit.items()},
    }
    for name, checkpoint in others.items():
        assert not is_capi(checkpoint), name


def test_a_renamed_key_is_named_with_the_format(tmp_path):
    state = authors_checkpoint()
    key = "backbone.encoder.blocks.1.residual2.fn.fc1.weight"
    state[key.replace("fc1", "fc_1")] = state.pop(key)
    torch.save(state, tmp_path / "capi.pth")
    with pytest.raises(ValueError, match=r"(?s)capi format.*fc_1\.weight.*missing keys: " + key):
        FrozenBackbone("capi_vitl14", str(tmp_path / "capi.pth"), img_size=SIZE, arch_kwargs=SMALL)


def test_a_checkpoint_of_another_depth_does_not_fit(tmp_path):
    torch.save(authors_checkpoint(depth=1), tmp_path / "capi.pth")
    with pytest.raises(ValueError, match=r"\(capi format\) does not fit.*depth=2"):
        FrozenBackbone("capi_vitl14", str(tmp_path / "capi.pth"), img_size=SIZE, arch_kwargs=SMALL)


def test_blocks_to_take_follows_timms_indices_convention():
    from mim_agg.backbones.capi import blocks_to_take

    assert blocks_to_take(12, None) == (list(range(12)), 11)
    assert blocks_to_take(12, 1) == ([11], 11)
    assert blocks_to_take(12, 3) == ([9, 10, 11], 11)
    assert blocks_to_take(12, [0, -1, 5]) == ([0, 11, 5], 11)
    assert blocks_to_take(12, [2, 4]) == ([2, 4], 4)  # blocks past 4 are never run
    with pytest.raises(ValueError, match="outside"):
        blocks_to_take(12, [12])
