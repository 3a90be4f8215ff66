"""BEiT-code checkpoints (BEiT v2, SimMIM, data2vec in Hugging Face's names), built in their
authors' exact key layouts (random values, two blocks, a 4x4 patch grid), load into timm's Beit
as conf/backbone/ configures it and give the tokens and [cls] attention of a reference forward
written here from the authors' model code (unilm ``beit2/modeling_pretrain.py``, SimMIM
``models/vision_transformer.py``, data2vec_vision ``beit/modeling_cyclical.py``): a shared
relative-position table, q and v biases but none on k, layer scale, LayerNorm eps 1e-6."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mim_agg.backbones import FrozenBackbone, TokenRequest
from mim_agg.backbones.formats import recognise
from mim_agg.backbones.loading import read_checkpoint
from mim_agg.cli import CONFIG_DIR
from mim_agg.errors import UserError

DIM, HEADS, DEPTH, PATCH, SIZE = 192, 3, 2, 16, 64
GRID = SIZE // PATCH
TABLE_ROWS = (2 * GRID - 1) ** 2 + 3  # every relative (row, col) offset, then three for [cls]
IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def encoder(seed: int) -> dict:
    """One random encoder, in no code base's names: what the layouts below store."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02, around=0.0):
        return around + torch.randn(*shape, generator=generator) * scale

    def block():
        return {
            "norm1_w": rand(DIM, scale=0.1, around=1),
            "norm1_b": rand(DIM),
            "q_w": rand(DIM, DIM, scale=0.1),
            "k_w": rand(DIM, DIM, scale=0.1),
            "v_w": rand(DIM, DIM, scale=0.1),
            "q_b": rand(DIM, scale=0.1),
            "v_b": rand(DIM, scale=0.1),
            "proj_w": rand(DIM, DIM, scale=0.05),
            "proj_b": rand(DIM),
            "gamma_1": rand(DIM, scale=0.2, around=0.5),
            "gamma_2": rand(DIM, scale=0.2, around=0.5),
            "norm2_w": rand(DIM, scale=0.1, around=1),
            "norm2_b": rand(DIM),
            "fc1_w": rand(4 * DIM, DIM, scale=0.05),
            "fc1_b": rand(4 * DIM),
            "fc2_w": rand(DIM, 4 * DIM, scale=0.05),
            "fc2_b": rand(DIM),
        }

    return {  # small embeddings: the first LayerNorm's input variance is ~1e-5, so eps matters
        "cls": rand(1, 1, DIM, scale=3e-3),
        "patch_w": rand(DIM, 3, PATCH, PATCH, scale=1e-4),
        "patch_b": rand(DIM, scale=1e-3),
        "table": rand(TABLE_ROWS, HEADS, scale=1.0),
        "norm_w": rand(DIM, scale=0.1, around=1),
        "norm_b": rand(DIM),
        "blocks": [block() for _ in range(DEPTH)],
    }


def relative_position_index() -> torch.Tensor:
    """BEiT's table row for query token i and key token j (token 0 is [cls]): patches at
    (r_i, c_i) and (r_j, c_j) use row (r_i - r_j + G - 1) * (2G - 1) + (c_i - c_j + G - 1); the
    last three rows are [cls] -> patch, patch -> [cls] and [cls] -> [cls]."""
    rows, cols = (a.flatten() for a in torch.meshgrid(*[torch.arange(GRID)] * 2, indexing="ij"))
    offsets = (2 * GRID - 1) ** 2
    index = torch.full((GRID * GRID + 1,) * 2, offsets)
    index[1:, 1:] = (rows[:, None] - rows[None] + GRID - 1) * (2 * GRID - 1) + (
        cols[:, None] - cols[None] + GRID - 1
    )
    index[1:, 0] = offsets + 1
    index[0, 0] = offsets + 2
    return index


def reference(
    weights: dict, images: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's tokens (before the final norm) and its [cls] -> patch attention."""
    batch, head_dim = len(images), DIM // HEADS
    x = F.conv2d(images, weights["patch_w"], weights["patch_b"], stride=PATCH)
    x = torch.cat([weights["cls"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    tokens = x.shape[1]
    bias = weights["table"][relative_position_index()].permute(2, 0, 1)  # [heads, query, key]

    def heads(t):
        return t.view(batch, tokens, HEADS, head_dim).transpose(1, 2)

    for w in weights["blocks"]:
        h = F.layer_norm(x, (DIM,), w["norm1_w"], w["norm1_b"], eps=eps)
        q, k, v = h @ w["q_w"].T + w["q_b"], h @ w["k_w"].T, h @ w["v_w"].T + w["v_b"]
        attention = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim) + bias).softmax(-1)
        mixed = (attention @ heads(v)).transpose(1, 2).reshape(batch, tokens, DIM)
        x = x + w["gamma_1"] * (mixed @ w["proj_w"].T + w["proj_b"])
        h = F.layer_norm(x, (DIM,), w["norm2_w"], w["norm2_b"], eps=eps)
        mlp = F.gelu(h @ w["fc1_w"].T + w["fc1_b"]) @ w["fc2_w"].T + w["fc2_b"]
        x = x + w["gamma_2"] * mlp
    return x, attention[:, :, 0, 1:]


def beit_encoder(weights: dict) -> dict:
    """unilm's BEiT-code encoder (``modeling_finetune.py``): one ``qkv`` without bias beside
    ``q_bias`` / ``v_bias``, a shared ``rel_pos_bias`` table and its index buffer."""
    state = {
        "cls_token": weights["cls"],
        "patch_embed.proj.weight": weights["patch_w"],
        "patch_embed.proj.bias": weights["patch_b"],
        "rel_pos_bias.relative_position_bias_table": weights["table"],
        "rel_pos_bias.relative_position_index": relative_position_index(),
        "norm.weight": weights["norm_w"],
        "norm.bias": weights["norm_b"],
    }
    for i, w in enumerate(weights["blocks"]):
        block = {
            "gamma_1": w["gamma_1"],
            "gamma_2": w["gamma_2"],
            "norm1.weight": w["norm1_w"],
            "norm1.bias": w["norm1_b"],
            "attn.q_bias": w["q_b"],
            "attn.v_bias": w["v_b"],
            "attn.qkv.weight": torch.cat([w["q_w"], w["k_w"], w["v_w"]]),
            "attn.proj.weight": w["proj_w"],
            "attn.proj.bias": w["proj_b"],
            "norm2.weight": w["norm2_w"],
            "norm2.bias": w["norm2_b"],
            "mlp.fc1.weight": w["fc1_w"],
            "mlp.fc1.bias": w["fc1_b"],
            "mlp.fc2.weight": w["fc2_w"],
            "mlp.fc2.bias": w["fc2_b"],
        }
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return state


def beitv2_checkpoint(weights: dict) -> dict:
    """``VisionTransformerForMaskedImageModelingCLS`` as ``utils.save_model`` writes it: the mask
    token, the 8192-way ``lm_head`` and two [cls] pretraining blocks besides the encoder."""
    head = beit_encoder(encoder(seed=99))
    model = {
        **beit_encoder(weights),
        "mask_token": torch.zeros(1, 1, DIM),
        "lm_head.weight": torch.zeros(8192, DIM),
        "lm_head.bias": torch.zeros(8192),
        **{
            f"cls_pt_layers.{k.removeprefix('blocks.')}": v
            for k, v in head.items()
            if k.startswith("blocks.")
        },
    }
    args = argparse.Namespace(model="beit_base_patch16_224_8k_vocab_cls_pt", early_layers=9)
    return {"model": model, "optimizer": {"state": {}}, "epoch": 1599, "scaler": {}, "args": args}


def hf_data2vec(weights: dict, prefix: str = "") -> dict:
    """HF's ``Data2VecVisionModel`` as its conversion script saves the pretrained model: q, k
    (no bias), v apart, ``lambda_*`` layer scale, the shared table under ``encoder.``."""
    state = {
        "embeddings.cls_token": weights["cls"],
        "embeddings.patch_embeddings.projection.weight": weights["patch_w"],
        "embeddings.patch_embeddings.projection.bias": weights["patch_b"],
        "encoder.relative_position_bias.relative_position_bias_table": weights["table"],
        "encoder.relative_position_bias.relative_position_index": relative_position_index(),
        "layernorm.weight": weights["norm_w"],
        "layernorm.bias": weights["norm_b"],
    }
    for i, w in enumerate(weights["blocks"]):
        layer = {
            "attention.attention.query.weight": w["q_w"],
            "attention.attention.query.bias": w["q_b"],
            "attention.attention.key.weight": w["k_w"],
            "attention.attention.value.weight": w["v_w"],
            "attention.attention.value.bias": w["v_b"],
            "attention.output.dense.weight": w["proj_w"],
            "attention.output.dense.bias": w["proj_b"],
            "intermediate.dense.weight": w["fc1_w"],
            "intermediate.dense.bias": w["fc1_b"],
            "output.dense.weight": w["fc2_w"],
            "output.dense.bias": w["fc2_b"],
            "layernorm_before.weight": w["norm1_w"],
            "layernorm_before.bias": w["norm1_b"],
            "layernorm_after.weight": w["norm2_w"],
            "layernorm_after.bias": w["norm2_b"],
            "lambda_1": w["gamma_1"],
            "lambda_2": w["gamma_2"],
        }
        state.update({f"encoder.layer.{i}.{k}": v for k, v in layer.items()})
    return {prefix + k: v for k, v in state.items()}


@contextlib.contextmanager
def fake_yacs():
    """A module ``yacs.config`` whose ``CfgNode`` pickles as yacs' does (a dict subclass with
    its flags in ``__dict__``), present only while checkpoints are written."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, new_allowed=False):
            super().__init__(init_dict or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = new_allowed

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    package = types.ModuleType("yacs")
    package.config = module
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        yield module
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def simmim_checkpoint(weights: dict, config) -> dict:
    """``utils.save_checkpoint``: ``SimMIM`` (``encoder.`` + the 1x1-conv ``decoder``) beside
    the optimizer, scheduler and the yacs config."""
    model = {
        **{f"encoder.{k}": v for k, v in beit_encoder(weights).items()},
        "encoder.mask_token": torch.zeros(1, 1, DIM),
        "decoder.0.weight": torch.zeros(PATCH**2 * 3, DIM, 1, 1),
        "decoder.0.bias": torch.zeros(PATCH**2 * 3),
    }
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-7, "betas": (0.9, 0.999)}]}
    scheduler = {"milestones": [700], "gamma": 0.1, "t_in_epochs": False}
    return {
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "max_accuracy": 0.0,
        "epoch": 799,
        "config": config,
    }


def simmim_config(yacs):
    """The pretraining config's model part, as ``config.py`` builds it."""
    vit = yacs.CfgNode({"USE_APE": False, "USE_RPB": False, "USE_SHARED_RPB": True})
    return yacs.CfgNode({"MODEL": yacs.CfgNode({"TYPE": "vit", "VIT": vit}), "TAG": "x"})


def backbone(config: str, path, final_norm: bool = False) -> FrozenBackbone:
    """The backbone conf/backbone/<config>.yaml builds, narrowed to the test's size."""
    cfg = OmegaConf.load(CONFIG_DIR / "backbone" / f"{config}.yaml")
    small = {"embed_dim": DIM, "num_heads": HEADS, "depth": DEPTH}
    return FrozenBackbone(
        cfg.arch,
        str(path),
        img_size=SIZE,
        final_norm=final_norm,
        arch_kwargs={**OmegaConf.to_container(cfg.arch_kwargs), **small},
    )


def assert_reference(config: str, path, weights: dict) -> None:
    """Tokens and [cls] attention of the last block, and the final norm, to 1e-5."""
    expected, expected_attention = reference(weights, IMAGES)
    model = backbone(config, path)
    model.provide(TokenRequest(cls_attn=True))
    tokens = model(IMAGES)
    torch.testing.assert_close(tokens.all, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.cls_attn, expected_attention, atol=1e-5, rtol=1e-5)
    normed = backbone(config, path, final_norm=True)(IMAGES).all
    final = F.layer_norm(expected, (DIM,), weights["norm_w"], weights["norm_b"], eps=1e-6)
    torch.testing.assert_close(normed, final, atol=1e-5, rtol=1e-5)


def test_beitv2_pretraining_checkpoint_gives_the_reference_tokens(tmp_path):
    weights = encoder(seed=1)
    torch.save(beitv2_checkpoint(weights), tmp_path / "beitv2_base_patch16_224_pt1k.pth")
    assert_reference("beitv2_vitb", tmp_path / "beitv2_base_patch16_224_pt1k.pth", weights)


def test_simmim_checkpoint_with_its_yacs_config_gives_the_reference_tokens(tmp_path):
    weights = encoder(seed=2)
    with fake_yacs() as yacs:
        torch.save(simmim_checkpoint(weights, simmim_config(yacs)), tmp_path / "simmim.pth")
    config = read_checkpoint(tmp_path / "simmim.pth")["config"]
    assert config["MODEL"]["VIT"]["USE_SHARED_RPB"] is True  # the node's entries, as data
    assert "yacs" not in sys.modules  # read without importing (or faking) yacs
    assert_reference("simmim_vitb", tmp_path / "simmim.pth", weights)


@pytest.mark.parametrize("prefix", ["", "data2vec_vision."])
def test_data2vec_in_hf_names_gives_the_reference_tokens(tmp_path, prefix):
    weights = encoder(seed=3)
    state = hf_data2vec(weights, prefix)
    if prefix:  # the hub also serves safetensors
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    assert_reference("data2vec_vitb", path, weights)
    hf_eps = reference(weights, IMAGES, eps=1e-12)[0]  # HF's config; not how it was trained
    assert not torch.allclose(hf_eps, reference(weights, IMAGES)[0], atol=1e-4)


class RunsCode:
    """Pickles as a call of ``marker.touch``: loading it would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_other_yacs_classes_and_code_inside_a_cfgnode_are_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    with fake_yacs() as yacs:
        yacs.Other = type("Other", (dict,), {"__module__": "yacs.config"})
        torch.save({"model": {}, "config": yacs.Other(a=1)}, tmp_path / "other.pth")
        config = yacs.CfgNode({"MODEL": yacs.CfgNode({"HOOK": RunsCode(marker)})})
        torch.save({"model": {}, "config": config}, tmp_path / "crafted.pth")
    for name in ("other.pth", "crafted.pth"):
        with pytest.raises(UserError, match="is not a plain tensor checkpoint: it pickles "):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize(
    "config,build,old,new,message",
    [
        (
            "beitv2_vitb",
            lambda w, yacs: beitv2_checkpoint(w),
            "model/blocks.1.gamma_2",
            "blocks.1.gamma2",
            r"\(beitv2 format\).*missing keys: blocks\.1\.gamma_2\n"
            r".*unexpected keys: blocks\.1\.gamma2\n",
        ),
        (
            "simmim_vitb",
            lambda w, yacs: simmim_checkpoint(w, simmim_config(yacs)),
            "model/encoder.blocks.0.attn.v_bias",
            "encoder.blocks.0.attn.v_b",
            r"\(simmim format\).*missing keys: blocks\.0\.attn\.v_bias\n"
            r".*unexpected keys: blocks\.0\.attn\.v_b\n",
        ),
        (
            "data2vec_vitb",
            lambda w, yacs: hf_data2vec(w, "data2vec_vision."),
            "data2vec_vision.encoder.layer.1.attention.attention.key.weight",
            "data2vec_vision.encoder.layer.1.attention.attention.keys.weight",
            r"\(data2vec format\).*missing keys: blocks\.1\.attn\.qkv\.weight\n.*unexpected "
            r"keys: .*data2vec_vision\.encoder\.layer\.1\.attention\.attention\.keys\.weight",
        ),
    ],
)
def test_a_renamed_key_names_the_format_and_the_keys(tmp_path, config, build, old, new, message):
    with fake_yacs() as yacs:
        checkpoint = build(encoder(seed=4), yacs)
        wrapper, _, old = old.rpartition("/")
        state = checkpoint[wrapper] if wrapper else checkpoint
        state[new] = state.pop(old)
        torch.save(checkpoint, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"(?s)" + message):
        backbone(config, tmp_path / "c.pth")


def test_each_layout_is_recognised_as_its_own_format_only():
    weights = encoder(seed=6)
    beit = beit_encoder(weights)
    vit = {
        "cls_token": 0,
        "pos_embed": 0,
        "blocks.0.attn.qkv.weight": 0,
        "blocks.0.attn.qkv.bias": 0,
    }
    hf_vit = {"embeddings.cls_token": 0, "encoder.layer.0.attention.attention.key.bias": 0}
    with fake_yacs() as yacs:
        simmim = simmim_checkpoint(weights, yacs.CfgNode())
    layouts = [
        ("beitv2", beitv2_checkpoint(weights)),
        ("beitv2", {"module": beitv2_checkpoint(weights)["model"]}),
        ("simmim", simmim),
        ("data2vec", hf_data2vec(weights)),
        ("data2vec", hf_data2vec(weights, "data2vec_vision.")),
        ("mocov3", {"state_dict": {f"module.base_encoder.{k}": v for k, v in vit.items()}}),
        ("ibot", {"teacher": {f"backbone.{k}": v for k, v in vit.items()}}),
        ("capi", {"backbone.encoder.blocks.0.residual1.fn.q_proj.weight": 0}),
        (None, beit),  # timm's Beit names: the generic path
        (None, {"model": beit}),
        (None, {"model": {**vit, "mask_token": 0, "decoder_blocks.0.attn.qkv.weight": 0}}),  # MAE
        (None, {"model": {f"encoder.{k}": v for k, v in vit.items()}}),  # SimMIM-style timm ViT
        (None, hf_vit),
    ]
    for expected, checkpoint in layouts:
        found = recognise(checkpoint)
        assert (found.name if found else None) == expected, (expected, list(checkpoint)[:3])
