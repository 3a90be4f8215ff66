"""Checkpoints in their authors' exact layouts (keys and shapes from their model code, random
values, two blocks) load through the converters and give the tokens of an independent
reference forward of the same weights, written from the ViT description (pre-norm blocks)."""

from __future__ import annotations

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mim_agg.backbones import FrozenBackbone
from mim_agg.errors import UserError

DIM, DEPTH, PATCH, SIZE = 384, 2, 16, 224
GRID = SIZE // PATCH


def vit_weights(
    seed: int, dim: int = DIM, depth: int = DEPTH, cls: bool = True
) -> dict[str, torch.Tensor]:
    """The key layout of DINO / MoCo v3 / iBOT / I-JEPA ViTs (timm 0.4 naming), random values;
    I-JEPA's without ``[cls]``."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        **({"cls_token": rand(1, 1, dim)} if cls else {}),
        "pos_embed": rand(1, int(cls) + GRID * GRID, dim),
        "patch_embed.proj.weight": rand(dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(dim),
        "norm.weight": 1 + rand(dim),
        "norm.bias": rand(dim),
    }
    for i in range(depth):
        block = {
            "norm1.weight": 1 + rand(dim),
            "norm1.bias": rand(dim),
            "attn.qkv.weight": rand(3 * dim, dim, scale=0.1),
            "attn.qkv.bias": rand(3 * dim),
            "attn.proj.weight": rand(dim, dim),
            "attn.proj.bias": rand(dim),
            "norm2.weight": 1 + rand(dim),
            "norm2.bias": rand(dim),
            "mlp.fc1.weight": rand(4 * dim, dim),
            "mlp.fc1.bias": rand(4 * dim),
            "mlp.fc2.weight": rand(dim, 4 * dim),
            "mlp.fc2.bias": rand(dim),
        }
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return state


def reference_tokens(state: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """Patchify, prepend [cls] (if any), add positions, then per block x += attn(LN(x)),
    x += MLP(LN(x)); the last block's output, before the final norm."""
    batch = len(images)
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], PATCH)
    x = x.flatten(2).transpose(1, 2)
    if "cls_token" in state:
        x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + state["pos_embed"]
    tokens, head_dim = x.shape[1], DIM // heads
    for i in range(DEPTH):
        w = {
            k.split(f"blocks.{i}.", 1)[1]: v
            for k, v in state.items()
            if k.startswith(f"blocks.{i}.")
        }
        h = F.layer_norm(x, (DIM,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
        qkv = (h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).view(
            batch, tokens, 3, heads, head_dim
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        x = x + mixed @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        h = F.layer_norm(x, (DIM,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
        x = (
            x
            + F.gelu(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]) @ w["mlp.fc2.weight"].T
            + w["mlp.fc2.bias"]
        )
    return x


def projector(prefix: str, seed: int) -> dict:
    """A BatchNorm MLP head (MoCo v3's projector / predictor), in small widths."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}0.weight": torch.randn(64, DIM, generator=generator),
        f"{prefix}1.weight": torch.ones(64),
        f"{prefix}1.bias": torch.zeros(64),
        f"{prefix}1.running_mean": torch.zeros(64),
        f"{prefix}1.running_var": torch.ones(64),
        f"{prefix}1.num_batches_tracked": torch.tensor(7),
        f"{prefix}3.weight": torch.randn(32, 64, generator=generator),
    }


def backbone(path, heads: int) -> FrozenBackbone:
    kwargs = {"depth": DEPTH, "num_heads": heads}
    return FrozenBackbone("vit_small_patch16_224", str(path), img_size=SIZE, arch_kwargs=kwargs)


IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def test_mocov3_base_encoder_with_12_heads_gives_the_reference_tokens(tmp_path):
    encoder, momentum = vit_weights(seed=1), vit_weights(seed=2)
    checkpoint = {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": {
            **{f"module.base_encoder.{k}": v for k, v in encoder.items()},
            **projector("module.base_encoder.head.", 3),
            **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()},
            **projector("module.momentum_encoder.head.", 4),
            **projector("module.predictor.", 5),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4}]},
    }
    torch.save(checkpoint, tmp_path / "vit-s-300ep.pth.tar")
    tokens = backbone(tmp_path / "vit-s-300ep.pth.tar", heads=12)(IMAGES).all
    expected = reference_tokens(encoder, IMAGES, heads=12)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    six_heads = backbone(tmp_path / "vit-s-300ep.pth.tar", heads=6)(IMAGES).all  # loads, but
    assert not torch.allclose(six_heads, expected, atol=1e-3)  # the wrong head count is wrong


def test_ibot_teacher_beside_pickled_arguments_gives_the_reference_tokens(tmp_path):
    teacher, student = vit_weights(seed=11), vit_weights(seed=12)
    checkpoint = {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.items()},
            "module.backbone.masked_embed": torch.zeros(1, DIM),
            "module.head.mlp.0.weight": torch.randn(64, DIM),
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.items()},
            "head.mlp.0.weight": torch.randn(64, DIM),
            "head.last_layer.weight_g": torch.ones(8192, 1),
        },
        "epoch": 800,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8192),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    tokens = backbone(tmp_path / "checkpoint.pth", heads=6)(IMAGES).all
    torch.testing.assert_close(
        tokens, reference_tokens(teacher, IMAGES, heads=6), atol=1e-5, rtol=1e-5
    )


def test_ijepa_target_encoder_not_the_context_encoder_gives_the_reference_tokens(tmp_path):
    context, target = vit_weights(seed=21, cls=False), vit_weights(seed=22, cls=False)
    checkpoint = {
        "encoder": {f"module.{k}": v for k, v in context.items()},
        "predictor": {"module.predictor_embed.weight": torch.randn(64, DIM)},
        "target_encoder": {f"module.{k}": v for k, v in target.items()},
        "opt": {"state": {}, "param_groups": []},
        "scaler": None,
        "epoch": 300,
        "loss": 0.1,
        "batch_size": 2048,
        "world_size": 16,
        "lr": 0.001,
    }
    torch.save(checkpoint, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    model = FrozenBackbone(
        "vit_small_patch16_224",
        str(tmp_path / "IN1K-vit.h.14-300e.pth.tar"),
        img_size=SIZE,
        arch_kwargs={
            "depth": DEPTH, "num_heads": 6, "class_token": False, "global_pool": "avg",
            "fc_norm": False,
        },
    )  # fmt: skip
    assert not model.layout.has_cls and model.layout.num_prefix_tokens == 0
    tokens = model(IMAGES).all
    torch.testing.assert_close(
        tokens, reference_tokens(target, IMAGES, heads=6), atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(tokens, reference_tokens(context, IMAGES, heads=6), atol=1e-3)


class Crafted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(
        {"teacher": {"backbone.x": torch.zeros(1)}, "args": Crafted(marker)}, tmp_path / "c.pth"
    )
    with pytest.raises(UserError, match="is not a plain tensor checkpoint") as refused:
        backbone(tmp_path / "c.pth", heads=6)
    assert not marker.exists()
    message = str(refused.value)
    assert str(tmp_path / "c.pth") in message and "nothing in it was executed" in message
    assert "weights_only" not in message  # torch's advice to load it anyway is never passed on


def test_a_misfit_names_the_format_and_the_keys(tmp_path):
    encoder = vit_weights(seed=1)
    del encoder["blocks.1.mlp.fc2.bias"]
    torch.save(
        {"state_dict": {f"module.base_encoder.{k}": v for k, v in encoder.items()}},
        tmp_path / "m.pth",
    )
    with pytest.raises(
        ValueError, match=r"(?s)\(mocov3 format\) does not fit.*missing keys: blocks.1.mlp.fc2.bias"
    ):
        backbone(tmp_path / "m.pth", heads=12)


class SystemCall:
    """The classic payload: ``os.system`` (posix.system), a module torch blocks outright."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_calls_os_system_is_named_as_such(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": {"x": torch.zeros(1)}, "args": SystemCall(marker)}, tmp_path / "c.pth")
    with pytest.raises(UserError, match=r"it pickles posix\.system, which could run code"):
        backbone(tmp_path / "c.pth", heads=6)
    assert not marker.exists()


def test_a_file_two_formats_claim_is_refused_not_read_by_import_order(monkeypatch):
    """Each format module registers itself; detection must not depend on which came first."""
    from mim_agg.backbones import formats

    claims_all = formats.Format("greedy", lambda checkpoint: True, dict)
    monkeypatch.setitem(formats.FORMATS, "greedy", claims_all)
    checkpoint = {"state_dict": {"module.base_encoder.cls_token": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"\['mocov3', 'greedy'\] all claim one file"):
        formats.recognise(checkpoint)
    monkeypatch.delitem(formats.FORMATS, "greedy")
    assert formats.recognise(checkpoint).name == "mocov3"
    assert formats.recognise({"model": {"blocks.0.norm1.weight": torch.zeros(1)}}) is None
