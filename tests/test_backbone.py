import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mim_agg.backbones import FrozenBackbone, TokenRequest
from mim_agg.backbones.oracle import AttentionOracle
from mim_agg.probe.module import trainable_copy
from tests.helpers import TINY_ARCH

TAG = f"{TINY_ARCH}.augreg_in21k_ft_in1k"


def images(size=32, batch=2, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(backbone: FrozenBackbone, state_dict: dict) -> None:
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], msg=key)


def fake_hf_cache(repo_id: str, state_dict: dict) -> None:
    """The layout huggingface_hub leaves after a download, so timm loads it offline."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors")
    )


def test_timm_tag_loads_through_timm_from_the_hub_cache():
    torch.manual_seed(1)
    pretrained = timm.create_model(TINY_ARCH, num_classes=1000)  # the tag's classifier is dropped
    fake_hf_cache(f"timm/{TAG}", pretrained.state_dict())
    backbone = FrozenBackbone(TINY_ARCH, weights=TAG, img_size=224)
    expected = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
    assert_same_weights(backbone, expected)
    assert backbone.mean == [0.5, 0.5, 0.5]  # from the tag's pretrained config, not ImageNet's


def test_mae_plain_safetensors_and_simmim_checkpoints_load(tmp_path, tiny_state_dict, caplog):
    caplog.set_level("INFO", logger="mim_agg")
    mae = {
        "model": {
            **tiny_state_dict,
            "mask_token": torch.zeros(1, 1, 192),
            "decoder_embed.weight": torch.zeros(4, 192),
        }
    }
    torch.save(mae, tmp_path / "mae.pth")
    torch.save(tiny_state_dict, tmp_path / "plain.pth")
    save_file(tiny_state_dict, str(tmp_path / "weights.safetensors"))
    simmim = {"model": {f"encoder.{k}": v for k, v in tiny_state_dict.items()}}
    simmim["model"]["decoder.0.weight"] = torch.zeros(3, 3)
    torch.save(simmim, tmp_path / "simmim.pth")
    for name in ("mae.pth", "plain.pth", "weights.safetensors", "simmim.pth"):
        backbone = FrozenBackbone(TINY_ARCH, weights=str(tmp_path / name), img_size=224)
        assert_same_weights(backbone, tiny_state_dict)
    # each load says what it recognised and read, and what it left out
    count = len(tiny_state_dict)
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded ")]
    assert len(loaded) == 4
    assert (
        f"mae.pth (generic format) into backbone.arch={TINY_ARCH}: all {count} tensors" in loaded[0]
    )
    assert loaded[0].endswith("left out as pretraining-only: decoder_embed, mask_token.")
    assert loaded[1].endswith("left out as pretraining-only: none.")
    assert loaded[3].endswith("pretraining-only: decoder.")


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    small = timm.create_model("vit_small_patch16_224", num_classes=0)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pth")
    with pytest.raises(
        ValueError,
        match=r"(?s)does not fit backbone.arch=vit_tiny_patch16_224.*misshaped keys: "
        r"blocks\.0\.attn\.proj\.bias: checkpoint \(384,\) vs model \(192,\)",
    ):
        FrozenBackbone(TINY_ARCH, weights=str(tmp_path / "small.pth"))


def test_checkpoint_missing_keys_are_named(tmp_path, tiny_state_dict):
    del tiny_state_dict["blocks.3.mlp.fc1.weight"]
    torch.save(tiny_state_dict, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.3\.mlp\.fc1\.weight"):
        FrozenBackbone(TINY_ARCH, weights=str(tmp_path / "partial.pth"))


def test_weights_path_that_does_not_exist():
    with pytest.raises(
        FileNotFoundError, match=r"backbone.weights='/no/such/file.pth'.*check the path"
    ):
        FrozenBackbone(TINY_ARCH, weights="/no/such/file.pth")


def test_unknown_arch_and_mismatched_tag():
    with pytest.raises(ValueError, match="not a timm architecture"):
        FrozenBackbone("vit_tinny_patch16_224")
    with pytest.raises(ValueError, match="belongs to another architecture"):
        FrozenBackbone(TINY_ARCH, weights="vit_base_patch16_224.mae")


@pytest.mark.parametrize("block", [0, 5, -1])
@pytest.mark.parametrize("final_norm", [False, True])
def test_block_tokens_equal_timms_own_block_outputs(
    tmp_path, tiny_vit, tiny_state_dict, block, final_norm
):
    torch.save(tiny_state_dict, tmp_path / "w.pth")
    backbone = FrozenBackbone(TINY_ARCH, str(tmp_path / "w.pth"), block, final_norm, img_size=224)
    x = images(224, batch=1)
    with torch.no_grad():
        hidden = tiny_vit.norm_pre(tiny_vit._pos_embed(tiny_vit.patch_embed(x)))
        for blk in tiny_vit.blocks[: block % 12 + 1]:
            hidden = blk(hidden)
        if final_norm:
            hidden = tiny_vit.norm(hidden)
        tokens = backbone(x)
    torch.testing.assert_close(tokens.all, hidden)
    assert tokens.prefix.shape == (1, 1, 192) and tokens.patches.shape == (1, 196, 192)
    assert len(backbone.model.blocks) == block % 12 + 1  # later blocks are pruned
    if block == -1 and final_norm:
        torch.testing.assert_close(tokens.all, tiny_vit.forward_features(x))


def test_attention_maps_match_a_manual_computation(tmp_path, tiny_vit, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "w.pth")
    backbone = FrozenBackbone(TINY_ARCH, str(tmp_path / "w.pth"), block=2, img_size=32)
    backbone.provide(TokenRequest(cls_attn=True))
    x = images(32)
    tokens = backbone(x)
    with torch.no_grad():
        small = timm.create_model(TINY_ARCH, num_classes=0, img_size=32)
        small.load_state_dict(backbone.model.state_dict(), strict=False)
        hidden = small.norm_pre(small._pos_embed(small.patch_embed(x)))
        for blk in small.blocks[:2]:
            hidden = blk(hidden)
        attn = small.blocks[2].attn
        qkv = attn.qkv(small.blocks[2].norm1(hidden)).reshape(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
        expected = (qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(tokens.cls_attn, expected[:, :, 0, 1:])  # the [cls] row alone
    assert backbone.model.blocks[0].attn.fused_attn  # other blocks keep the fused kernel
    assert not backbone.model.blocks[2].attn.fused_attn


def test_other_image_size_interpolates_position_embeddings(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "w.pth")
    backbone = FrozenBackbone(TINY_ARCH, str(tmp_path / "w.pth"), img_size=64)
    assert backbone.layout.grid == (4, 4) and backbone.layout.num_patches == 16
    assert backbone.model.pos_embed.shape == (1, 17, 192)
    torch.testing.assert_close(backbone.model.pos_embed[:, 0], tiny_state_dict["pos_embed"][:, 0])
    assert backbone(images(64)).all.shape == (2, 17, 192)


def test_frozen_means_no_grad_eval_and_inference_mode():
    backbone = FrozenBackbone(TINY_ARCH, img_size=32)
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    tokens = backbone(images())
    assert tokens.all.is_inference()
    assert not tokens.map(trainable_copy).all.is_inference()  # what the probe trains on


def test_registers_are_prefix_tokens():
    backbone = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=28)
    tokens = backbone(images(28, batch=1))
    assert backbone.layout.num_prefix_tokens == 5 and backbone.layout.has_cls
    assert tokens.prefix.shape[1] == 5 and tokens.patches.shape[1] == 4


def test_cls_of_several_blocks_equal_timms_intermediates(tmp_path, tiny_vit, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "w.pth")
    backbone = FrozenBackbone(TINY_ARCH, str(tmp_path / "w.pth"), block=6, img_size=224)
    backbone.provide(TokenRequest(cls_blocks=3))
    x = images(224, batch=1)
    tokens = backbone(x)
    with torch.no_grad():
        expected = tiny_vit.forward_intermediates(
            x,
            indices=[4, 5, 6],
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    torch.testing.assert_close(tokens.block_cls, torch.stack([p[:, 0] for _, p in expected], 1))
    torch.testing.assert_close(tokens.all[:, 1:], expected[-1][0])
    with pytest.raises(ValueError, match="leaves only 7"):
        backbone.provide(TokenRequest(cls_blocks=8))


def test_attention_oracle_renormalises_images_and_resamples_its_grid(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "w.pth")
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    # Oracle at patch 16 on 64 px (4x4 grid) for a backbone whose grid is 2x2.
    oracle = AttentionOracle(TINY_ARCH, str(tmp_path / "w.pth"), 64, (2, 2), mean, std)
    raw = torch.rand(2, 3, 64, 64)
    probed_view = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    weights = oracle(probed_view)
    reference = FrozenBackbone(TINY_ARCH, str(tmp_path / "w.pth"), img_size=64)
    reference.provide(TokenRequest(cls_attn=True))
    imagenet = (raw - torch.tensor(reference.mean).view(1, 3, 1, 1)) / torch.tensor(
        reference.std
    ).view(1, 3, 1, 1)
    cls_attn = reference(imagenet).cls_attn.mean(1).view(2, 1, 4, 4)
    expected = torch.nn.functional.avg_pool2d(cls_attn, 2).flatten(1)  # bilinear 4->2 = 2x2 mean
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    assert weights.shape == (2, 4)
