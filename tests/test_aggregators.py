import pytest
import torch

from mim_agg.aggregators import AGGREGATORS, build_aggregator

DIM, SIDE = 8, 4
NUM_PATCHES = SIDE * SIDE


def tokens_and_attn(batch=3, prefix=1, heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, prefix + NUM_PATCHES, DIM, generator=generator)
    logits = torch.randn(
        batch, heads, prefix + NUM_PATCHES, prefix + NUM_PATCHES, generator=generator
    )
    return tokens, logits.softmax(-1)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("prefix", [1, 5])  # [cls] alone, and [cls] + 4 registers
def test_every_aggregator_returns_out_dim(name, prefix):
    aggregator = build_aggregator(name, DIM, NUM_PATCHES, num_prefix_tokens=prefix)
    tokens, attn = tokens_and_attn(prefix=prefix)
    out = aggregator(tokens, attn)
    assert out.shape == (3, aggregator.out_dim)
    assert torch.isfinite(out).all()


def test_cls_mean_and_concat_equal_direct_indexing():
    tokens, _ = tokens_and_attn(prefix=5)
    cls = build_aggregator("cls", DIM, NUM_PATCHES, num_prefix_tokens=5)
    mean = build_aggregator("mean", DIM, NUM_PATCHES, num_prefix_tokens=5)
    both = build_aggregator("cls_mean", DIM, NUM_PATCHES, num_prefix_tokens=5)
    torch.testing.assert_close(cls(tokens), tokens[:, 0])
    torch.testing.assert_close(mean(tokens), tokens[:, 5:].mean(1))
    torch.testing.assert_close(both(tokens), torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1))
    assert both.out_dim == 2 * DIM


def test_abmilp_depth_one_is_softmax_of_linear_scores():
    torch.manual_seed(0)
    aggregator = build_aggregator("abmilp", DIM, NUM_PATCHES)
    tokens, _ = tokens_and_attn()
    linear = aggregator.scorer[0]
    patches = tokens[:, 1:]
    expected = []
    for image in patches:  # a naive loop, independent of the batched implementation
        scores = torch.stack([linear.weight[0] @ z + linear.bias[0] for z in image])
        weights = torch.exp(scores) / torch.exp(scores).sum()
        expected.append(sum(w * z for w, z in zip(weights, image, strict=True)))
    torch.testing.assert_close(aggregator(tokens), torch.stack(expected))
    assert len(aggregator.scorer) == 1 and linear.out_features == 1


def test_abmilp_weights_are_a_distribution_over_patches():
    aggregator = build_aggregator("abmilp", DIM, NUM_PATCHES, depth=3, activation="relu")
    tokens, _ = tokens_and_attn()
    weights = aggregator.pooling_weights(tokens)
    assert weights.shape == (3, NUM_PATCHES)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_abmilp_all_tokens_include_cls():
    aggregator = build_aggregator("abmilp", DIM, NUM_PATCHES, tokens="all")
    tokens, _ = tokens_and_attn()
    with torch.no_grad():
        aggregator.scorer[0].weight.zero_()
        aggregator.scorer[0].bias.zero_()
    torch.testing.assert_close(aggregator(tokens), tokens.mean(1))


def test_abmilp_position_conditioning_is_fixed_and_changes_scores():
    torch.manual_seed(0)
    conditioned = build_aggregator("abmilp", DIM, NUM_PATCHES, pos_cond=True, self_attn="both")
    before = conditioned.pos_embed.clone()
    assert "pos_embed" not in dict(conditioned.named_parameters())
    optimizer = torch.optim.SGD(conditioned.parameters(), lr=1.0)
    tokens, _ = tokens_and_attn()
    conditioned(tokens).pow(2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(conditioned.pos_embed, before)
    assert before.abs().sum() > 0

    torch.manual_seed(0)
    plain = build_aggregator("abmilp", DIM, NUM_PATCHES)
    conditioned = build_aggregator("abmilp", DIM, NUM_PATCHES, pos_cond=True)
    conditioned.load_state_dict(plain.state_dict())
    assert not torch.allclose(conditioned.pooling_weights(tokens), plain.pooling_weights(tokens))


def test_topk_attn_picks_the_most_attended_patches():
    tokens, _ = tokens_and_attn(batch=1)
    attn = torch.zeros(1, 2, 1 + NUM_PATCHES, 1 + NUM_PATCHES)
    # Head 0 favours patches 3 and 7, head 1 favours 7 and 12; patch 0 is only liked by head 0.
    attn[0, 0, 0, 1 + torch.tensor([3, 7, 0])] = torch.tensor([0.5, 0.3, 0.2])
    attn[0, 1, 0, 1 + torch.tensor([7, 12])] = torch.tensor([0.6, 0.4])
    aggregator = build_aggregator("topk_attn", DIM, NUM_PATCHES, k=3)
    chosen = aggregator.pooling_weights(tokens, attn)[0].nonzero().flatten().tolist()
    assert chosen == [3, 7, 12]
    torch.testing.assert_close(
        aggregator(tokens, attn), tokens[:, 1 + torch.tensor([3, 7, 12])].mean(1)
    )


def test_attn_mean_renormalises_cls_attention_over_patches():
    tokens, attn = tokens_and_attn(prefix=2)
    aggregator = build_aggregator("attn_mean", DIM, NUM_PATCHES, num_prefix_tokens=2)
    weights = attn[:, :, 0, 2:].mean(1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.einsum("bn,bnd->bd", weights, tokens[:, 2:])
    torch.testing.assert_close(aggregator(tokens, attn), expected)


@pytest.mark.parametrize("name", ["cls", "cls_mean", "topk_attn", "attn_mean"])
def test_cls_aggregators_refuse_backbones_without_cls(name):
    with pytest.raises(ValueError, match=r"\[cls\] token.*has none"):
        build_aggregator(name, DIM, NUM_PATCHES, num_prefix_tokens=0)


def test_unknown_aggregator_names_the_available_ones():
    with pytest.raises(ValueError, match="Unknown aggregator 'nope'; available: abmilp"):
        build_aggregator("nope", DIM, NUM_PATCHES)


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="aggregator.self_attn='sideways'"):
        build_aggregator("abmilp", DIM, NUM_PATCHES, self_attn="sideways")
    with pytest.raises(ValueError, match=r"aggregator.k=99 must lie in \[1, 16\]"):
        build_aggregator("topk_attn", DIM, NUM_PATCHES, k=99)
