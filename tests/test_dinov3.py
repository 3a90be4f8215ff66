"""DINOv3's published ViT files (facebookresearch/dinov3) in their authors' exact key layout
(``DinoVisionTransformer`` of ``dinov3/models/vision_transformer.py``; random values, small
widths) load through ``formats/dinov3.py`` into timm's DINOv3 architectures and give the tokens
of an independent reference forward written here from the authors' layers: ``[cls]``, 4
storage tokens, then the patches; pre-norm blocks with LayerScale; RoPE on the patches alone
(``rope_position_encoding.py``, ``attention.py``: coordinates centred in [-1, 1] per axis,
angles ``2 pi x / period``, the rotate-half layout); a qkv bias whose key third a mask zeroes;
an ``Mlp`` or a ``SwiGLUFFN``; LayerNorm eps 1e-5."""

from __future__ import annotations

import math
import runpy

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone
from mim_agg.backbones.formats import recognise
from mim_agg.backbones.formats.dinov3 import convert_dinov3, is_dinov3
from mim_agg.cli import CONFIG_DIR
from mim_agg.errors import ConfigError
from tests.helpers import PROJECT_ROOT

DIM, HEADS, DEPTH, PATCH, SIZE, STORAGE = 64, 4, 2, 16, 48, 4
GRID = SIZE // PATCH  # 3 x 3 patches
SMALL = {"embed_dim": DIM, "num_heads": HEADS, "depth": DEPTH}
IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def rope_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """The authors' period schedule (``base`` ** (2 i / (head_dim / 2))), stored in their
    published files as bfloat16 values."""
    periods = base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    return periods.bfloat16().float()


def authors_state(
    seed: int = 0,
    swiglu: bool = False,
    qv_bias: str = "random",
    storage: int = STORAGE,
) -> dict[str, torch.Tensor]:
    """A published file's keys and shapes: ``qv_bias`` random, zero (the distilled models'
    values) or none (ViT-7B); the raw key third of the bias is random, zeroed by the mask."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    hidden = 4 * DIM
    state = {
        "cls_token": rand(1, 1, DIM, scale=1.0),
        "storage_tokens": rand(1, storage, DIM, scale=1.0),
        "mask_token": rand(1, DIM),
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.02),
        "patch_embed.proj.bias": rand(DIM),
        "rope_embed.periods": rope_periods(DIM // HEADS),
        "norm.weight": 1 + rand(DIM),
        "norm.bias": rand(DIM),
    }
    for i in range(DEPTH):
        block = {
            "norm1.weight": 1 + rand(DIM),
            "norm1.bias": rand(DIM),
            "attn.qkv.weight": rand(3 * DIM, DIM, scale=0.3),
            "attn.proj.weight": rand(DIM, DIM),
            "attn.proj.bias": rand(DIM),
            "ls1.gamma": 0.5 + rand(DIM),
            "norm2.weight": 1 + rand(DIM),
            "norm2.bias": rand(DIM),
            "ls2.gamma": 0.5 + rand(DIM),
        }
        if qv_bias != "none":
            bias = rand(3 * DIM)
            if qv_bias == "zero":
                bias[:DIM] = bias[2 * DIM :] = 0
            mask = torch.ones(3 * DIM)
            mask[DIM : 2 * DIM] = 0
            block |= {"attn.qkv.bias": bias, "attn.qkv.bias_mask": mask}
        if swiglu:  # SwiGLUFFN, ffn_ratio 6: int(6 DIM * 2 / 3), aligned to 8
            block |= {
                "mlp.w1.weight": rand(hidden, DIM),
                "mlp.w1.bias": rand(hidden),
                "mlp.w2.weight": rand(hidden, DIM),
                "mlp.w2.bias": rand(hidden),
                "mlp.w3.weight": rand(DIM, hidden),
                "mlp.w3.bias": rand(DIM),
            }
        else:
            block |= {
                "mlp.fc1.weight": rand(hidden, DIM),
                "mlp.fc1.bias": rand(hidden),
                "mlp.fc2.weight": rand(DIM, hidden),
                "mlp.fc2.bias": rand(DIM),
            }
        state |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return state


def rope_sin_cos(periods: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``RopePositionEmbedding.forward`` (normalize_coords="separate", eval): patch centres in
    [-1, 1] per axis, angle ``2 pi coord / period`` for (row, col) x periods, tiled twice."""
    ys = (torch.arange(rows) + 0.5) / rows * 2 - 1
    xs = (torch.arange(cols) + 0.5) / cols * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1).tile(2)
    return angles.sin(), angles.cos()


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``rope_apply``: ``x cos + rotate_half(x) sin``, rotate_half(x) = [-x2, x1]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def reference(state: dict, images: torch.Tensor, blocks: int = DEPTH):
    """The authors' forward (``prepare_tokens_with_masks``, ``SelfAttentionBlock``): tokens after
    ``blocks`` blocks, before the final norm, and the last block's attention ``[B, H, T, T]``."""
    batch, head_dim = len(images), DIM // HEADS
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], PATCH)
    x = x.flatten(2).transpose(1, 2)
    prefix = torch.cat([state["cls_token"], state["storage_tokens"]], dim=1)
    x = torch.cat([prefix.expand(batch, -1, -1), x], dim=1)
    n_prefix, tokens = prefix.shape[1], x.shape[1]
    sin, cos = rope_sin_cos(state["rope_embed.periods"], GRID, GRID)
    for i in range(blocks):
        w = {k.split(f"blocks.{i}.", 1)[1]: v for k, v in state.items() if f"blocks.{i}." in k}
        h = F.layer_norm(x, (DIM,), w["norm1.weight"], w["norm1.bias"], eps=1e-5)
        qkv = h @ w["attn.qkv.weight"].T
        if "attn.qkv.bias" in w:
            qkv = qkv + w["attn.qkv.bias"] * w["attn.qkv.bias_mask"]
        q, k, v = qkv.view(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :n_prefix], rotate(q[:, :, n_prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :n_prefix], rotate(k[:, :, n_prefix:], sin, cos)], dim=2)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        x = x + w["ls1.gamma"] * (mixed @ w["attn.proj.weight"].T + w["attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), w["norm2.weight"], w["norm2.bias"], eps=1e-5)
        if "mlp.w1.weight" in w:
            gate = F.silu(h @ w["mlp.w1.weight"].T + w["mlp.w1.bias"])
            hidden = gate * (h @ w["mlp.w2.weight"].T + w["mlp.w2.bias"])
            out = hidden @ w["mlp.w3.weight"].T + w["mlp.w3.bias"]
        else:
            hidden = F.gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"])
            out = hidden @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        x = x + w["ls2.gamma"] * out
    return x, attention


def load(state: dict, tmp_path, arch: str = "vit_small_patch16_dinov3_qkvb", **kwargs):
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    arch_kwargs = {**SMALL, **kwargs.pop("arch_kwargs", {})}
    return FrozenBackbone(arch, str(path), img_size=SIZE, arch_kwargs=arch_kwargs, **kwargs)


@pytest.mark.parametrize(
    ("arch", "swiglu"),
    [("vit_small_patch16_dinov3_qkvb", False), ("vit_small_plus_patch16_dinov3_qkvb", True)],
)
def test_the_authors_file_gives_the_reference_tokens(tmp_path, arch, swiglu):
    state = authors_state(swiglu=swiglu)
    backbone = load(state, tmp_path, arch)
    expected, _ = reference(state, IMAGES)
    torch.testing.assert_close(backbone(IMAGES).all, expected, **TOLERANCE)
    normed = load(state, tmp_path, arch, final_norm=True)
    expected = F.layer_norm(expected, (DIM,), state["norm.weight"], state["norm.bias"], eps=1e-5)
    torch.testing.assert_close(normed(IMAGES).all, expected, **TOLERANCE)


def test_storage_tokens_are_prefix_tokens_never_patches(tmp_path):
    """[cls] and the 4 storage tokens come first; aggregators see the 3 x 3 patch grid alone:
    the mean of the patches, and the central patch (token 5 + 4) as the 1 x 1 central crop."""
    state = authors_state()
    backbone = load(state, tmp_path, block=0)
    layout = backbone.layout
    assert (layout.num_prefix_tokens, layout.has_cls, layout.grid) == (1 + STORAGE, True, (3, 3))
    tokens = backbone(IMAGES)
    expected, _ = reference(state, IMAGES, blocks=1)
    patches = expected[:, 1 + STORAGE :]
    torch.testing.assert_close(tokens.patches, patches, **TOLERANCE)
    torch.testing.assert_close(tokens.prefix[:, 1:], expected[:, 1 : 1 + STORAGE])
    pooled = {
        name: build_aggregator(name, layout, **options)(tokens)
        for name, options in {"cls": {}, "mean": {}, "center_crop": {"k": 1}}.items()
    }
    torch.testing.assert_close(pooled["cls"], expected[:, 0], **TOLERANCE)
    torch.testing.assert_close(pooled["mean"], patches.mean(1), **TOLERANCE)
    torch.testing.assert_close(pooled["center_crop"], patches[:, 4], **TOLERANCE)


def test_the_files_rope_periods_are_the_ones_computed_with(tmp_path):
    """The published files store the periods rounded to bfloat16 and the authors' model
    computes with them; timm recomputes float32 periods, which would move every token."""
    state = authors_state()
    backbone = load(state, tmp_path)
    torch.testing.assert_close(backbone.model.rope.periods, state["rope_embed.periods"])
    exact = {**state, "rope_embed.periods": 100 ** (2 * torch.arange(4) / 8)}
    assert not torch.equal(exact["rope_embed.periods"], state["rope_embed.periods"])
    moved = (backbone(IMAGES).all - reference(exact, IMAGES)[0]).abs().max()
    assert moved > 1e-4  # the rounding matters at the tolerance this file is tested to


def test_in_bfloat16_the_weights_convert_and_the_files_periods_stay_float32(tmp_path):
    """ViT-7B's configs (backbone.dtype=bfloat16): parameters in bfloat16, the RoPE periods the
    file's, in float32 (timm keeps frequencies at >= float32); tokens near the reference run on
    the bfloat16-rounded weights, as near as bfloat16 computing allows."""
    state = authors_state()
    backbone = load(state, tmp_path, dtype="bfloat16")
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    periods = backbone.model.rope.periods
    assert periods.dtype == torch.float32 and torch.equal(periods, state["rope_embed.periods"])
    rounded = {k: v.bfloat16().float() for k, v in state.items()}
    expected = reference(rounded, IMAGES.bfloat16().float())[0]
    error = (backbone(IMAGES).all.float() - expected).norm() / expected.norm()
    assert error < 5e-2, error  # bfloat16 compute: ~1e-2; a misplaced tensor errs by ~1


def test_non_zero_qv_biases_need_an_architecture_that_holds_them(tmp_path):
    """timm's own filter drops q/v biases an architecture has no place for; here a file whose
    biases are not zero is refused, naming the ``_qkvb`` arch, and loads into that one."""
    with pytest.raises(
        ConfigError, match=r"non-zero attention biases.*vit_small_patch16_dinov3_qkvb"
    ):
        load(authors_state(), tmp_path, "vit_small_patch16_dinov3")


def test_zero_qv_biases_and_no_biases_load_into_the_plain_architecture(tmp_path):
    """Adding zero biases computes what leaving them out does (the distilled models' files);
    ViT-7B's file has no qkv bias at all."""
    for qv_bias in ("zero", "none"):
        state = authors_state(qv_bias=qv_bias)
        backbone = load(state, tmp_path, "vit_small_patch16_dinov3")
        torch.testing.assert_close(backbone(IMAGES).all, reference(state, IMAGES)[0], **TOLERANCE)


def test_a_masked_key_bias_that_is_not_zero_is_refused(tmp_path):
    state = authors_state()
    state["blocks.1.attn.qkv.bias_mask"][DIM] = 1.0
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn\.qkv\.bias.*key bias"):
        load(state, tmp_path)


@pytest.mark.parametrize(("storage", "arch_kwargs", "fix"), [
    (4, {"num_reg_tokens": 0}, "num_reg_tokens: 4"),
    (2, {}, "num_reg_tokens: 2"),
])  # fmt: skip
def test_prefix_tokens_that_differ_from_the_architectures_are_refused(
    tmp_path, storage, arch_kwargs, fix
):
    """Never a shifted grid: the message names the key, both layouts and the option."""
    state = authors_state(storage=storage)
    with pytest.raises(
        ConfigError,
        match=rf"(?s)dinov3 format.*{storage} register/storage tokens \(reg_token\).*{fix}",
    ):
        load(state, tmp_path, arch_kwargs=arch_kwargs)


def test_the_load_is_strict_naming_what_it_cannot_place(tmp_path):
    """A key of no published layout (the untied [cls] norm, a renamed LayerScale) is named;
    the mask token and the local-crop [cls] norm are pretraining-only and left out."""
    state = authors_state()
    state["local_cls_norm.weight"] = torch.ones(DIM)
    state["cls_norm.weight"] = torch.ones(DIM)
    state["blocks.1.ls1.scale"] = state.pop("blocks.1.ls1.gamma")
    named = (
        r"missing keys: blocks\.1\.gamma_1\n"
        r"  unexpected keys: blocks\.1\.ls1\.scale, cls_norm\.weight\n"
    )
    with pytest.raises(ConfigError, match=r"(?s)\(dinov3 format\) does not fit.*" + named):
        load(state, tmp_path)


def transformers_state(state: dict) -> dict[str, torch.Tensor]:
    """The same weights under transformers' DINOv3ViTModel names (modeling_dinov3_vit.py), as the
    facebook/dinov3-* repositories hold them: q, k, v apart, no key bias, no RoPE periods."""
    names = {
        "cls_token": "embeddings.cls_token",
        "storage_tokens": "embeddings.register_tokens",
        "mask_token": "embeddings.mask_token",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    block_names = {
        "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
        "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1.weight": "mlp.up_proj.weight", "mlp.fc1.bias": "mlp.up_proj.bias",
        "mlp.fc2.weight": "mlp.down_proj.weight", "mlp.fc2.bias": "mlp.down_proj.bias",
        "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w1.bias": "mlp.gate_proj.bias",
        "mlp.w2.weight": "mlp.up_proj.weight", "mlp.w2.bias": "mlp.up_proj.bias",
        "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias",
    }  # fmt: skip
    hf = {theirs: state[ours] for ours, theirs in names.items()}
    for i in range(DEPTH):
        ours = {k.split(f"blocks.{i}.", 1)[1]: v for k, v in state.items() if f"blocks.{i}." in k}
        hf |= {f"layer.{i}.{block_names[k]}": v for k, v in ours.items() if k in block_names}
        for name, weight in zip("qkv", ours["attn.qkv.weight"].chunk(3), strict=True):
            hf[f"layer.{i}.attention.{name}_proj.weight"] = weight
        if "attn.qkv.bias" in ours:
            q_bias, _, v_bias = (ours["attn.qkv.bias"] * ours["attn.qkv.bias_mask"]).chunk(3)
            hf |= {f"layer.{i}.attention.q_proj.bias": q_bias.clone()}
            hf |= {f"layer.{i}.attention.v_proj.bias": v_bias.clone()}
    return {k: v.contiguous() for k, v in hf.items()}


@pytest.mark.parametrize("swiglu", [False, True])
def test_hugging_faces_conversion_gives_the_reference_tokens(tmp_path, swiglu):
    """transformers computes the RoPE periods in float32 (nothing stored), as timm does: the
    reference runs with those."""
    state = authors_state(swiglu=swiglu)
    path = tmp_path / "model.safetensors"
    save_file(transformers_state(state), path)
    arch = "vit_small_plus_patch16_dinov3_qkvb" if swiglu else "vit_small_patch16_dinov3_qkvb"
    backbone = FrozenBackbone(arch, str(path), img_size=SIZE, arch_kwargs=SMALL)
    exact = {**state, "rope_embed.periods": 100 ** (2 * torch.arange(4) / 8)}
    torch.testing.assert_close(backbone(IMAGES).all, reference(exact, IMAGES)[0], **TOLERANCE)
    assert recognise(transformers_state(state)).name == "dinov3_hf"


def test_the_authors_layout_and_only_it_is_recognised():
    state = authors_state()
    assert recognise(state).name == "dinov3"
    vit = {"cls_token": 0, "pos_embed": 0, "blocks.0.attn.qkv.weight": 0, "norm.weight": 0}
    timm_dinov3 = {"cls_token": 0, "reg_token": 0, "blocks.0.gamma_1": 0, "norm.weight": 0}
    sapiens2 = {"storage_tokens": 0, "blocks.0.attn.wq.weight": 0, "blocks.0.ffn.w12.weight": 0}
    for other in (vit, timm_dinov3, sapiens2, {"model": state}):
        assert not is_dinov3(other)
    assert not {k for k in convert_dinov3(state) if "mask" in k}


# The published ViTs (dinov3/hub/backbones.py): width, depth, heads, ffn and its hidden width as
# the authors compute it, qkv bias, the pretraining-only local-crop [cls] norm.
PUBLISHED = {
    "dinov3_vits16": (384, 12, 6, "mlp", 4 * 384, True, False),
    "dinov3_vitsp16": (384, 12, 6, "swiglu", 1536, True, False),
    "dinov3_vitb16": (768, 12, 12, "mlp", 4 * 768, True, False),
    "dinov3_vitl16": (1024, 24, 16, "mlp", 4 * 1024, True, False),
    "dinov3_vith16p": (1280, 32, 20, "swiglu", 5120, True, False),
    "dinov3_vit7b16": (4096, 40, 32, "swiglu", 8192, False, True),
    "dinov3_vitl16_sat": (1024, 24, 16, "mlp", 4 * 1024, True, True),
    "dinov3_vit7b16_sat": (4096, 40, 32, "swiglu", 8192, False, True),
}


def published_layout(dim, depth, heads, ffn, hidden, qkv_bias, local_cls_norm) -> dict:
    """A published file's keys and shapes, on the meta device (ViT-7B costs nothing); the qkv
    bias and its mask are real (the converter reads them)."""
    meta = torch.device("meta")
    state = {
        "cls_token": torch.empty(1, 1, dim, device=meta),
        "storage_tokens": torch.empty(1, 4, dim, device=meta),
        "mask_token": torch.empty(1, dim, device=meta),
        "patch_embed.proj.weight": torch.empty(dim, 3, 16, 16, device=meta),
        "patch_embed.proj.bias": torch.empty(dim, device=meta),
        "rope_embed.periods": torch.empty(dim // heads // 4, device=meta),
        "norm.weight": torch.empty(dim, device=meta),
        "norm.bias": torch.empty(dim, device=meta),
    }
    if local_cls_norm:
        state |= {
            "local_cls_norm.weight": state["norm.weight"],
            "local_cls_norm.bias": state["norm.bias"],
        }
    mlp = (
        {"mlp.w1": (hidden, dim), "mlp.w2": (hidden, dim), "mlp.w3": (dim, hidden)}
        if ffn == "swiglu"
        else {"mlp.fc1": (hidden, dim), "mlp.fc2": (dim, hidden)}
    )
    layers = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), **mlp}
    for i in range(depth):
        for name, (rows, cols) in layers.items():
            state[f"blocks.{i}.{name}.weight"] = torch.empty(rows, cols, device=meta)
            if name != "attn.qkv":
                state[f"blocks.{i}.{name}.bias"] = torch.empty(rows, device=meta)
        for name in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "ls1.gamma",
            "ls2.gamma",
        ):
            state[f"blocks.{i}.{name}"] = torch.empty(dim, device=meta)
        if qkv_bias:
            mask = torch.ones(3 * dim)
            mask[dim : 2 * dim] = 0
            state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * dim)
            state[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return state


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_config_takes_its_published_files_names_and_shapes(name):
    """The config's architecture, built on the meta device, has exactly the keys and shapes of
    its published file once converted, and the RoPE periods' length; SAT-493M files carry
    their own normalisation, which the config states (a file names none). (Every config
    composes and builds: tests/test_configs.py.)"""
    cfg = OmegaConf.load(CONFIG_DIR / "backbone" / f"{name}.yaml")
    with torch.device("meta"):
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    state = convert_dinov3(published_layout(*PUBLISHED[name]))
    periods = state.pop("rope.periods")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == ours
    assert periods.shape == model.rope.periods.shape
    assert (cfg.family, cfg.ep_tokens, "linear_input" in cfg) == ("hybrid", "all", False)
    sat = ([0.430, 0.411, 0.296], [0.213, 0.156, 0.143])
    stats = (list(cfg.get("mean") or []), list(cfg.get("std") or []))
    assert stats == (sat if name.endswith("_sat") else ([], []))


def test_the_download_script_says_where_to_request_the_gated_files(tmp_path, capsys):
    """No signed URL and no file: where to ask and how to pass either, exit status 2; the file
    in place: checked as a run reads it (a small file in the authors' layout)."""
    script = runpy.run_path(str(PROJECT_ROOT / "scripts" / "download_weights.py"))
    overrides = ["backbone=dinov3_vitb16", f"paths.root_dir={tmp_path}"]
    assert script["main"](overrides) == 2
    err = capsys.readouterr().err
    name = "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    assert "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in err
    assert f"'backbone.url=<the URL of {name}>'" in err
    assert f"backbone.weights=/path/to/{name}" in err
    assert "https://huggingface.co/facebook/dinov3-vitb16-pretrain-lvd1689m" in err
    (tmp_path / "weights").mkdir()
    torch.save(authors_state(), tmp_path / "weights" / name)
    small = [f"+backbone.arch_kwargs.{k}={v}" for k, v in SMALL.items()]
    assert script["main"]([*overrides, *small, f"backbone.img_size={SIZE}"]) == 0
    assert "is ready (dinov3 format" in capsys.readouterr().out
    signed = "https://dinov3.llamameta.net/dinov3_vitb16/x.pth?Policy=p&Signature=s"
    cfg = OmegaConf.create({"url": signed, "weights": str(tmp_path / "absent.pth")})
    assert script["gated"](cfg) is None  # a signed URL downloads as any other
