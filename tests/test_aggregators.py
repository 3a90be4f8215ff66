import copy
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mim_agg.aggregators import AGGREGATORS, build_aggregator, options_schema, token_request
from mim_agg.aggregators.center_attention import window_attention
from mim_agg.backbones import TokenLayout, TokenRequest, Tokens
from mim_agg.cli import CONFIG_DIR

DIM, SIDE = 32, 4
NUM_PATCHES = SIDE * SIDE


def layout(prefix=1, heads=2) -> TokenLayout:
    return TokenLayout(DIM, prefix, prefix > 0, (SIDE, SIDE), num_heads=heads, depth=4)


def build(name, prefix=1, **options):
    return build_aggregator(name, layout(prefix), **options)


def tokens_and_attn(batch=3, prefix=1, heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, prefix + NUM_PATCHES, DIM, generator=generator)
    logits = torch.randn(
        batch, heads, prefix + NUM_PATCHES, prefix + NUM_PATCHES, generator=generator
    )
    return tokens, logits.softmax(-1)


def wrap(tokens, attn=None, prefix=1, **extra) -> Tokens:
    """``Tokens`` as a live source would hand them over: the ``[cls]`` row of ``attn``."""
    cls_attn = attn[:, :, 0, prefix:] if attn is not None and prefix else None
    return Tokens(layout(prefix, heads=2), tokens, cls_attn=cls_attn, **extra)


def full(tokens, attn, prefix=1) -> Tokens:
    """Every optional field filled, as the source would for any head's request."""
    generator = torch.Generator().manual_seed(1)
    return wrap(
        tokens,
        attn,
        prefix,
        block_cls=torch.randn(len(tokens), 4, DIM, generator=generator),
        oracle_attn=torch.rand(len(tokens), NUM_PATCHES, generator=generator).softmax(-1),
        center_attn=window_attention(attn, layout(prefix), SIDE),  # the largest window
    )


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("prefix", [1, 5])  # [cls] alone, and [cls] + 4 registers
def test_every_aggregator_returns_out_dim(name, prefix):
    aggregator = build(name, prefix=prefix)
    tokens, attn = tokens_and_attn(prefix=prefix)
    out = aggregator(full(tokens, attn, prefix))
    assert out.shape == (3, aggregator.out_dim)
    assert torch.isfinite(out).all()


def test_cls_mean_and_concat_equal_direct_indexing():
    tokens, _ = tokens_and_attn(prefix=5)
    cls = build("cls", prefix=5)
    mean = build("mean", prefix=5)
    both = build("cls_mean", prefix=5)
    torch.testing.assert_close(cls(wrap(tokens, prefix=5)), tokens[:, 0])
    torch.testing.assert_close(mean(wrap(tokens, prefix=5)), tokens[:, 5:].mean(1))
    torch.testing.assert_close(
        both(wrap(tokens, prefix=5)), torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1)
    )
    assert both.out_dim == 2 * DIM


def test_summary_concatenates_the_first_summary_tokens_image_by_image():
    """RADIO's summary: 3 of 8 prefix tokens (one per trained teacher, then SAM's and 4
    registers), each image's concatenated in order; the [cls] alone by default."""
    tokens, _ = tokens_and_attn(prefix=8)
    radio = dataclasses.replace(layout(prefix=8), num_summary_tokens=3)
    summary = build_aggregator("summary", radio)
    expected = torch.stack([torch.cat([image[0], image[1], image[2]]) for image in tokens])
    torch.testing.assert_close(summary(Tokens(radio, tokens)), expected)
    assert summary.out_dim == 3 * DIM and summary.parameter_free
    torch.testing.assert_close(build("summary", prefix=8)(wrap(tokens, prefix=8)), tokens[:, 0])


def test_abmilp_depth_one_is_softmax_of_linear_scores():
    torch.manual_seed(0)
    aggregator = build("abmilp")
    tokens, _ = tokens_and_attn()
    linear = aggregator.scorer[0]
    patches = tokens[:, 1:]
    expected = []
    for image in patches:  # a naive loop, independent of the batched implementation
        scores = torch.stack([linear.weight[0] @ z + linear.bias[0] for z in image])
        weights = torch.exp(scores) / torch.exp(scores).sum()
        expected.append(sum(w * z for w, z in zip(weights, image, strict=True)))
    torch.testing.assert_close(aggregator(wrap(tokens)), torch.stack(expected))
    assert len(aggregator.scorer) == 1 and linear.out_features == 1


def test_abmilp_weights_are_a_distribution_over_patches():
    aggregator = build("abmilp", depth=3, activation="relu")
    tokens, _ = tokens_and_attn()
    weights = aggregator.pooling_weights(wrap(tokens))
    assert weights.shape == (3, NUM_PATCHES)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_abmilp_all_tokens_are_cls_and_patches_never_registers():
    aggregator = build("abmilp", prefix=5, tokens="all")
    tokens, _ = tokens_and_attn(prefix=5)  # [cls], 4 registers, the patches
    with torch.no_grad():
        aggregator.scorer[0].weight.zero_()
        aggregator.scorer[0].bias.zero_()
    expected = torch.cat([tokens[:, :1], tokens[:, 5:]], 1).mean(1)
    torch.testing.assert_close(aggregator(wrap(tokens, prefix=5)), expected)
    with pytest.raises(ValueError, match="aggregator.tokens=all reads"):
        build("abmilp", prefix=0, tokens="all")  # no [cls] to read


def test_abmilp_position_conditioning_is_fixed_and_changes_scores():
    torch.manual_seed(0)
    conditioned = build("abmilp", pos_cond=True, self_attn="both")
    before = conditioned.pos_embed.clone()
    assert "pos_embed" not in dict(conditioned.named_parameters())
    optimizer = torch.optim.SGD(conditioned.parameters(), lr=1.0)
    tokens, _ = tokens_and_attn()
    conditioned(wrap(tokens)).pow(2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(conditioned.pos_embed, before)
    assert before.abs().sum() > 0

    torch.manual_seed(0)
    plain = build("abmilp")
    conditioned = build("abmilp", pos_cond=True)
    conditioned.load_state_dict(plain.state_dict())
    assert not torch.allclose(
        conditioned.pooling_weights(wrap(tokens)), plain.pooling_weights(wrap(tokens))
    )


def test_topk_attn_picks_the_most_attended_patches():
    tokens, _ = tokens_and_attn(batch=1)
    attn = torch.zeros(1, 2, 1 + NUM_PATCHES, 1 + NUM_PATCHES)
    # Head 0 favours patches 3 and 7, head 1 favours 7 and 12; patch 0 is only liked by head 0.
    attn[0, 0, 0, 1 + torch.tensor([3, 7, 0])] = torch.tensor([0.5, 0.3, 0.2])
    attn[0, 1, 0, 1 + torch.tensor([7, 12])] = torch.tensor([0.6, 0.4])
    aggregator = build("topk_attn", k=3)
    chosen = aggregator.pooling_weights(wrap(tokens, attn))[0].nonzero().flatten().tolist()
    assert chosen == [3, 7, 12]
    torch.testing.assert_close(
        aggregator(wrap(tokens, attn)), tokens[:, 1 + torch.tensor([3, 7, 12])].mean(1)
    )


def test_attn_mean_renormalises_cls_attention_over_patches():
    tokens, attn = tokens_and_attn(prefix=2)
    aggregator = build("attn_mean", prefix=2)
    weights = attn[:, :, 0, 2:].mean(1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.einsum("bn,bnd->bd", weights, tokens[:, 2:])
    torch.testing.assert_close(aggregator(wrap(tokens, attn, prefix=2)), expected)


@pytest.mark.parametrize(
    "name", ["cls", "cls_mean", "topk_attn", "attn_mean", "attn_min_entropy", "last_n_cls"]
)
def test_cls_aggregators_refuse_backbones_without_cls(name):
    with pytest.raises(ValueError, match=r"\[cls\] token.*has none") as error:
        build(name, prefix=0)
    serving = str(error.value).split("These aggregators serve it: ")[1].rstrip(".").split(", ")
    assert "mean" in serving and "abmilp" in serving and name not in serving
    for other in serving:  # each one named does build on a backbone without [cls]
        build(other, prefix=0)


def test_unknown_aggregator_names_the_available_ones():
    with pytest.raises(ValueError, match="Unknown aggregator 'nope'; available: abmilp"):
        build("nope")


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="aggregator.self_attn='sideways'"):
        build("abmilp", self_attn="sideways")
    with pytest.raises(ValueError, match=r"aggregator.k=99 must lie in \[1, 16\]"):
        build("topk_attn", k=99)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_register_tokens_never_reach_the_output(name):
    torch.manual_seed(0)
    aggregator = build(name, prefix=5).eval()
    tokens, attn = tokens_and_attn(prefix=5)
    moved = tokens.clone()
    moved[:, 1:5] += 100.0  # registers sit between [cls] and the patches
    original = full(tokens, attn, prefix=5)
    shifted = full(moved, attn, prefix=5)
    torch.testing.assert_close(aggregator(shifted), aggregator(original))


def test_center_crop_on_a_4x4_grid():
    tokens, _ = tokens_and_attn()
    aggregator = build("center_crop", k=2)
    central = 1 + torch.tensor([5, 6, 9, 10])  # rows 1-2, columns 1-2 of the 4x4 grid
    torch.testing.assert_close(aggregator(wrap(tokens)), tokens[:, central].mean(1))
    whole = build("center_crop", k=4)
    torch.testing.assert_close(whole(wrap(tokens)), tokens[:, 1:].mean(1))


def test_gem_with_p_one_is_the_mean_and_max_is_the_max():
    tokens, _ = tokens_and_attn()
    gem = build("gem", p=1.0)
    torch.testing.assert_close(gem(wrap(tokens)), tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    positive = tokens.abs() + 0.1
    sharp = build("gem", p=60.0)
    maximum = build("max")
    torch.testing.assert_close(maximum(wrap(tokens)), tokens[:, 1:].max(1).values)
    torch.testing.assert_close(sharp(wrap(positive)), maximum(wrap(positive)), rtol=0.06, atol=0.0)
    assert [n for n, _ in gem.named_parameters()] == ["p"]


def test_attn_min_entropy_picks_the_sharpest_head_per_image():
    tokens, _ = tokens_and_attn(batch=2)
    attn = torch.full((2, 2, 1 + NUM_PATCHES, 1 + NUM_PATCHES), 1.0 / (1 + NUM_PATCHES))
    sharp = torch.zeros(1 + NUM_PATCHES)
    sharp[0], sharp[3], sharp[8] = (
        0.5,
        0.4,
        0.1,
    )  # [cls] self-attention is dropped, then renormalised
    attn[0, 1, 0], attn[1, 0, 0] = sharp, sharp
    aggregator = build("attn_min_entropy")
    weights = aggregator.pooling_weights(wrap(tokens, attn))
    expected = torch.zeros(NUM_PATCHES)
    expected[2], expected[7] = 0.8, 0.2
    torch.testing.assert_close(weights, torch.stack([expected, expected]))
    torch.testing.assert_close(
        aggregator(wrap(tokens, attn))[0], 0.8 * tokens[0, 3] + 0.2 * tokens[0, 8]
    )


def test_gated_abmilp_matches_ilse_et_al():
    torch.manual_seed(0)
    aggregator = build("abmilp_gated", hidden_dim=5)
    tokens, _ = tokens_and_attn()
    V, U, w = aggregator.tanh_branch, aggregator.sigmoid_branch, aggregator.scorer
    patches = tokens[:, 1:]
    scores = w(torch.tanh(V(patches)) * torch.sigmoid(U(patches))).squeeze(-1)
    expected = (scores.softmax(-1).unsqueeze(-1) * patches).sum(1)
    torch.testing.assert_close(aggregator(wrap(tokens)), expected)


def test_efficient_probe_matches_a_naive_loop():
    torch.manual_seed(0)
    aggregator = build("efficient_probe", num_queries=4, d_out=2)
    tokens, _ = tokens_and_attn(batch=2)
    assert aggregator.out_dim == DIM // 2
    assert {n for n, _ in aggregator.named_parameters()} == {"queries", "values.weight"}
    expected = torch.zeros(2, DIM // 2)
    chunk = DIM // 2 // 4
    for b in range(2):
        patches = tokens[b, 1:]
        values = aggregator.values(patches)
        for j in range(4):
            weights = torch.softmax(patches @ aggregator.queries[j] / DIM**0.5, dim=0)
            expected[b, j * chunk : (j + 1) * chunk] = (
                weights @ values[:, j * chunk : (j + 1) * chunk]
            )
    torch.testing.assert_close(aggregator(wrap(tokens)), expected)


def test_simpool_matches_a_direct_computation():
    torch.manual_seed(0)
    aggregator = build("simpool")
    tokens, _ = tokens_and_attn()
    patches = tokens[:, 1:]
    normed = torch.nn.functional.layer_norm(patches, (DIM,), eps=1e-6)
    query = patches.mean(1) @ aggregator.query.weight.T
    keys = normed @ aggregator.key.weight.T
    weights = torch.softmax(torch.einsum("bd,bnd->bn", query, keys) / DIM**0.5, dim=-1)
    torch.testing.assert_close(
        aggregator(wrap(tokens)), torch.einsum("bn,bnd->bd", weights, normed)
    )
    torch.testing.assert_close(aggregator.pooling_weights(wrap(tokens)), weights)


def test_attentive_probe_is_cross_attention_from_learned_queries():
    torch.manual_seed(0)
    aggregator = build("attentive_probe", num_queries=2, num_heads=4, mlp=False)
    tokens, _ = tokens_and_attn(batch=2)
    pool = aggregator.pool
    x = torch.nn.functional.layer_norm(tokens[:, 1:], (DIM,), eps=1e-6)
    q = pool.q(pool.latent).reshape(1, 2, 4, DIM // 4).transpose(1, 2)
    k, v = pool.kv(x).reshape(2, NUM_PATCHES, 2, 4, DIM // 4).permute(2, 0, 3, 1, 4)
    attended = ((q @ k.transpose(-2, -1)) * (DIM // 4) ** -0.5).softmax(-1) @ v
    expected = attended.transpose(1, 2).reshape(2, 2, DIM).mean(1)
    torch.testing.assert_close(aggregator(wrap(tokens)), expected)


def test_last_n_cls_concatenates_block_cls_and_patch_mean():
    tokens, _ = tokens_and_attn()
    block_cls = torch.randn(3, 4, DIM)
    aggregator = build("last_n_cls", n=2)
    expected = torch.cat([block_cls[:, 2], block_cls[:, 3], tokens[:, 1:].mean(1)], dim=1)
    torch.testing.assert_close(aggregator(wrap(tokens, block_cls=block_cls)), expected)
    assert aggregator.out_dim == 3 * DIM and aggregator.request().cls_blocks == 2
    only_cls = build("last_n_cls", n=4, with_mean=False)
    torch.testing.assert_close(only_cls(wrap(tokens, block_cls=block_cls)), block_cls.flatten(1))


def test_oracle_attn_pools_with_the_oracles_weights():
    tokens, _ = tokens_and_attn()
    weights = torch.rand(3, NUM_PATCHES).softmax(-1)
    aggregator = build("oracle_attn", oracle_weights=None)
    expected = torch.einsum("bn,bnd->bd", weights, tokens[:, 1:])
    torch.testing.assert_close(aggregator(wrap(tokens, oracle_attn=weights)), expected)
    assert aggregator.request().oracle == ("vit_base_patch16_224", None)


def test_requests_merge_over_heads():
    attn = build("attn_mean").request()
    blocks = build("last_n_cls", n=3).request()
    merged = TokenRequest() | attn | blocks
    assert merged == TokenRequest(tokens=True, cls_attn=True, cls_blocks=3)
    assert build("last_n_cls", n=2, with_mean=False).request().tokens is False
    first = build("oracle_attn", oracle_weights=None).request()
    second = build("oracle_attn", oracle_arch="vit_small_patch16_224").request()
    with pytest.raises(ValueError, match="One run holds one attention oracle"):
        first | second


def test_keys_name_every_option_with_defaults_filled_in():
    assert build("topk_attn").output_key == build("topk_attn", k=16).output_key
    assert build("topk_attn").output_key == "topk_attn(k=16)"
    assert build("topk_attn", k=4).output_key != build("topk_attn").output_key
    assert build("cls").output_key == "cls()"


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_owns_its_key_however_built_or_copied(name):
    """The key is captured at construction, by the class itself: built by class or by name,
    copied (checkpoint selection copies heads), and whatever its own attributes are named
    (attention poolers have a ``key`` projection), it names the aggregator and its options."""
    options = {"oracle_weights": None} if name == "oracle_attn" else {}
    by_name = build(name, **options)
    by_class = AGGREGATORS[name](layout(), **options)
    assert by_name.output_key == by_class.output_key == copy.deepcopy(by_name).output_key
    assert by_name.output_key.startswith(f"{name}(")


def test_parameter_free_aggregators_are_those_a_cache_can_store_pooled():
    free = {name for name in AGGREGATORS if build(name).parameter_free}
    assert free == {
        "cls", "mean", "cls_mean", "summary", "center_crop", "max", "last_n_cls",
        "attn_mean", "topk_attn", "attn_min_entropy", "oracle_attn", "center_attn",
    }  # fmt: skip


def test_a_served_output_is_what_the_aggregator_returns():
    """From a cache, calling a parameter-free aggregator returns its stored output (no tokens
    needed); another aggregator's stored output is not its own."""
    tokens, attn = tokens_and_attn()
    aggregator = AGGREGATORS["topk_attn"](layout(), k=4)  # built by its class: same contract
    stored = {"topk_attn(k=4)": torch.ones(3, DIM), "topk_attn(k=16)": torch.zeros(3, DIM)}
    torch.testing.assert_close(aggregator(wrap(None, pooled=stored)), torch.ones(3, DIM))
    computed = aggregator.forward(wrap(tokens, attn))
    torch.testing.assert_close(aggregator(wrap(tokens, attn)), computed)
    assert not torch.equal(computed, torch.ones(3, DIM))


def test_from_a_cache_parameter_free_aggregators_read_only_their_outputs():
    aggregators = [build("topk_attn", k=4), build("last_n_cls", n=2), build("abmilp")]
    assert token_request(aggregators, cached=True) == TokenRequest(
        tokens=True, pooled=("last_n_cls(n=2,with_mean=True)", "topk_attn(k=4)")
    )
    assert token_request(aggregators) == TokenRequest(tokens=True, cls_attn=True, cls_blocks=2)


AGGREGATOR_CONFIGS = sorted((CONFIG_DIR / "aggregator").glob("*.yaml"))


def test_aggregator_configs_say_only_what_differs_from_the_code():
    """An option's default lives in its class's signature; a config repeating it is a second
    copy that drifts when the code changes."""
    repeated = {}
    for path in AGGREGATOR_CONFIGS:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        schema = options_schema(config.get("name", path.stem))
        defaults = {field.name: field.default for field in dataclasses.fields(schema)}
        same = [k for k in config if k != "defaults" and k in defaults and config[k] == defaults[k]]
        if same:
            repeated[path.name] = same
    assert not repeated, f"configs repeat their code defaults (delete these keys): {repeated}"


def test_aggregator_configs_name_the_class_that_documents_their_options():
    for path in AGGREGATOR_CONFIGS:
        cls = AGGREGATORS[path.stem]
        header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        where = f"{cls.__name__} in mim_agg/aggregators/{Path(inspect.getfile(cls)).name}"
        assert where in header, f"{path.name}'s header should name {where}"


def test_a_refused_option_of_an_extra_head_names_its_own_key():
    from mim_agg.builders import backbone_layout, build_aggregators, build_heads
    from mim_agg.errors import ConfigError
    from tests.helpers import FAST, compose_config

    cfg = compose_config([*FAST, "heads=bench8"])  # 32 px: a 2 x 2 grid, center_crop k=4
    for build_run in (build_aggregators, lambda *a: build_heads(*a, num_classes=10)):
        with pytest.raises(ConfigError, match=r"^heads\.center_crop\.k=4 must lie in \[1, 2\]"):
            build_run(cfg, backbone_layout(cfg))
    cfg = compose_config([*FAST, "aggregator=center_crop"])
    with pytest.raises(ConfigError, match=r"^aggregator\.k=4 must lie in \[1, 2\]"):
        build_aggregators(cfg, backbone_layout(cfg))


def test_the_readmes_small_image_bench8_example_fits():
    from mim_agg.builders import backbone_layout, build_aggregators
    from tests.helpers import PROJECT_ROOT, compose_config

    readme = (PROJECT_ROOT / "README.md").read_text()
    example = "experiment=quickstart heads=bench8 heads.center_crop.k=2 heads.topk_attn.k=4"
    assert example in readme
    cfg = compose_config(example.split())
    build_aggregators(cfg, backbone_layout(cfg))


@pytest.mark.slow  # builds 28 backbone skeletons
def test_every_aggregator_builds_on_every_shipped_backbone_or_refuses_by_name(tmp_path):
    """What issue 19 asks of every pooler: it serves each shipped backbone it can, and where it
    cannot (no [cls], a grid it does not fit), the refusal names the aggregator or its key."""
    from mim_agg.builders import backbone_layout
    from mim_agg.errors import ConfigError
    from tests.helpers import compose_config

    refused = []
    for backbone in sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml")):
        layout = backbone_layout(compose_config([f"backbone={backbone}"], tmp_path))
        for name in sorted(AGGREGATORS):
            try:
                with torch.device("meta"):
                    aggregator = build_aggregator(name, layout)
            except ConfigError as error:
                assert name in str(error) or "aggregator." in str(error), str(error)
                refused.append((backbone, name))
                continue
            assert aggregator.out_dim > 0
    assert ("ijepa_vith", "cls") in refused and ("capi_vitl", "cls_mean") in refused
    assert not [pair for pair in refused if pair[0] == "mae_vitb"]  # a plain ViT serves all
