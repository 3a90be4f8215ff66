"""Fidelity of efficient-probing's attention poolers (billpsomas/efficient-probing,
``probe_heads.py``): trainable-parameter counts worked out from their published structure,
outputs against reference forwards written here in plain torch ops, and a few training steps.
"""

import pytest
import torch
import torch.nn.functional as F

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import TokenLayout, Tokens
from mim_agg.errors import ConfigError

POOLERS = [
    "esimpool",
    "clip_pool",
    "siglip_pool",
    "aim_pool",
    "coca_pool",
    "cait_pool",
    "vit_block_pool",
]
DIM, SIDE, HEADS = 32, 4, 2  # small: the reference and training checks
N = 196  # the 14 x 14 grid of ViT-B/16 and ViT-L/16 at 224 px, for the parameter counts


def layout(dim=DIM, side=SIDE, heads=HEADS, prefix=1) -> TokenLayout:
    return TokenLayout(dim, prefix, prefix > 0, (side, side), num_heads=heads, depth=12)


def random_tokens(batch=3, prefix=1, seed=0) -> Tokens:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, prefix + SIDE * SIDE, DIM, generator=generator)
    return Tokens(layout(prefix=prefix), values)


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- (a) trainable parameters at ViT-B (768, 12 heads) and ViT-L (1024, 16 heads) ----------


def expected_parameters(name: str, d: int) -> int:
    """Worked out from efficient-probing's modules at the settings ``probe_heads.py`` uses."""
    if name == "esimpool":  # SimPool_nolinears(num_heads=12)
        return 2 * d  # norm_patches: LayerNorm weight + bias (shared by query and keys)
    if name == "clip_pool":  # AttentionPool2d(in_features=d, feat_size=14), 4 heads
        return (
            2 * d  # norm: LayerNorm weight + bias
            + (N + 1) * d  # pos_embed: the mean token and N patches
            + 3 * d * d + 3 * d  # qkv: Linear(d, 3d) with bias
            + d * d + d  # proj: Linear(d, d) with bias
        )  # fmt: skip
    if name == "siglip_pool":  # AttentionPoolLatent(in_features=d): 8 heads, norm_layer=None
        return (
            d  # latent: one learned query
            + d * d + d  # q: Linear(d, d) with bias
            + 2 * d * d + 2 * d  # kv: Linear(d, 2d) with bias
            + d * d + d  # proj: Linear(d, d) with bias
            + d * 4 * d + 4 * d  # mlp.fc1: Linear(d, 4d) with bias
            + 4 * d * d + d  # mlp.fc2: Linear(4d, d) with bias
        )  # fmt: skip
    if name == "aim_pool":  # AttentionPoolingClassifier(dim=d, num_heads=16)
        return (
            d  # cls_token: the learned query, not projected
            + d * d  # k: Linear(d, d), no bias
            + d * d  # v: Linear(d, d), no bias
        )  # bn: BatchNorm1d(affine=False) has no trainable parameters
    if name == "coca_pool":  # CrossAttention(dim=d): 196 queries, 8 heads x 64, one k/v head
        return (
            196 * d  # img_queries
            + d  # norm: LayerNorm gamma (beta is a zero buffer)
            + d * 8 * 64  # to_q: Linear(d, 512), no bias
            + d * 2 * 64  # to_kv: Linear(d, 128), no bias
            + 8 * 64 * d  # to_out: Linear(512, d), no bias
        )
    if name == "cait_pool":  # CAPooling(embed_dim=d): one LayerScale_Block_CA, 4 heads
        return (
            d  # cls_token
            + 2 * d  # norm1
            + 3 * (d * d + d)  # q, k, v: Linear(d, d) with bias
            + d * d + d  # proj: Linear(d, d) with bias
            + 2 * d  # gamma_1, gamma_2 (LayerScale)
            + 2 * d  # norm2
            + d * 4 * d + 4 * d  # mlp.fc1
            + 4 * d * d + d  # mlp.fc2
            + 2 * d  # norm: the final LayerNorm
        )  # fmt: skip
    if name == "vit_block_pool":  # DinoViTBlockPooling(d_model=d): DINOv2 Block, 8 heads
        return (
            2 * d  # norm1
            + 3 * d * d  # attn.qkv: Linear(d, 3d), no bias
            + d * d + d  # attn.proj: Linear(d, d) with bias
            + 2 * d  # norm2
            + d * 4 * d + 4 * d  # mlp.fc1
            + 4 * d * d + d  # mlp.fc2
        )  # fmt: skip
    raise KeyError(name)


@pytest.mark.parametrize("name", POOLERS)
@pytest.mark.parametrize(("dim", "heads"), [(768, 12), (1024, 16)])
def test_trainable_parameters_equal_efficient_probings(name, dim, heads):
    with torch.device("meta"):  # shapes only: nothing is drawn
        aggregator = build_aggregator(name, layout(dim, side=14, heads=heads))
    assert trainable(aggregator) == expected_parameters(name, dim)
    assert aggregator.out_dim == dim  # what their pooler hands the BatchNorm + linear classifier


def test_the_readme_counts_at_vit_b():
    counts = {name: expected_parameters(name, 768) for name in POOLERS}
    assert counts == {
        "esimpool": 1_536,
        "clip_pool": 2_515_200,
        "siglip_pool": 7_085_568,
        "aim_pool": 1_180_416,
        "coca_pool": 1_036_032,
        "cait_pool": 7_091_712,
        "vit_block_pool": 7_085_568,
    }


# ---- (b) outputs against reference forwards in plain torch ops ------------------------------


def attention(q, k, v, heads):
    """Multi-head scaled dot-product attention: ``[B, Q, D]`` queries over ``[B, T, D]``."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def norm(x, layer, eps):
    return F.layer_norm(x, x.shape[-1:], layer.weight, layer.bias, eps)


def mlp(x, mlp):
    return linear(F.gelu(linear(x, mlp.fc1)), mlp.fc2)


def reference_esimpool(m, x):
    query = norm(x.mean(1, keepdim=True), m.norm, 1e-6)
    return attention(query, norm(x, m.norm, 1e-6), x, m.num_heads)[:, 0]


def reference_clip_pool(m, x):
    x = norm(x, m.norm, 1e-6)
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + m.pool.pos_embed
    q, k, v = linear(x, m.pool.qkv).chunk(3, dim=-1)
    return linear(attention(q, k, v, m.pool.num_heads), m.pool.proj)[:, 0]


def reference_siglip_pool(m, x):
    p = m.pool
    q = linear(p.latent.expand(len(x), -1, -1), p.q)
    k, v = linear(x, p.kv).chunk(2, dim=-1)
    y = linear(attention(q, k, v, p.num_heads), p.proj)
    return (y + mlp(y, p.mlp))[:, 0]  # no norm before the MLP


def reference_aim_pool(m, x):
    if m.training:  # batch statistics over images and tokens, biased variance
        mean, var = x.mean((0, 1)), x.var((0, 1), unbiased=False)
    else:
        mean, var = m.norm.running_mean, m.norm.running_var
    x = (x - mean) / torch.sqrt(var + 1e-6)
    query = m.query.expand(len(x), -1, -1)
    return attention(query, linear(x, m.k), linear(x, m.v), m.num_heads)[:, 0]


def reference_coca_pool(m, x):
    """Every one of the 196 queries, as theirs computes them, then the first one's output."""
    q = linear(F.layer_norm(m.queries, (DIM,), m.norm.weight, None, 1e-5), m.to_q)
    q = q.unflatten(-1, (m.num_heads, -1)).transpose(0, 1)  # [heads, 196, head_dim]
    k, v = linear(x, m.to_kv).chunk(2, dim=-1)  # [B, T, head_dim]: one head, shared
    weights = torch.softmax(torch.einsum("hid,bjd->bhij", q, k) * m.head_dim**-0.5, dim=-1)
    out = torch.einsum("bhij,bjd->bhid", weights, v).transpose(1, 2).flatten(2)
    return linear(out, m.to_out)[:, 0]


def reference_cait_pool(m, x):
    b = m.block
    cls = m.cls_token.expand(len(x), -1, -1)
    u = norm(torch.cat([cls, x], 1), b.norm1, 1e-6)
    q, k, v = linear(u[:, :1], b.attn.q), linear(u, b.attn.k), linear(u, b.attn.v)
    cls = cls + b.gamma_1 * linear(attention(q, k, v, b.attn.num_heads), b.attn.proj)
    cls = cls + b.gamma_2 * mlp(norm(cls, b.norm2, 1e-6), b.mlp)
    return norm(cls[:, 0], m.norm, 1e-5)


def reference_vit_block_pool(m, x):
    b = m.block
    q, k, v = linear(norm(x, b.norm1, 1e-5), b.attn.qkv).chunk(3, dim=-1)
    x = x + linear(attention(q, k, v, b.attn.num_heads), b.attn.proj)
    x = x + mlp(norm(x, b.norm2, 1e-5), b.mlp)
    return x.mean(1)


REFERENCES = {name: globals()[f"reference_{name}"] for name in POOLERS}


def scramble(module, seed=0):
    """Redraw every parameter (LayerScale and small queries included), so that no path through
    the module is negligible in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            draw = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.copy_(0.5 * draw)


def token_sets(name):
    return ["patch"] if name == "clip_pool" else ["patch", "all"]


@pytest.mark.parametrize(
    ("name", "tokens"), [(name, tokens) for name in POOLERS for tokens in token_sets(name)]
)
def test_output_equals_the_reference_forward(name, tokens):
    torch.manual_seed(0)
    aggregator = build_aggregator(name, layout(), tokens=tokens).double()
    scramble(aggregator)
    batch = random_tokens(prefix=3).map(torch.Tensor.double)  # [cls], two registers, 16 patches
    read = (
        batch.all[:, 3:]
        if tokens == "patch"
        else torch.cat([batch.all[:, :1], batch.all[:, 3:]], 1)
    )
    with torch.no_grad():
        out = aggregator(batch)
        expected = REFERENCES[name](aggregator, read)
    assert out.shape == (3, aggregator.out_dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # float64: no rounding slack


def test_aim_pool_in_eval_uses_the_running_statistics():
    aggregator = build_aggregator("aim_pool", layout()).double()
    scramble(aggregator)
    batch = random_tokens().map(torch.Tensor.double)
    aggregator(batch)  # one training step's statistics
    aggregator.eval()
    with torch.no_grad():
        expected = reference_aim_pool(aggregator, batch.all[:, 1:])
        torch.testing.assert_close(aggregator(batch), expected, atol=1e-5, rtol=1e-5)


def test_initialisation_is_efficient_probings():
    torch.manual_seed(0)
    wide = layout(dim=384, side=14, heads=6)
    cait = build_aggregator("cait_pool", wide)
    assert torch.all(cait.block.gamma_1 == 1e-5) and torch.all(cait.block.gamma_2 == 1e-5)
    assert cait.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert cait.norm.eps == 1e-5 and cait.block.norm1.eps == 1e-6
    coca = build_aggregator("coca_pool", wide)
    assert coca.queries.std().item() == pytest.approx(1.0, rel=0.05)
    assert coca.norm.bias is None and coca.norm.eps == 1e-5
    aim = build_aggregator("aim_pool", wide)
    assert aim.query.std().item() == pytest.approx(0.02, rel=0.2)
    assert not aim.norm.affine and aim.norm.eps == 1e-6
    clip = build_aggregator("clip_pool", wide)
    assert clip.pool.pos_embed.std().item() == pytest.approx(384**-0.5, rel=0.1)
    assert torch.all(clip.pool.qkv.bias == 0) and clip.pool.num_heads == 4
    siglip = build_aggregator("siglip_pool", wide)
    assert siglip.pool.latent.std().item() == pytest.approx(384**-0.5, rel=0.3)
    vit = build_aggregator("vit_block_pool", wide)
    assert vit.block.attn.qkv.bias is None and vit.block.norm1.eps == 1e-5
    assert build_aggregator("esimpool", wide).num_heads == 6  # the backbone's head count


# ---- refusals -------------------------------------------------------------------------------


def test_clip_pool_refuses_cls_by_name():
    with pytest.raises(ConfigError, match="aggregator='clip_pool' pools the 2-D patch grid"):
        build_aggregator("clip_pool", layout(), tokens="all")


@pytest.mark.parametrize("name", [n for n in POOLERS if n != "clip_pool"])
def test_all_tokens_need_a_cls_token(name):
    with pytest.raises(ConfigError, match="has no\\s+\\[cls\\] token"):
        build_aggregator(name, layout(prefix=0), tokens="all")


@pytest.mark.parametrize("name", POOLERS)
def test_a_head_count_that_does_not_divide_the_dim_is_refused(name):
    if name == "coca_pool":  # its heads project to num_heads x head_dim, whatever the dim
        return
    with pytest.raises(ConfigError, match="aggregator.num_heads=5 must divide the token dim 32"):
        build_aggregator(name, layout(), num_heads=5)


# ---- (c) it trains ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", POOLERS)
def test_a_few_steps_lower_a_loss(name):
    torch.manual_seed(0)
    aggregator = build_aggregator(name, layout())
    batch = random_tokens(batch=4, seed=1)
    target = torch.randn(4, aggregator.out_dim, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(aggregator.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(aggregator(batch), target)
        optimizer.zero_grad()
        loss.backward()
        if not losses:  # every parameter is on the path to the output (coca: its first query)
            dead = [n for n, p in aggregator.named_parameters() if not p.grad.any()]
            assert not dead, dead
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
