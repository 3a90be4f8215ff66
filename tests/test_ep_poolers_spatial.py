"""Fidelity of efficient-probing's poolers ``jepa``, ``dolg``, ``cae``, ``cbam`` and its
variants of ``abmilp``, ``simpool``, ``ep`` (billpsomas/efficient-probing, ``probe_heads.py``,
``poolings/``), and of "Beyond [cls]"'s centre attention (gmum/beyond_cls, ``ca<k>``):
trainable-parameter counts worked out from their published structure, outputs against
reference forwards written here in plain torch ops, and a few training steps.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mim_agg.aggregators import build_aggregator
from mim_agg.aggregators.center_attention import (
    center_attention,
    center_window,
    inner_window,
    window_attention,
)
from mim_agg.backbones import TokenLayout, Tokens
from mim_agg.errors import ConfigError

DIM, SIDE = 32, 4  # small: the reference and training checks
PREFIX = 5  # [cls] and 4 registers: registers must never reach an output
EPS = dict(atol=1e-5, rtol=1e-5)

# efficient-probing's leaderboard settings (main_linprobe.py defaults) in our options
THEIRS = {
    "jepa_pool": {},
    "dolg_pool": {},
    "cae_pool": {},
    "cbam_pool": {},
    "abmilp": {"depth": 2, "activation": "tanh", "self_attn": "both"},
    "simpool": {},
    "efficient_probe": {"num_queries": 32, "d_out": 1},
}
GRID_POOLERS = ("dolg_pool", "cbam_pool")


def layout(dim=DIM, side=SIDE, prefix=PREFIX) -> TokenLayout:
    return TokenLayout(dim, prefix, prefix > 0, (side, side), num_heads=2, depth=12)


def build(name, dim=DIM, side=SIDE, prefix=PREFIX, **options):
    return build_aggregator(name, layout(dim, side, prefix), **options)


def random_tokens(batch=3, seed=0, dim=DIM) -> Tokens:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, PREFIX + SIDE * SIDE, dim, generator=generator)
    return Tokens(layout(dim), values)


def token_set(tokens: Tokens, which: str) -> torch.Tensor:
    """Written out again from the token layout: [cls] is token 0, registers 1..4."""
    values = tokens.all
    return (
        values[:, PREFIX:]
        if which == "patch"
        else torch.cat([values[:, :1], values[:, PREFIX:]], 1)
    )


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- (a) trainable parameters at ViT-B (768) and ViT-L (1024) ------------------------------


def expected_parameters(name: str, d: int) -> int:
    """Worked out from efficient-probing's modules at the settings ``probe_heads.py`` uses."""
    if name == "jepa_pool":  # AttentivePooler(embed_dim=d, num_heads=16): one CrossAttentionBlock
        return (
            d  # query_tokens: one learned query
            + 2 * d  # norm1: LayerNorm of the keys/values input
            + d * d + d  # xattn.q: Linear(d, d) with bias
            + 2 * d * d + 2 * d  # xattn.kv: Linear(d, 2d) with bias
            + d * d + d  # xattn.proj: Linear(d, d) with bias
            + 2 * d  # norm2: LayerNorm before the MLP
            + d * 4 * d + 4 * d  # mlp.fc1: Linear(d, 4d) with bias
            + 4 * d * d + d  # mlp.fc2: Linear(4d, d) with bias
        )  # fmt: skip
    if name == "dolg_pool":  # SpatialAttention2d(in_c=d, s3_dim=d, with_aspp=False)
        return (
            d * d + d  # conv1: Conv2d(d, d, 1) with bias
            + 2 * d  # bn: BatchNorm2d(d) weight + bias
            + d + 1  # conv2: Conv2d(d, 1, 1) with bias
        )  # fmt: skip
    if name == "cae_pool":  # CAEAttentiveBlock(dim=d): 8 heads, qkv_bias=False
        return (
            d  # query_token
            + 3 * 2 * d  # norm1_q, norm1_k, norm1_v: LayerNorm weight + bias each
            + 3 * d * d  # cross_attn.q, .k, .v: Linear(d, d), no bias
            + d * d
            + d  # cross_attn.proj: Linear(d, d) with bias
        )  # their norm2_cross (2 d) is built but never used: left out (see CaePool)
    if name == "cbam_pool":  # CbamPooling(channels=d, spatial_kernel_size=7)
        return (
            d * (d // 16)  # channel.fc1: Conv2d(d, d/16, 1), no bias
            + (d // 16) * d  # channel.fc2: Conv2d(d/16, d, 1), no bias
            + 2 * 7 * 7  # spatial.conv.conv: Conv2d(2, 1, 7), no bias
            + 2  # spatial.conv.bn: BatchNorm2d(1) weight + bias
        )
    if name == "abmilp":  # ABMILPHead(sa=both, act=tanh, depth=2)
        return (
            3 * d * d  # self_attn.qkv: Linear(d, 3d), no bias (one head)
            + d * d + d  # self_attn.proj: Linear(d, d) with bias
            + d * d + d  # attention_predictor[0]: Linear(d, d) with bias, then tanh
            + d + 1  # attention_predictor[2]: Linear(d, 1) with bias
        )  # fmt: skip
    if name == "simpool":  # SimPool(num_heads=1, qkv_bias=False, gamma=None)
        return (
            2 * d  # norm_patches: LayerNorm weight + bias
            + d * d  # wq: Linear(d, d), no bias
            + d * d  # wk: Linear(d, d), no bias
        )
    if name == "efficient_probe":  # EfficientProbing(num_queries=32, d_out=1)
        return (
            32 * d  # cls_token: 32 learned queries
            + d * d  # v: Linear(d, d // d_out), no bias
        )
    raise KeyError(name)


@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("name", sorted(THEIRS))
def test_parameter_count_equals_theirs(name, dim):
    aggregator = build(name, dim=dim, side=14, prefix=1, **THEIRS[name])
    assert trainable(aggregator) == expected_parameters(name, dim)


def test_parameter_counts_at_vit_b_as_the_docs_say():
    """The figures the docstrings (and the README's table) quote."""
    quoted = {
        "jepa_pool": 7_088_640,
        "dolg_pool": 592_897,
        "cae_pool": 2_365_440,
        "cbam_pool": 73_828,
        "abmilp": 2_951_425,
        "simpool": 1_181_184,
        "efficient_probe": 614_400,
    }
    assert {name: expected_parameters(name, 768) for name in quoted} == quoted


# ---- (b) outputs against reference forwards in plain torch ops -----------------------------


def attention(q, k, v, heads):
    """Multi-head softmax attention, ``[B, n, D]`` queries over ``[B, N, D]`` keys/values."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    out = weights @ v
    return out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def reference_jepa(m, x):
    q = m.query.expand(len(x), -1, -1)
    kv = layer_norm(x, m.norm_kv)
    k, v = linear(kv, m.kv).chunk(2, dim=-1)
    q = q + linear(attention(linear(q, m.q), k, v, m.num_heads), m.proj)
    hidden = F.gelu(linear(layer_norm(q, m.norm_mlp), m.mlp.fc1))
    return (q + linear(hidden, m.mlp.fc2))[:, 0]


def reference_cae(m, x):
    q = layer_norm(m.query.expand(len(x), -1, -1), m.norm_q)
    k, v = layer_norm(x, m.norm_k), layer_norm(x, m.norm_v)
    out = attention(linear(q, m.q), linear(k, m.k), linear(v, m.v), m.num_heads)
    return linear(out, m.proj)[:, 0]


def batch_norm(x, bn, training):
    """BatchNorm over every axis but 1 (channels)."""
    axes = [a for a in range(x.dim()) if a != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean, var = x.mean(axes), x.var(axes, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return normed * bn.weight.view(shape) + bn.bias.view(shape)


def reference_dolg(m, x, training):
    """On ``[B, N, D]`` tokens: 1x1 convolutions are per-position linear maps."""
    w1, w2 = m.conv.weight[:, :, 0, 0], m.score.weight[:, :, 0, 0]
    f = x @ w1.T + m.conv.bias  # [B, N, D]
    f = batch_norm(f.transpose(1, 2), m.bn, training).transpose(1, 2)
    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    score = torch.log1p(torch.exp(torch.relu(f) @ w2.T + m.score.bias))  # softplus, [B, N, 1]
    return (score * unit).mean(1)


def reference_cbam(m, x, training, side=SIDE):
    grid = x.transpose(1, 2).reshape(len(x), -1, side, side)  # [B, D, H, W]
    fc1, fc2 = m.cbam.channel.fc1.weight[:, :, 0, 0], m.cbam.channel.fc2.weight[:, :, 0, 0]
    mlp = lambda pooled: torch.relu(pooled @ fc1.T) @ fc2.T  # noqa: E731
    gate = torch.sigmoid(mlp(grid.mean((2, 3))) + mlp(grid.amax((2, 3))))  # [B, D]
    y = grid * gate[:, :, None, None]
    maps = torch.stack([y.mean(1), y.amax(1)], dim=1)  # [B, 2, H, W]
    conv = m.cbam.spatial.conv
    pad = conv.conv.weight.shape[-1] // 2
    spatial = F.conv2d(maps, conv.conv.weight, padding=pad)
    y = y * torch.sigmoid(batch_norm(spatial, conv.bn, training))
    return torch.relu(y + grid).mean((2, 3))


def reference_abmilp(m, x):
    """Their ABMILPHead with sa=both: one-head self-attention, then the scorer MLP."""
    qkv = m.self_attn.qkv.weight
    q, k, v = x @ qkv[:DIM].T, x @ qkv[DIM : 2 * DIM].T, x @ qkv[2 * DIM :].T
    attended = linear(attention(q, k, v, heads=1), m.self_attn.proj)
    scores = linear(torch.tanh(linear(attended, m.scorer[0])), m.scorer[2])  # [B, N, 1]
    return (scores.softmax(dim=1) * attended).sum(1)


def reference_simpool(m, x):
    normed = layer_norm(x, m.norm)
    query = x.mean(1, keepdim=True) @ m.query.weight.T  # the mean of the raw tokens
    weights = (query @ (normed @ m.key.weight.T).transpose(1, 2) / math.sqrt(DIM)).softmax(-1)
    return (weights @ normed)[:, 0]


def reference_efficient_probe(m, x, queries=32):
    weights = (m.queries @ x.transpose(1, 2) / math.sqrt(DIM)).softmax(-1)  # [B, M, N]
    values = (x @ m.values.weight.T).reshape(len(x), x.shape[1], queries, -1)  # [B, N, M, d]
    return torch.cat([(weights[:, j, :, None] * values[:, :, j]).sum(1) for j in range(queries)], 1)


REFERENCES = {
    "jepa_pool": lambda m, x, training: reference_jepa(m, x),
    "cae_pool": lambda m, x, training: reference_cae(m, x),
    "dolg_pool": reference_dolg,
    "cbam_pool": reference_cbam,
    "abmilp": lambda m, x, training: reference_abmilp(m, x),
    "simpool": lambda m, x, training: reference_simpool(m, x),
    "efficient_probe": lambda m, x, training: reference_efficient_probe(m, x),
}
CASES = [
    (name, which, training)
    for name in sorted(REFERENCES)
    for which in (("patch",) if name in GRID_POOLERS else ("patch", "all"))
    for training in (True, False)
]


def perturb(module):
    """Move every parameter and statistic off its initial value, so that zero biases, unit
    norms, a zero query or fresh running statistics cannot hide a term."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.abs_().add_(0.5)


@pytest.mark.parametrize(("name", "which", "training"), CASES)
def test_output_equals_a_reference_forward(name, which, training):
    torch.manual_seed(0)
    aggregator = build(name, **THEIRS[name], tokens=which)
    perturb(aggregator)
    aggregator.train(training)
    tokens = random_tokens()
    expected = REFERENCES[name](aggregator, token_set(tokens, which), training)
    with torch.no_grad():
        torch.testing.assert_close(aggregator(tokens), expected, **EPS)


@pytest.mark.parametrize("name", GRID_POOLERS)
def test_grid_poolers_refuse_cls_by_name(name):
    with pytest.raises(ConfigError, match=rf"aggregator='{name}' pools the 2-D patch grid"):
        build(name, tokens="all")


def test_abmilp_all_is_cls_then_patches_without_registers():
    aggregator = build("abmilp", tokens="all")
    tokens = random_tokens()
    with torch.no_grad():
        aggregator.scorer[0].weight.zero_()
        aggregator.scorer[0].bias.zero_()
    torch.testing.assert_close(aggregator(tokens), token_set(tokens, "all").mean(1))
    assert aggregator.pooling_weights(tokens).shape == (3, SIDE * SIDE)


def test_abmilp_pos_cond_is_maes_embedding_added_to_the_scorer_input_after_self_attention():
    """The authors' ``cond=pe``: MAE's ``get_2d_sincos_pos_embed`` (``[sin x, cos x, sin y,
    cos y]``, x the column), a zero row for [cls], added after the self-attention, so it
    conditions the scores but never reaches the pooled values."""
    torch.manual_seed(0)
    aggregator = build("abmilp", **THEIRS["abmilp"], pos_cond=True, tokens="all")
    pe = aggregator.pos_embed  # [1 + N, D]
    quarter = DIM // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    column, row = 3, 1  # patch 1 * SIDE + 3
    expected = torch.cat([(column * omega).sin(), (column * omega).cos()])
    expected = torch.cat([expected, (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(pe[1 + row * SIDE + column], expected)
    assert not pe[0].any()
    tokens = random_tokens()
    x = token_set(tokens, "all")
    qkv = aggregator.self_attn.qkv.weight
    q, k, v = x @ qkv[:DIM].T, x @ qkv[DIM : 2 * DIM].T, x @ qkv[2 * DIM :].T
    attended = linear(attention(q, k, v, heads=1), aggregator.self_attn.proj)
    hidden = torch.tanh(linear(attended + pe, aggregator.scorer[0]))
    weights = linear(hidden, aggregator.scorer[2]).softmax(dim=1)
    with torch.no_grad():
        torch.testing.assert_close(aggregator(tokens), (weights * attended).sum(1), **EPS)


def test_jepa_init_is_v_jepas():
    """Truncated-normal std 0.02 weights, zero biases, residual projections over sqrt(2)."""
    torch.manual_seed(0)
    pool = build("jepa_pool", dim=768, side=14, prefix=1)
    for layer in (pool.q, pool.kv, pool.mlp.fc1):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert not layer.bias.any()
    for layer in (pool.proj, pool.mlp.fc2):
        assert layer.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert pool.query.std().item() == pytest.approx(0.02, rel=0.1)


def test_dolg_init_is_resnet_style():
    torch.manual_seed(0)
    pool = build("dolg_pool", dim=768, side=14, prefix=1)
    assert pool.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 768), rel=0.02)
    assert pool.score.weight.std().item() == pytest.approx(math.sqrt(2), rel=0.1)


# ---- centre attention ("Beyond [cls]": ca1..ca4) ------------------------------------------


def test_center_window_is_the_authors_rule():
    # side 14 (ViT-B/16 at 224 px): their c = 7, s = c - ceil(k/2), e = c + floor(k/2)
    assert [center_window(14, k) for k in (1, 2, 3, 4)] == [
        slice(6, 7), slice(6, 8), slice(5, 8), slice(5, 9),
    ]  # fmt: skip
    assert center_window(5, 1) == slice(1, 2)  # odd grid, odd k: one up-left of the centre
    assert center_window(5, 4) == slice(0, 4)
    with pytest.raises(ConfigError, match=r"aggregator.k=5 must lie in \[1, 4\]"):
        center_window(5, 5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_center_attention_equals_the_authors_forward(k):
    """Their ``ca<k>``, re-derived with explicit loops over window patches and heads."""
    generator = torch.Generator().manual_seed(k)
    batch, heads, side, n = 2, 3, 6, 36
    tokens = torch.randn(batch, PREFIX + n, DIM, generator=generator)
    attn = torch.randn(batch, heads, PREFIX + n, PREFIX + n, generator=generator).softmax(-1)
    grid_layout = TokenLayout(DIM, PREFIX, True, (side, side), num_heads=heads)
    start = side // 2 - math.ceil(k / 2)
    window = [
        PREFIX + r * side + c for r in range(start, start + k) for c in range(start, start + k)
    ]
    expected = torch.zeros(batch, DIM)
    for b in range(batch):
        row = sum(attn[b, h, q, PREFIX:] for q in window for h in range(heads)) / (heads * k * k)
        weights = row / (row.sum() + 1e-6)
        expected[b] = sum(weights[i] * tokens[b, PREFIX + i] for i in range(n)) / n
    rows = window_attention(attn, grid_layout, k)
    assert rows.shape == (batch, k * k, n)
    torch.testing.assert_close(center_attention(tokens[:, PREFIX:], rows), expected, **EPS)
    outer = window_attention(attn, grid_layout, 4)  # a source keeping the largest window
    torch.testing.assert_close(inner_window(outer, 4, k), rows)


# ---- (c) a few optimiser steps lower a loss -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "which"),
    [
        (n, w)
        for n in sorted(THEIRS)
        for w in (("patch",) if n in GRID_POOLERS else ("patch", "all"))
    ],
)
def test_a_few_steps_lower_a_loss(name, which):
    torch.manual_seed(0)
    aggregator = build(name, **THEIRS[name], tokens=which)
    readout = torch.nn.Linear(aggregator.out_dim, 3)
    tokens, labels = random_tokens(batch=8, seed=1), torch.arange(8) % 3
    params = [*aggregator.parameters(), *readout.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(readout(aggregator(tokens)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in aggregator.parameters())  # none is dead (DDP)


@pytest.mark.parametrize("dim", [768, 1024])
def test_attentive_probe_has_jepas_count_but_not_its_structure(dim):
    """Equal counts (``12 D^2 + 14 D``), different modules: timm's latent pool has no residual
    to the query, so the two are kept apart (see ``JepaPool``)."""
    probe = build("attentive_probe", dim=dim, side=14, prefix=1)
    assert trainable(probe) == expected_parameters("jepa_pool", dim)
    torch.manual_seed(0)
    small = build("attentive_probe")
    perturb(small)
    tokens = random_tokens()
    pool = small.pool
    x = layer_norm(token_set(tokens, "patch"), small.input_norm)
    k, v = linear(x, pool.kv).chunk(2, dim=-1)
    attended = attention(linear(pool.latent.expand(3, -1, -1), pool.q), k, v, 16)
    y = linear(attended, pool.proj)  # no query added back: V-JEPA's has q + proj(...)
    y = y + linear(F.gelu(linear(layer_norm(y, pool.norm), pool.mlp.fc1)), pool.mlp.fc2)
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), y[:, 0], **EPS)
