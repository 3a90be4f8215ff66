"""``center_attn`` end to end ("Beyond [cls]", ``ca<k>``): the rows the live backbone keeps
equal the probed block's attention computed here from its qkv, the registered aggregator on a
real tiny ViT equals the authors' math written out in loops, and a token cache serves it (and
stores the rows) as the live source gives them, for several blocks from one pass too."""

from __future__ import annotations

import math

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import default_collate

from mim_agg.aggregators import build_aggregator, token_request
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenLayout, TokenRequest, Tokens
from mim_agg.builders import backbone_layout, build_aggregators, build_datamodule, build_probe
from mim_agg.cache import CachedTokens, TokenCache, open_cache
from mim_agg.cache.data import CachedSplit
from mim_agg.cache.extract import field_shapes, stored_fields
from mim_agg.errors import ConfigError
from tests.helpers import FAST, TINY_ARCH, compose_config

SIDE = 4  # 64 px at patch 16: a 4 x 4 grid, room for every window k = 1..4

REGISTERS = [0, 4]  # [cls] alone, and [cls] + 4 registers (prefix tokens, never patches)


def images(batch=2, seed=0, side=SIDE):
    size = 16 * side
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def backbone(registers: int, block: int = 2, side: int = SIDE) -> FrozenBackbone:
    torch.manual_seed(0)
    kwargs = {"reg_tokens": registers} if registers else {}
    return FrozenBackbone(TINY_ARCH, block=block, img_size=16 * side, arch_kwargs=kwargs)


def explicit_attention(model: FrozenBackbone, x: torch.Tensor, block: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of block ``block`` ``[B, H, T, T]``, from its qkv applied to the
    previous block's output (timm's public ``forward_intermediates`` of an unpruned copy)."""
    kwargs = {"reg_tokens": model.layout.num_prefix_tokens - 1}
    size = model.img_size
    reference = timm.create_model(TINY_ARCH, num_classes=0, img_size=size, **kwargs).eval()
    reference.load_state_dict(model.model.state_dict(), strict=False)  # blocks 0..block agree
    with torch.no_grad():
        patches, prefix = reference.forward_intermediates(
            x,
            indices=[block - 1],
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
        hidden = torch.cat([prefix, patches], dim=1)
        layer = reference.blocks[block]
        heads = layer.attn.num_heads
        batch, tokens, dim = hidden.shape
        qkv = layer.attn.qkv(layer.norm1(hidden)).reshape(batch, tokens, 3, heads, dim // heads)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, T, d]
        return (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)


def window_rows(attn: torch.Tensor, prefix: int, k: int, side: int = SIDE) -> torch.Tensor:
    """The authors' window (``c = side // 2``, ``[c - ceil(k/2), c + floor(k/2))``), its
    head-mean rows over the patch columns, one patch at a time."""
    start = side // 2 - math.ceil(k / 2)
    window = [
        prefix + r * side + c for r in range(start, start + k) for c in range(start, start + k)
    ]
    mean = attn.mean(dim=1)
    return torch.stack([mean[:, q, prefix:] for q in window], dim=1)


def authors_ca(patches, attn, prefix: int, k: int, side: int) -> torch.Tensor:
    """Their ``ca<k>``: the window rows' mean, divided by its sum + 1e-6, then the mean over
    the patches of ``w_i z_i``."""
    rows = window_rows(attn, prefix, k, side).mean(dim=1)
    weights = rows / (rows.sum(dim=-1, keepdim=True) + 1e-6)
    return (patches * weights.unsqueeze(-1)).mean(dim=1)


# ---- the live source ------------------------------------------------------------------------


@pytest.mark.parametrize("registers", REGISTERS)
def test_live_center_rows_equal_an_explicit_softmax_for_several_blocks(registers):
    """Blocks 1 and 2 from one pass: block 2 keeps its [cls] row and its 4 x 4 window, block 1
    its 2 x 2 window; block 0 keeps timm's fused kernel; only the rows are kept."""
    model = backbone(registers)
    model.provide(TokenRequest(tokens=True, cls_attn=True, center_rows=SIDE))
    model.provide(TokenRequest(tokens=True, center_rows=2), block=1)
    x = images()
    tokens = model.forward_blocks(x)
    prefix = 1 + registers
    for block, k in ((2, SIDE), (1, 2)):
        expected = explicit_attention(model, x, block)
        kept = tokens[block].center_attn
        assert kept.shape == (2, k * k, SIDE * SIDE)
        torch.testing.assert_close(kept, window_rows(expected, prefix, k))
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()  # a copy
    expected = explicit_attention(model, x, 2)
    torch.testing.assert_close(tokens[2].cls_attn, expected[:, :, 0, prefix:])
    assert tokens[1].cls_attn is None
    assert model.model.blocks[0].attn.fused_attn
    assert not model.model.blocks[1].attn.fused_attn and not model.model.blocks[2].attn.fused_attn


def test_rows_are_captured_only_when_requested():
    model = backbone(0)
    assert model(images()).center_attn is None
    assert all(block.attn.fused_attn for block in model.model.blocks)


def test_windows_that_leave_the_grid_are_refused_by_name():
    model = backbone(0)  # 4 x 4
    with pytest.raises(ConfigError, match=r"aggregator.k=5 must lie in \[1, 4\]"):
        model.provide(TokenRequest(center_rows=5))
    wide = TokenLayout(32, 1, True, (6, 2), num_heads=2)  # validated on both axes
    build_aggregator("center_attn", wide, k=2)
    with pytest.raises(ConfigError, match=r"aggregator.k=3 must lie in \[1, 2\] .* side 2"):
        build_aggregator("center_attn", wide, k=3)


def test_requests_merge_to_the_largest_window_and_name_it_in_the_cache_identity():
    merged = TokenRequest(center_rows=2) | TokenRequest(tokens=True, center_rows=3)
    assert merged == TokenRequest(tokens=True, center_rows=3)
    assert TokenRequest(center_rows=2).as_dict() != TokenRequest(center_rows=3).as_dict()
    assert "center_rows" not in TokenRequest(tokens=True).as_dict()  # older caches keep keys


# ---- the registered aggregator --------------------------------------------------------------


@pytest.mark.parametrize(("registers", "side"), [(0, 4), (4, 5)])
def test_center_attn_on_a_tiny_vit_equals_the_authors_math(registers, side):
    """One source serves k = 1..4 (it keeps the 4 x 4 window; the others nest inside). On the
    odd grid the authors' window of odd k sits one patch up and left of the centre."""
    model = backbone(registers, side=side)
    layout = model.layout
    aggregators = {k: build_aggregator("center_attn", layout, k=k) for k in (1, 2, 3, 4)}
    assert all(a.parameter_free and not a.needs_cls for a in aggregators.values())
    request = token_request(aggregators.values())
    assert request == TokenRequest(tokens=True, center_rows=4)
    source = LiveTokens(model, {model.block: request})
    x = images(side=side)
    tokens = source(x)
    attn = explicit_attention(model, x, model.block)
    prefix = 1 + registers
    for k, aggregator in aggregators.items():
        expected = authors_ca(tokens.patches, attn, prefix, k, side)
        torch.testing.assert_close(aggregator(tokens), expected, atol=1e-5, rtol=1e-5)
        weights = aggregator.pooling_weights(tokens)
        torch.testing.assert_close(
            torch.einsum("bn,bnd->bd", weights, tokens.patches), expected, atol=1e-5, rtol=1e-5
        )


def test_default_k_and_example_tokens():
    layout = TokenLayout(32, 1, True, (SIDE, SIDE), num_heads=2)
    aggregator = build_aggregator("center_attn", layout)
    assert aggregator.output_key == "center_attn(k=2)"
    assert aggregator.request() == TokenRequest(tokens=True, center_rows=2)
    example = Tokens.example(layout, TokenRequest(tokens=True, center_rows=3), batch=2, seed=0)
    assert example.center_attn.shape == (2, 9, SIDE * SIDE)
    torch.testing.assert_close(example.center_attn.sum(-1), torch.ones(2, 9))
    assert aggregator(example).shape == (2, 32)


# ---- the token cache ------------------------------------------------------------------------

GRID_4x4 = [*FAST, f"backbone.img_size={16 * SIDE}", "cache.dtype=float32"]
HEADS = ["aggregator=center_attn", "+aggregator@heads.ca4=center_attn", "heads.ca4.k=4"]


def cache_for(overrides, tmp_path):
    cfg = compose_config([*GRID_4x4, *overrides], tmp_path)
    L.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    aggregators = build_aggregators(cfg, backbone_layout(cfg)).values()
    return cfg, datamodule, open_cache(cfg, datamodule, list(aggregators))


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_a_cache_serves_center_attn_as_the_live_backbone_gives_it(tmp_path):
    cfg, datamodule, cache = cache_for(HEADS, tmp_path)
    assert cache.manifest["fields"] == {
        "pooled/center_attn(k=2)": [192],
        "pooled/center_attn(k=4)": [192],
    }
    items = CachedSplit(cache, "test")
    fields, targets = default_collate([items[i] for i in range(8)])
    cached = CachedTokens.of(cache)(fields)
    probe = build_probe(cfg, datamodule.num_classes)
    images, live_targets = default_collate([datamodule.splits["test"][i] for i in range(8)])
    live = probe.source(images)
    assert torch.equal(targets, live_targets) and cached.all is None
    with torch.no_grad():
        for name, head in probe.heads.items():
            served, computed = head.aggregator(cached), head.aggregator(live)
            torch.testing.assert_close(served, computed, rtol=0, atol=1e-6, msg=name)
    _, _, other = cache_for(["aggregator=center_attn", "aggregator.k=3"], tmp_path)
    assert other.root != cache.root  # another window is another cache


@pytest.mark.slow  # trains, extracts or runs for seconds (make test-fast skips it)
def test_several_blocks_caches_from_one_pass_equal_separate_ones(tmp_path):
    heads = [*HEADS, "backbone.block=2"]
    cache_for([*heads, "cache.blocks=[1,2]"], tmp_path / "together")
    _, _, apart = cache_for([*HEADS, "backbone.block=1"], tmp_path / "apart")
    joint = TokenCache(tmp_path / "together" / "cache" / apart.root.name)
    assert joint.complete and joint.manifest["identity"]["block"] == 1
    for split in ("train", "heldout", "test"):
        ours, theirs = joint.open_shard(split, 0), apart.open_shard(split, 0)
        assert ours.keys() == theirs.keys()
        for field in ours:
            torch.testing.assert_close(ours[field], theirs[field], rtol=1e-5, atol=1e-5)


def test_the_rows_are_stored_and_served_like_every_field():
    """No run stores the rows today (a cache keeps this parameter-free aggregator's output), but
    the field goes through a cache's shapes, storage and reading as the others do."""
    model = backbone(4)
    request = TokenRequest(tokens=True, center_rows=3)
    model.provide(request)
    live = model(images())
    shapes = field_shapes(model.layout, request, {})
    assert shapes == {"all": (21, 192), "center_attn": (9, 16)}
    served = CachedTokens(model.layout)(stored_fields(live, shapes, {}, "float32"))
    torch.testing.assert_close(served.center_attn, live.center_attn, rtol=0, atol=0)
    aggregator = build_aggregator("center_attn", model.layout, k=3)
    torch.testing.assert_close(aggregator(served), aggregator(live), rtol=0, atol=0)
