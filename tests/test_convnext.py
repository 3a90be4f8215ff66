"""DINOv3's ConvNeXts (timm's ``ConvNeXt``), read from a tiny random model of the family: a
stage's feature map as a grid of tokens, no prefix tokens, no attention, checked against timm's
own forward and against the stages run by hand."""

import runpy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mim_agg.aggregators import build_aggregator
from mim_agg.backbones import FrozenBackbone, TokenRequest
from mim_agg.backbones.formats import recognise
from mim_agg.errors import ConfigError, UserError
from tests.helpers import FAST, PROJECT_ROOT, compose_config

ARCH = "convnext_tiny"
TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}  # 4 stages, strides 4, 8, 16, 32
SIZE = 64


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def twins(arch_kwargs: dict = TINY, **options):
    """A ``FrozenBackbone`` and the plain timm model with the same random weights."""
    torch.manual_seed(0)
    backbone = FrozenBackbone(ARCH, img_size=SIZE, arch_kwargs=arch_kwargs, **options)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, **arch_kwargs).eval()
    return backbone, model


def as_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H * W, C]``, row-major, written out index by index."""
    batch, channels, rows, columns = feature_map.shape
    tokens = torch.empty(batch, rows * columns, channels)
    for row in range(rows):
        for column in range(columns):
            tokens[:, row * columns + column] = feature_map[:, :, row, column]
    return tokens


def test_the_last_stage_grid_is_read_from_the_model_and_its_tokens_are_timms():
    """Block -1 is the last stage: its 2 x 2 grid at 64 px (7 x 7 at 224), its width; no
    prefix tokens, no [cls]. The tokens are timm's ``forward_features`` map, flattened."""
    backbone, model = twins()
    layout = backbone.layout
    assert (layout.dim, layout.grid, layout.num_prefix_tokens, layout.has_cls) == (
        64, (2, 2), 0, False,
    )  # fmt: skip
    assert (layout.depth, backbone.block, backbone.reader.size_multiple) == (4, 3, 32)
    tokens = backbone(images())
    with torch.no_grad():
        expected = as_tokens(model.forward_features(images()))
    torch.testing.assert_close(tokens.all, expected, rtol=1e-5, atol=1e-5)
    assert tokens.patches.shape == (2, 4, 64) and tokens.prefix.shape[1] == 0


def test_block_indexes_the_stages_and_an_earlier_one_is_its_own_grid():
    """``backbone.block=1`` is the second stage (stride 8: 8 x 8 at 64 px, 16-d), the stem
    and the first two stages run by hand; the later stages are pruned."""
    backbone, model = twins(block=1)
    assert (backbone.layout.dim, backbone.layout.grid, backbone.layout.depth) == (16, (8, 8), 2)
    assert len(backbone.model.stages) == 2
    with torch.no_grad():
        expected = as_tokens(model.stages[1](model.stages[0](model.stem(images()))))
    torch.testing.assert_close(backbone(images()).all, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="backbone.block=4 is out of range for convnext_tiny"):
        FrozenBackbone(ARCH, img_size=SIZE, arch_kwargs=TINY, block=4)


def test_the_final_norm_is_served_where_timm_normalises_the_map_and_refused_elsewhere():
    """DINOv3's (and the original) ConvNeXts normalise the pooled vector in their head: no
    final norm of the tokens. ``head_norm_first`` ones normalise the last stage's map
    (``norm_pre``): their tokens then equal ``forward_features``, which applies it."""
    with pytest.raises(ConfigError, match="final_norm=true: convnext_tiny .* after pooling"):
        FrozenBackbone(ARCH, img_size=SIZE, arch_kwargs=TINY, final_norm=True)
    norm_first = {**TINY, "head_norm_first": True}
    backbone, model = twins(norm_first, final_norm=True)
    with torch.no_grad():
        expected = as_tokens(model.forward_features(images()))
        unnormed = as_tokens(model.stages(model.stem(images())))
    tokens = backbone(images()).all
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, unnormed, atol=1e-3)  # the norm did something
    with pytest.raises(ConfigError, match="sized for its last stage, not stage 1"):
        FrozenBackbone(ARCH, img_size=SIZE, arch_kwargs=norm_first, final_norm=True, block=1)


def test_what_a_convnext_cannot_give_is_refused_by_name():
    backbone = FrozenBackbone(ARCH, img_size=SIZE, arch_kwargs=TINY)
    with pytest.raises(ConfigError, match="convnext_tiny \\(ConvNeXt\\) has no attention maps"):
        backbone.provide(TokenRequest(center_rows=2))
    with pytest.raises(ConfigError, match="this backbone has no \\[cls\\] token"):
        backbone.provide(TokenRequest(cls_attn=True))
    with pytest.raises(ConfigError, match="aggregator='cls' reads the \\[cls\\] token"):
        build_aggregator("cls", backbone.layout)
    with pytest.raises(UserError, match="no multiple of convnext_tiny's total stride 32"):
        FrozenBackbone(ARCH, img_size=48, arch_kwargs=TINY)


def tiny_config(tmp_path, *overrides: str):
    return compose_config(
        [
            *FAST,
            "backbone=dinov3_convnext_tiny",
            "backbone.weights=null",
            f"backbone.img_size={SIZE}",
            "+backbone.arch_kwargs.depths=[1,1,1,1]",
            "+backbone.arch_kwargs.dims=[8,16,32,64]",
            *overrides,
        ],
        tmp_path,
    )


def test_aggregators_that_read_tokens_train_on_its_grid(tmp_path):
    """The config's heads (mean, AbMILP, the efficient probe) built by ``build_probe`` over a
    live ConvNeXt: the mean is the model's own pooling before its head's norm, every head's
    logits are finite and its loss reaches its parameters."""
    from mim_agg.builders import build_probe

    cfg = tiny_config(
        tmp_path,
        "aggregator=mean",
        "+aggregator@heads.abmilp=abmilp",
        "+aggregator@heads.efficient_probe=efficient_probe",
    )
    probe = build_probe(cfg, num_classes=3)
    assert set(probe.heads) >= {"mean", "abmilp", "efficient_probe"}
    tokens = probe.tokens(images())
    assert tokens.all.shape == (2, 4, 64)
    pooled = build_aggregator("mean", tokens.layout)(tokens)
    model = probe.source.backbone.model
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.stages(model.stem(images())).mean((2, 3)))
    for name in ("mean", "abmilp", "efficient_probe"):
        head = probe.heads[name]
        logits = head(tokens)
        assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all()), name
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        assert all(p.grad is not None for p in head.parameters() if p.requires_grad), name


def test_a_dinov3_convnext_config_refuses_attention_before_fetching_anything(tmp_path):
    from mim_agg.builders import build_probe

    cfg = compose_config(["backbone=dinov3_convnext_tiny", "aggregator=center_attn"], tmp_path)
    with pytest.raises(ConfigError, match="convnext_tiny \\(ConvNeXt\\) has no attention maps"):
        build_probe(cfg, num_classes=10)


def test_task_analyze_refuses_a_convnext_by_name(tmp_path):
    from mim_agg.tasks.analyze import run

    cfg = tiny_config(tmp_path, "task=analyze", "analysis.embedding=[mean]")
    with pytest.raises(ConfigError, match="\\(ConvNeXt\\) has no attention maps.* task=analyze"):
        run(cfg)


def test_a_convnext_file_loads_strictly_and_another_ones_keys_say_why_not(tmp_path):
    """A file in timm's names (its head's norm included, which a frozen encoder never reads)
    loads into the same architecture: the same tokens. The prefix-token check, which reads ViT
    files only, stays silent; a file of other widths gets the key comparison."""
    torch.manual_seed(1)
    model = timm.create_model(ARCH, num_classes=0, **TINY).eval()
    save_file(model.state_dict(), str(tmp_path / "convnext.safetensors"))
    backbone = FrozenBackbone(
        ARCH, weights=str(tmp_path / "convnext.safetensors"), img_size=SIZE, arch_kwargs=TINY
    )
    with torch.no_grad():
        expected = as_tokens(model.forward_features(images()))
    torch.testing.assert_close(backbone(images()).all, expected, rtol=1e-5, atol=1e-5)
    wider = timm.create_model(ARCH, num_classes=0, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    save_file(wider.state_dict(), str(tmp_path / "wider.safetensors"))
    with pytest.raises(
        ConfigError,
        match="(?s)does not fit backbone.arch=convnext_tiny \\(stage widths \\[8, 16, 32, 64\\], "
        "depths \\[1, 1, 1, 1\\]\\).*misshaped keys: stages.0",
    ):
        FrozenBackbone(
            ARCH, weights=str(tmp_path / "wider.safetensors"), img_size=SIZE, arch_kwargs=TINY
        )


DEPTHS = (1, 1, 2, 1)
AUTHORS = {"depths": DEPTHS, "dims": TINY["dims"]}


def authors_state(seed: int = 0, dims: tuple = TINY["dims"]) -> dict[str, torch.Tensor]:
    """A published ``dinov3_convnext_*_pretrain_lvd1689m-*.pth``: ``ConvNeXt.state_dict()`` of
    ``dinov3/models/convnext.py``: ``downsample_layers`` (the stem conv 4 x 4 and its
    channels-first LayerNorm, then LayerNorm and conv 2 x 2 before stages 1-3), blocks of
    ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``, ``gamma``; the final ``norm``, saved again
    as ``norms.3`` (one module, registered twice)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "downsample_layers.0.0.weight": rand(dims[0], 3, 4, 4, scale=0.2),
        "downsample_layers.0.0.bias": rand(dims[0]),
        "downsample_layers.0.1.weight": 1 + rand(dims[0]),
        "downsample_layers.0.1.bias": rand(dims[0]),
    }
    for i in range(1, 4):
        state |= {
            f"downsample_layers.{i}.0.weight": 1 + rand(dims[i - 1]),
            f"downsample_layers.{i}.0.bias": rand(dims[i - 1]),
            f"downsample_layers.{i}.1.weight": rand(dims[i], dims[i - 1], 2, 2, scale=0.2),
            f"downsample_layers.{i}.1.bias": rand(dims[i]),
        }
    for i, (depth, dim) in enumerate(zip(DEPTHS, dims, strict=True)):
        for j in range(depth):
            block = {
                "dwconv.weight": rand(dim, 1, 7, 7, scale=0.2),
                "dwconv.bias": rand(dim),
                "norm.weight": 1 + rand(dim),
                "norm.bias": rand(dim),
                "pwconv1.weight": rand(4 * dim, dim, scale=0.3),
                "pwconv1.bias": rand(4 * dim),
                "pwconv2.weight": rand(dim, 4 * dim, scale=0.3),
                "pwconv2.bias": rand(dim),
                "gamma": 0.5 + rand(dim),
            }
            state |= {f"stages.{i}.{j}.{k}": v for k, v in block.items()}
    state |= {"norm.weight": 1 + rand(dims[-1]), "norm.bias": rand(dims[-1])}
    return state | {"norms.3.weight": state["norm.weight"], "norms.3.bias": state["norm.bias"]}


def channels_first_norm(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """The authors' ``LayerNorm(data_format="channels_first")``: over the channels of each
    position, eps 1e-6, written out."""
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(variance + 1e-6) + bias[:, None, None]


def reference_stages(state: dict, pixels: torch.Tensor, stages: int = 4) -> torch.Tensor:
    """``ConvNeXt.forward_features`` up to stage ``stages - 1``, its map as row-major tokens:
    downsampling, then blocks ``x + gamma * pwconv2(gelu(pwconv1(LN(dwconv(x)))))`` with the
    LayerNorm over channels last."""
    w = state
    x = F.conv2d(pixels, w["downsample_layers.0.0.weight"], w["downsample_layers.0.0.bias"], 4)
    x = channels_first_norm(x, w["downsample_layers.0.1.weight"], w["downsample_layers.0.1.bias"])
    for i in range(stages):
        if i:
            down = f"downsample_layers.{i}."
            x = channels_first_norm(x, w[down + "0.weight"], w[down + "0.bias"])
            x = F.conv2d(x, w[down + "1.weight"], w[down + "1.bias"], stride=2)
        for j in range(DEPTHS[i]):
            b = {
                k.split(f"stages.{i}.{j}.", 1)[1]: v
                for k, v in w.items()
                if f"stages.{i}.{j}." in k
            }
            h = F.conv2d(x, b["dwconv.weight"], b["dwconv.bias"], padding=3, groups=x.shape[1])
            h = h.permute(0, 2, 3, 1)
            h = F.layer_norm(h, h.shape[-1:], b["norm.weight"], b["norm.bias"], eps=1e-6)
            h = F.gelu(h @ b["pwconv1.weight"].T + b["pwconv1.bias"])
            h = b["gamma"] * (h @ b["pwconv2.weight"].T + b["pwconv2.bias"])
            x = x + h.permute(0, 3, 1, 2)
    return x.flatten(2).transpose(1, 2)


def load_authors(state, tmp_path, **options) -> FrozenBackbone:
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(state, path)
    return FrozenBackbone(ARCH, str(path), img_size=SIZE, arch_kwargs=AUTHORS, **options)


@pytest.mark.parametrize("block", [-1, 1])
def test_the_authors_file_gives_the_reference_tokens(tmp_path, block):
    """The last stage's 2 x 2 grid (7 x 7 at 224 px) and the second stage's 8 x 8, each the
    reference forward's map, token for token."""
    state = authors_state()
    backbone = load_authors(state, tmp_path, block=block)
    expected = reference_stages(state, images(), stages=block % 4 + 1)
    torch.testing.assert_close(backbone(images()).all, expected, rtol=1e-5, atol=1e-5)
    assert recognise(state).name == "convnext_fb"


def test_the_original_convnexts_wrapped_file_with_its_classifier_loads_too(tmp_path):
    state = authors_state()
    state = {k: v for k, v in state.items() if not k.startswith("norms.")}
    wrapped = {"model": state | {"head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}}
    expected = reference_stages(state, images())
    torch.testing.assert_close(load_authors(wrapped, tmp_path)(images()).all, expected)


def test_the_authors_layout_is_loaded_strictly(tmp_path):
    """Other widths: the key comparison; a key no ConvNeXt has is named, never dropped; a
    ``norms.3`` that is not the final norm again (timm's filter drops ``norms.*``) is refused."""
    with pytest.raises(
        ConfigError, match=r"(?s)\(convnext_fb format\) does not fit.*misshaped keys: stages\.0"
    ):
        load_authors(authors_state(dims=(16, 32, 64, 128)), tmp_path)
    state = authors_state()
    state["stages.1.0.grn.gamma"] = torch.ones(16)
    with pytest.raises(ConfigError, match=r"unexpected keys: stages\.1\.blocks\.0\.mlp\.grn"):
        load_authors(state, tmp_path)
    state = authors_state()
    state["norms.3.weight"] = state["norms.3.weight"] + 1
    with pytest.raises(ConfigError, match=r"norms\.3\.weight is not the final norm again"):
        load_authors(state, tmp_path)


def test_the_download_script_says_where_to_request_the_authors_file(tmp_path, capsys):
    """The command the configs print: no signed URL, no file: Meta's form, how to pass its URL
    or the file, and the config's own timm tag (not transformers' ConvNeXt, which is not read);
    the file in place: checked as a run reads it."""
    script = runpy.run_path(str(PROJECT_ROOT / "scripts" / "download_weights.py"))
    name = "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    overrides = [
        "backbone=dinov3_convnext_tiny",
        f"backbone.url=https://dinov3.llamameta.net/dinov3_convnext_tiny/{name}",
        "backbone.weights=${paths.weights_dir}/" + name,
        f"paths.root_dir={tmp_path}",
    ]
    assert script["main"](overrides) == 2
    err = capsys.readouterr().err
    assert "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/" in err
    assert f"'backbone.url=<the URL of {name}>'" in err
    assert "backbone.weights=convnext_tiny.dinov3_lvd1689m: the same weights" in err
    assert "model.safetensors" not in err
    (tmp_path / "weights").mkdir()
    torch.save(authors_state(), tmp_path / "weights" / name)
    tiny = [f"+backbone.arch_kwargs.{k}=[{','.join(map(str, v))}]" for k, v in AUTHORS.items()]
    assert script["main"]([*overrides, *tiny, f"backbone.img_size={SIZE}"]) == 0
    assert "is ready (convnext_fb format" in capsys.readouterr().out
