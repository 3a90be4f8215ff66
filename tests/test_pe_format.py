"""Perception Encoder's published PE-Core files (facebookresearch/perception_models) in their
authors' exact key layout (the ``CLIP`` of ``core/vision_encoder/pe.py``: the image tower under
``visual.`` beside the text tower; random values, small widths, the shipped configs' geometry)
load through ``formats/pe.py`` into timm's ``vit_pe_core_*`` and give the tokens of an
independent reference forward written here from the authors' layers: ``[cls]`` (B, L; none in
G) before the row-major patches, absolute positions on every token, ``ln_pre``, pre-norm blocks
(LayerScale where a file has it), 2-d RoPE on every channel of q and k (``rope.py``: the first
half of a head's channels turned by the column, the second by the row, pairs (2j, 2j + 1),
frequencies ``10000 ** -(4j / head_dim)``; positions counted from 1 where a [cls] sits at 0,
unturned), ``ln_post`` as the final norm, and the attention pooling."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone
from mim_agg.backbones.formats import recognise
from mim_agg.backbones.loading import load_checkpoint_into
from mim_agg.builders import build_backbone
from mim_agg.errors import ConfigError
from tests.helpers import compose_config
from tests.test_download import fetch_from_hub

DIM, HEADS, DEPTH, POOL_HEADS, OUT = 32, 2, 2, 8, 24
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# arch: (patch, its pretraining resolution, [cls], MLP width at DIM as their int(DIM * ratio))
SHIPPED = {
    "vit_pe_core_base_patch16_224": (16, 224, True, 4 * DIM),
    "vit_pe_core_gigantic_patch14_448": (14, 448, False, int(DIM * 8960 / 1536)),
}
TINY = {"embed_dim": DIM, "num_heads": HEADS, "depth": DEPTH}


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))


def authors_state(arch: str, seed: int = 0, layer_scale: bool = False, dim: int = DIM) -> dict:
    """``CLIP.state_dict()`` of a tiny PE-Core: ``visual.*`` (conv1 without a bias, the [cls]
    as ``class_embedding [D]``, the positions as ``[T, D]``, ``proj [D, out]``, the pooling's
    ``nn.MultiheadAttention``) and a text tower beside it."""
    patch, size, cls, hidden = SHIPPED[arch]
    grid = size // patch
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    tower = {
        "conv1.weight": rand(dim, 3, patch, patch, scale=0.05),
        **({"class_embedding": rand(dim, scale=1.0)} if cls else {}),
        "positional_embedding": rand(int(cls) + grid * grid, dim, scale=0.5),
        "ln_pre.weight": 1 + rand(dim),
        "ln_pre.bias": rand(dim),
        "ln_post.weight": 1 + rand(dim),
        "ln_post.bias": rand(dim),
        "proj": rand(dim, OUT),
        "attn_pool.probe": rand(1, 1, dim, scale=1.0),
        "attn_pool.attn.in_proj_weight": rand(3 * dim, dim, scale=0.3),
        "attn_pool.attn.in_proj_bias": rand(3 * dim),
        "attn_pool.attn.out_proj.weight": rand(dim, dim),
        "attn_pool.attn.out_proj.bias": rand(dim),
        "attn_pool.layernorm.weight": 1 + rand(dim),
        "attn_pool.layernorm.bias": rand(dim),
        "attn_pool.mlp.c_fc.weight": rand(4 * dim, dim),
        "attn_pool.mlp.c_fc.bias": rand(4 * dim),
        "attn_pool.mlp.c_proj.weight": rand(dim, 4 * dim),
        "attn_pool.mlp.c_proj.bias": rand(dim),
    }
    for i in range(DEPTH):
        block = {
            "ln_1.weight": 1 + rand(dim),
            "ln_1.bias": rand(dim),
            "attn.in_proj_weight": rand(3 * dim, dim, scale=0.3),
            "attn.in_proj_bias": rand(3 * dim),
            "attn.out_proj.weight": rand(dim, dim),
            "attn.out_proj.bias": rand(dim),
            "ln_2.weight": 1 + rand(dim),
            "ln_2.bias": rand(dim),
            "mlp.c_fc.weight": rand(hidden, dim),
            "mlp.c_fc.bias": rand(hidden),
            "mlp.c_proj.weight": rand(dim, hidden),
            "mlp.c_proj.bias": rand(dim),
        }
        if layer_scale:
            block |= {"ls_1.gamma": 0.5 + rand(dim), "ls_2.gamma": 0.5 + rand(dim)}
        tower |= {f"transformer.resblocks.{i}.{k}": v for k, v in block.items()}
    text_width = 16
    text = {
        "token_embedding.weight": rand(50, text_width),
        "positional_embedding": rand(8, text_width),
        "transformer.resblocks.0.attn.in_proj_weight": rand(3 * text_width, text_width),
        "transformer.resblocks.0.ln_1.weight": rand(text_width),
        "ln_final.weight": rand(text_width),
        "ln_final.bias": rand(text_width),
        "text_projection": rand(text_width, OUT),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    return {**{f"visual.{k}": v for k, v in tower.items()}, **text}


def vision(state: dict) -> dict:
    return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}


def layer_norm(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)


def rope_angles(rows: int, cols: int, head_dim: int, cls: bool) -> torch.Tensor:
    """``Rope2D.update_grid``: one angle per channel pair of a head, ``[T, head_dim / 2]``: pairs
    j < head_dim / 4 turned by the column, the others by the row, at frequency
    ``10000 ** -(2 j' / (head_dim / 2))``; a [cls] at position (0, 0)."""
    quarter = head_dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) * 2 / (head_dim // 2))
    angles = []
    for row in range(rows):
        for col in range(cols):
            y, x = row + int(cls), col + int(cls)
            angles.append(torch.cat([x * freqs, y * freqs]))
    if cls:
        angles.insert(0, torch.zeros(2 * quarter))
    return torch.stack(angles)


def turn_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Each pair (x[2j], x[2j + 1]) turned by its angle, written pair by pair."""
    out = torch.empty_like(x)
    cos, sin = angles.cos(), angles.sin()
    for j in range(x.shape[-1] // 2):
        a, b = x[..., 2 * j], x[..., 2 * j + 1]
        out[..., 2 * j] = a * cos[:, j] - b * sin[:, j]
        out[..., 2 * j + 1] = b * cos[:, j] + a * sin[:, j]
    return out


def attention(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over ``[B, heads, T, d]``."""
    return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def reference(state: dict, arch: str, pixels: torch.Tensor, blocks: int = DEPTH) -> torch.Tensor:
    """``VisionTransformer.forward_features`` (norm=False): the tokens after ``blocks`` blocks."""
    patch, _, cls, _ = SHIPPED[arch]
    w, batch, head_dim = vision(state), len(pixels), DIM // HEADS
    x = F.conv2d(pixels, w["conv1.weight"], stride=patch)
    rows, cols = x.shape[-2:]
    x = x.permute(0, 2, 3, 1).reshape(batch, rows * cols, DIM)
    if cls:
        x = torch.cat([w["class_embedding"].expand(batch, 1, DIM), x], dim=1)
    x = layer_norm(x + w["positional_embedding"], w, "ln_pre")
    angles = rope_angles(rows, cols, head_dim, cls)
    for i in range(blocks):
        b = {k.split(f"resblocks.{i}.", 1)[1]: v for k, v in w.items() if f"resblocks.{i}." in k}
        h = layer_norm(x, b, "ln_1")
        qkv = h @ b["attn.in_proj_weight"].T + b["attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (HEADS, head_dim)).transpose(1, 2) for t in qkv.chunk(3, -1))
        mixed = attention(turn_pairs(q, angles), turn_pairs(k, angles), v)
        mixed = mixed.transpose(1, 2).flatten(2) @ b["attn.out_proj.weight"].T
        x = x + b.get("ls_1.gamma", 1) * (mixed + b["attn.out_proj.bias"])
        h = F.gelu(layer_norm(x, b, "ln_2") @ b["mlp.c_fc.weight"].T + b["mlp.c_fc.bias"])
        x = x + b.get("ls_2.gamma", 1) * (h @ b["mlp.c_proj.weight"].T + b["mlp.c_proj.bias"])
    return x


def reference_pool(state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """``AttentionPooling``: the probe queries the (final-normed) tokens through an 8-head
    ``nn.MultiheadAttention``, then a residual MLP on its LayerNorm."""
    w = {k.removeprefix("attn_pool."): v for k, v in vision(state).items() if "attn_pool." in k}
    batch, d = len(tokens), DIM // POOL_HEADS
    wq, wk, wv = w["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w["attn.in_proj_bias"].chunk(3)

    def heads(t):
        return t.unflatten(-1, (POOL_HEADS, d)).transpose(1, 2)

    probe = w["probe"].expand(batch, 1, DIM)
    mixed = attention(
        heads(probe @ wq.T + bq), heads(tokens @ wk.T + bk), heads(tokens @ wv.T + bv)
    )
    x = mixed.transpose(1, 2).flatten(2) @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]
    h = F.gelu(layer_norm(x, w, "layernorm") @ w["mlp.c_fc.weight"].T + w["mlp.c_fc.bias"])
    return (x + h @ w["mlp.c_proj.weight"].T + w["mlp.c_proj.bias"]).squeeze(1)


def load(state: dict, tmp_path, arch: str, **options) -> FrozenBackbone:
    path = tmp_path / "PE-Core-tiny.pt"
    torch.save(state, path)
    arch_kwargs = {**TINY, **options.pop("arch_kwargs", {})}
    size = SHIPPED[arch][1]
    return FrozenBackbone(arch, str(path), img_size=size, arch_kwargs=arch_kwargs, **options)


@pytest.mark.parametrize("arch", sorted(SHIPPED))
def test_the_authors_file_gives_the_reference_tokens(tmp_path, arch):
    """Every token of the probed block ([cls] where the model has one, then the patches), the
    final norm's tokens, and the attention pooling the file's ``attn_pool`` makes of them (a
    frozen backbone prunes it; the same loader fills it in timm's whole model)."""
    patch, size, cls, _ = SHIPPED[arch]
    state, pixels = authors_state(arch), images(size)
    backbone = load(state, tmp_path, arch)
    layout = backbone.layout
    assert (layout.has_cls, layout.num_prefix_tokens, layout.grid) == (
        cls, int(cls), (size // patch, size // patch),
    )  # fmt: skip
    expected = reference(state, arch, pixels)
    tokens = backbone(pixels)
    torch.testing.assert_close(tokens.all, expected, **TOLERANCE)
    torch.testing.assert_close(tokens.patches, expected[:, int(cls) :], **TOLERANCE)
    if cls:
        torch.testing.assert_close(build_aggregator("cls", layout)(tokens), expected[:, 0])
    normed = load(state, tmp_path, arch, final_norm=True)(pixels).all
    torch.testing.assert_close(normed, layer_norm(expected, vision(state), "ln_post"), **TOLERANCE)
    model = timm.create_model(arch, num_classes=0, img_size=size, **TINY)  # pooling unpruned
    load_checkpoint_into(model, tmp_path / "PE-Core-tiny.pt")
    with torch.no_grad():
        pooled = model.attn_pool(normed)
    torch.testing.assert_close(pooled, reference_pool(state, normed), **TOLERANCE)


def test_an_earlier_block_and_layer_scale_follow_the_authors(tmp_path):
    """``backbone.block=0`` stops after the first block; a file with LayerScale (``ls_1`` /
    ``ls_2``, as PE's Lang and Spatial towers carry) loads where the architecture holds it."""
    arch = "vit_pe_core_base_patch16_224"
    state, pixels = authors_state(arch, seed=1, layer_scale=True), images(224)
    backbone = load(state, tmp_path, arch, block=0, arch_kwargs={"init_values": 0.1})
    expected = reference(state, arch, pixels, blocks=1)
    torch.testing.assert_close(backbone(pixels).all, expected, **TOLERANCE)


def test_the_authors_wrappers_and_the_image_tower_alone_load_alike(tmp_path):
    """What the authors' ``load_ckpt`` also reads: ``{"state_dict": ...}`` with DDP's
    ``module.``, ``{"weights": ...}``, and ``VisionTransformer.state_dict()`` (no ``visual.``,
    no text tower)."""
    arch = "vit_pe_core_base_patch16_224"
    state, pixels = authors_state(arch), images(224)
    expected = reference(state, arch, pixels)
    for stored in (
        {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        {"weights": state},
        vision(state),
    ):
        assert recognise(stored).name == "pe"
        torch.testing.assert_close(load(stored, tmp_path, arch)(pixels).all, expected, **TOLERANCE)


def test_a_file_of_another_width_is_refused_naming_the_keys(tmp_path):
    arch = "vit_pe_core_base_patch16_224"
    with pytest.raises(
        ConfigError,
        match=r"(?s)\(pe format\) does not fit backbone.arch=vit_pe_core_base_patch16_224 "
        r"\(embed_dim=32, depth=2\).*misshaped keys: attn_pool\.kv\.bias: checkpoint \(128,\) "
        r"vs model \(64,\).*The checkpoint has embed_dim=64, depth=2",
    ):
        load(authors_state(arch, dim=64), tmp_path, arch)


def test_keys_the_converter_cannot_place_are_named_not_dropped(tmp_path):
    """A key of neither tower (beside them, or inside the image tower) is kept by its name and
    refused by the strict load; the text tower alone is left out, by its names."""
    arch = "vit_pe_core_base_patch16_224"
    state = authors_state(arch)
    state["visual.transformer.resblocks.1.attn.q_norm.weight"] = torch.ones(DIM)
    state["text_decoder.weight"] = torch.ones(3)
    with pytest.raises(
        ConfigError,
        match=r"(?s)\(pe format\) does not fit.*unexpected keys: "
        r"blocks\.1\.attn\.q_norm\.weight, text_decoder\.weight\n",
    ):
        load(state, tmp_path, arch)


def test_only_the_authors_layout_is_recognised():
    """OpenAI CLIP's layout has the same ``visual.transformer.resblocks`` but no PE attention
    pooling (``probe``); timm's names are timm's."""
    arch = "vit_pe_core_base_patch16_224"
    state = authors_state(arch)
    assert recognise(state).name == "pe"
    openai_clip = {k: v for k, v in state.items() if "attn_pool" not in k}
    timm_names = {"cls_token": 0, "blocks.0.attn.qkv.weight": 0, "attn_pool.latent": 0}
    assert recognise(openai_clip) is None and recognise(timm_names) is None


@pytest.mark.slow
def test_the_script_fetches_the_authors_file_from_its_hugging_face_repository(tmp_path):
    """The command the PE configs print: ``backbone.url`` a Hugging Face file's address
    (here under a fake ``HF_ENDPOINT`` on 127.0.0.1), fetched by Hugging Face's client into
    ``paths.weights_dir``, checked as a run reads it; the config then reads it with the authors'
    normalisation, not ImageNet's, and gives the reference tokens."""
    arch, name = "vit_pe_core_base_patch16_224", "PE-Core-B16-224.pt"
    state, buffer = authors_state(arch), io.BytesIO()
    torch.save(state, buffer)
    overrides = [
        "backbone=pe_core_vitb16",
        "backbone.weights=${paths.weights_dir}/" + name,
        *[f"+backbone.arch_kwargs.{key}={value}" for key, value in TINY.items()],
        f"paths.root_dir={tmp_path}",
    ]
    url = f"https://huggingface.co/facebook/PE-Core-B16-224/resolve/main/{name}"
    fetched = fetch_from_hub(url, buffer.getvalue(), overrides, tmp_path)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert "is ready (pe format" in fetched.stdout
    assert (tmp_path / "weights" / name).read_bytes() == buffer.getvalue()
    backbone = build_backbone(compose_config(overrides, tmp_path))
    assert backbone.mean == backbone.std == [0.5, 0.5, 0.5]
    pixels = images(224)
    torch.testing.assert_close(backbone(pixels).all, reference(state, arch, pixels), **TOLERANCE)
