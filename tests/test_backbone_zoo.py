"""The token layouts the leaderboard's newer backbones bring, each read from a tiny random model
of its timm family: no [cls] (AIMv2, SigLIP), RADIO's summary tokens and registers, PE-Core's
and EVA-02 CLIP's Eva, MetaCLIP 2's CLIP ViT, Hiera's hierarchical stages."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone, TokenRequest
from mim_agg.errors import ConfigError, UserError

# arch: (tiny timm arguments, img_size, prefix tokens, has [cls], grid)
FAMILIES = {
    "aimv2_large_patch14_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 28, 0, False),
    "vit_base_patch16_siglip_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 0, False),
    "vit_base_patch16_radio_v3": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 8, True),
    "vit_pe_core_base_patch16_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 32, 1, True),
    "eva02_enormous_patch14_clip_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 28, 1, True),
    "vit_gigantic_patch14_clip_224": ({"embed_dim": 32, "depth": 2, "num_heads": 2}, 28, 1, True),
}
HIERA = "hiera_tiny_224"
HIERA_ARGS = {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 2, 1)}  # 5 blocks, 4 stages


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def twins(arch: str, arch_kwargs: dict, img_size: int, **options):
    """A ``FrozenBackbone`` and the plain timm model with the same random weights."""
    torch.manual_seed(0)
    backbone = FrozenBackbone(arch, img_size=img_size, arch_kwargs=arch_kwargs, **options)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, img_size=img_size, **arch_kwargs).eval()
    return backbone, model


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_the_layout_is_read_from_the_model_and_its_tokens_are_timms(arch):
    """Prefix count, [cls] and grid as the model holds them; the tokens (final norm applied)
    are timm's own ``forward_features``, prefix tokens first, never counted as patches."""
    arch_kwargs, size, prefix, has_cls = FAMILIES[arch]
    backbone, model = twins(arch, arch_kwargs, size, final_norm=True)
    layout = backbone.layout
    side = size // model.patch_embed.patch_size[0]
    assert (layout.num_prefix_tokens, layout.has_cls) == (prefix, has_cls)
    assert layout.grid == (side, side) and (layout.dim, layout.num_heads) == (32, 2)
    tokens = backbone(images(size))
    with torch.no_grad():
        expected = model.forward_features(images(size))
    torch.testing.assert_close(tokens.all, expected, rtol=1e-5, atol=1e-5)
    assert tokens.patches.shape[1] == side * side
    if not has_cls:
        with pytest.raises(ConfigError, match="aggregator='cls' reads the \\[cls\\] token"):
            build_aggregator("cls", layout)


def test_radio_summary_tokens_and_registers_are_prefix_tokens():
    """C-RADIOv3's 8 prefix tokens (one summary token per teacher, then registers, 8 in all):
    timm's ``cls_token`` is the first summary, the other seven ride in ``reg_token``. Our
    ``[cls]`` is that first token; all eight stay out of the patches, whatever reads them."""
    arch_kwargs, size, _, _ = FAMILIES["vit_base_patch16_radio_v3"]
    backbone, model = twins("vit_base_patch16_radio_v3", arch_kwargs, size)
    assert model.cls_token.shape[1] + model.reg_token.shape[1] == 8
    tokens = backbone(images(size))
    assert tokens.prefix.shape[1] == 8 and tokens.patches.shape[1] == 4
    mean = build_aggregator("mean", backbone.layout)
    torch.testing.assert_close(mean(tokens), tokens.all[:, 8:].mean(dim=1))
    cls = build_aggregator("cls", backbone.layout)
    torch.testing.assert_close(cls(tokens), tokens.all[:, 0])


def test_hiera_serves_its_final_stage_grid():
    """The last block's tokens are the final stage's 2 x 2 grid at 64 px, width 8x the first
    stage's, as timm's ``forward_features`` gives them; an earlier block has its own stage's
    grid and width."""
    backbone, model = twins(HIERA, HIERA_ARGS, 64)
    layout = backbone.layout
    assert (layout.dim, layout.grid, layout.num_prefix_tokens, layout.has_cls) == (
        128, (2, 2), 0, False,
    )  # fmt: skip
    assert (layout.num_heads, layout.depth) == (8, 5)
    tokens = backbone(images(64))
    with torch.no_grad():
        expected = model.forward_features(images(64))  # in grid order at the last stage
    torch.testing.assert_close(tokens.all, expected, rtol=1e-5, atol=1e-5)
    early = FrozenBackbone(HIERA, img_size=64, arch_kwargs=HIERA_ARGS, block=1)
    assert (early.layout.dim, early.layout.grid, early.layout.num_heads) == (32, (8, 8), 2)
    assert early(images(64)).all.shape == (2, 64, 32)


def test_hiera_refuses_what_it_cannot_give_by_name():
    backbone = FrozenBackbone(HIERA, img_size=64, arch_kwargs=HIERA_ARGS)
    with pytest.raises(ConfigError, match=f"{HIERA} \\(Hiera\\) does not expose attention"):
        backbone.provide(TokenRequest(center_rows=2))
    with pytest.raises(ConfigError, match="backbone.final_norm=true: .*Hiera.* normalises after"):
        FrozenBackbone(HIERA, img_size=64, arch_kwargs=HIERA_ARGS, final_norm=True)
    with pytest.raises(UserError, match="patch stride x mask-unit size 32: .* Use backbone"):
        FrozenBackbone(HIERA, img_size=48, arch_kwargs=HIERA_ARGS)


def test_an_architecture_mim_agg_cannot_read_is_refused_by_name():
    with pytest.raises(ConfigError, match="builds a NaFlexVit, which mim_agg cannot read"):
        FrozenBackbone("naflexvit_base_patch16_siglip", img_size=32, arch_kwargs={"depth": 1})


def test_bfloat16_weights_are_built_so_and_their_tokens_follow_float32s(tmp_path):
    """``backbone.dtype=bfloat16``: parameters built in it (never a float32 copy), a file's
    float32 tensors converted as they load, images cast to it on the way in, tokens within
    bfloat16's rounding of the float32 model's."""
    arch = "vit_pe_core_base_patch16_224"
    arch_kwargs, size, _, _ = FAMILIES[arch]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, img_size=size, **arch_kwargs)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    options = {"weights": str(tmp_path / "weights.safetensors"), "arch_kwargs": arch_kwargs}
    full = FrozenBackbone(arch, img_size=size, **options)
    half = FrozenBackbone(arch, img_size=size, dtype="bfloat16", **options)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        half.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.bfloat16()
    )
    tokens, reference = half(images(size)).all, full(images(size)).all
    assert tokens.dtype == torch.bfloat16
    error = (tokens.float() - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error
    with pytest.raises(ConfigError, match="backbone.dtype='float16' is no weight precision"):
        FrozenBackbone("vit_tiny_patch16_224", img_size=32, dtype="float16")
    with pytest.raises(ConfigError, match="backbone.dtype=bfloat16: capi_vitl14 cannot be built"):
        FrozenBackbone("capi_vitl14", img_size=28, arch_kwargs={"depth": 1}, dtype="bfloat16")


def test_the_weights_dtype_names_runs_and_caches_only_when_set(tmp_path):
    """bfloat16 weights give other numbers: another run and another cache. float32, the
    default the key was added with, is left out of both, so earlier runs keep their names."""
    from mim_agg.backbones import TokenRequest as Request
    from mim_agg.cache.identity import cache_identity
    from mim_agg.runs.identity import result_config
    from tests.helpers import FAST, compose_config

    default = compose_config(FAST, tmp_path)
    half = compose_config([*FAST, "backbone.dtype=bfloat16"], tmp_path)
    assert "dtype" not in result_config(default)["backbone"]
    assert result_config(half)["backbone"]["dtype"] == "bfloat16"
    identities = [cache_identity(c, Request(tokens=True), {}, {}, 10) for c in (default, half)]
    assert "weights_dtype" not in identities[0]
    assert identities[1]["weights_dtype"] == "bfloat16"
    assert {k: v for k, v in identities[1].items() if k != "weights_dtype"} == identities[0]


def test_a_hiera_config_refuses_center_attn_before_fetching_anything(tmp_path):
    from mim_agg.builders import build_probe
    from tests.helpers import compose_config

    cfg = compose_config(["backbone=hiera_vitb_mae", "aggregator=center_attn"], tmp_path)
    with pytest.raises(ConfigError, match="hiera_base_224 \\(Hiera\\) does not expose attention"):
        build_probe(cfg, num_classes=10)


def test_summary_tokens_must_be_leading_prefix_tokens_of_a_model_with_a_cls():
    """backbone.summary_tokens counts prefix tokens from the [cls]: beyond the prefix, or on a
    model without a [cls], it is refused by name before anything loads."""
    from mim_agg.backbones.frozen import skeleton

    radio = {"arch": "vit_base_patch16_224", "arch_kwargs": {"reg_tokens": 7, "depth": 1}}
    assert skeleton(**radio, summary_tokens=3).layout.num_summary_tokens == 3
    assert skeleton(**radio).layout.num_summary_tokens == 1  # the [cls] alone
    with pytest.raises(ConfigError, match=r"summary_tokens=9 must lie in \[1, 8\]"):
        skeleton(**radio, summary_tokens=9)
    with pytest.raises(ConfigError, match="this model has no \\[cls\\] token, so no summary"):
        skeleton(arch="vit_base_patch16_siglip_224", arch_kwargs={"depth": 1}, summary_tokens=1)
