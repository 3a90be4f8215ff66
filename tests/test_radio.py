"""RADIO's files (NVlabs/RADIO) in their authors' key layouts (``RADIOModel.state_dict()``:
a timm ViT whose ``ViTPatchGenerator`` holds the patch embedding, a 12 x 12 position table in
place of their 128 x 128 and the prefix tokens; random values, small widths) load through
``formats/radio.py`` and give the tokens of an independent reference forward written here from
their equations: the input conditioner ``(x - mean) / std`` on [0, 1] pixels; ``Im2Patches``
(each patch's pixels as (channel, row, column)) times the bias-free ``embedder``; the eval
branch of ``_get_pos_embeddings`` (the table resized bilinearly to a square of the grid's longer
side, then its top-left window), added to the patches alone; the 8 prefix tokens prepended
(4 summaries, one per teacher, then 4 registers); timm's pre-norm blocks (LayerNorm eps 1e-6),
with C-RADIOv3's LayerScale where it has one; no final norm."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save, save_file

from mim_agg.backbones import FrozenBackbone
from mim_agg.backbones.formats import recognise
from mim_agg.backbones.loading import load_checkpoint_into
from mim_agg.builders import build_backbone
from mim_agg.errors import ConfigError
from tests.helpers import compose_config
from tests.test_download import fetch_from_hub
from tests.test_formats import vit_weights

DIM, HEADS, DEPTH, PATCH, STORED, PREFIX = 32, 2, 2, 16, 12, 8
SMALL = {"embed_dim": DIM, "num_heads": HEADS, "depth": DEPTH}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TEACHERS = [{"name": "clip"}, {"name": "siglip"}, {"name": "dino_v2"},
            {"name": "sam", "use_summary": False}]  # fmt: skip
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def pixels(height: int, width: int | None = None, seed: int = 5) -> torch.Tensor:
    """Images in [0, 1], what RADIO's forward takes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, height, width or height, generator=generator)


def authors_state(seed: int = 0, dim: int = DIM, prefix: int = PREFIX, layer_scale: bool = False):
    """``RADIOModel.state_dict()`` of a RADIOv2.5 model (``layer_scale``: C-RADIOv3's, whose
    LayerScale parameter they call ``grandma``): the encoder under ``model.``, the input
    conditioner, the summary slots and a teacher's adaptor head."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "model.patch_generator.embedder.weight": rand(dim, 3 * PATCH * PATCH, scale=0.05),
        "model.patch_generator.pos_embed": rand(1, STORED * STORED, dim, scale=1.0),
        "model.patch_generator.cls_token.token": rand(prefix, dim, scale=1.0),
        "input_conditioner.norm_mean": torch.tensor(CLIP_MEAN).view(3, 1, 1),
        "input_conditioner.norm_std": torch.tensor(CLIP_STD).view(3, 1, 1),
        "summary_idxs": torch.tensor([0, 1, 2]),
        "adaptors.clip.head_mlp.fc1.weight": rand(16, dim),
        "adaptors.clip.feat_mlp.fc1.weight": rand(16, dim),
    }
    blocks = vit_weights(seed, dim=dim, depth=DEPTH)  # timm's block names, as theirs
    state |= {f"model.{k}": v for k, v in blocks.items() if k.startswith("blocks.")}
    if layer_scale:
        for i in range(DEPTH):
            state |= {f"model.blocks.{i}.ls{n}.grandma": 0.5 + rand(dim) for n in (1, 2)}
    return state


def hf_file(state: dict) -> dict:
    """The Hugging Face ``model.safetensors`` (their ``RADIOModel`` for trust_remote_code)."""
    return {f"radio_model.{k}": v.contiguous() for k, v in state.items()}


def hub_file(state: dict, ema: dict | None = None) -> dict:
    """The torch.hub ``.pth.tar``: pickled arguments beside the training module's state dict
    (``base_model.`` the encoder, ``_heads.N`` the teachers' summary heads)."""

    def training_names(values: dict) -> dict:
        renamed = {}
        for key, value in values.items():
            if key.startswith("model."):
                renamed["base_model." + key.removeprefix("model.")] = value
            elif key.startswith("input_conditioner."):
                renamed[key] = value
        return renamed | {"_heads.0.fc1.weight": torch.zeros(16, DIM)}

    args = argparse.Namespace(teachers=TEACHERS, cls_token_per_teacher=True, model="vit_tiny")
    checkpoint = {"args": args, "state_dict": training_names(state), "epoch": 3}
    if ema is not None:
        checkpoint["state_dict_ema"] = training_names(ema)
    return checkpoint


def reference(state: dict, images: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """RADIO's forward (``RADIOModel.forward`` in eval: conditioner, ``ViTPatchGenerator``,
    the blocks, an identity norm): all tokens after the last block, prefix first."""
    w = {k.removeprefix("model."): v for k, v in state.items()}
    mean, std = state["input_conditioner.norm_mean"], state["input_conditioner.norm_std"]
    x = (images - mean) / std
    batch, rows, cols = len(x), x.shape[2] // PATCH, x.shape[3] // PATCH
    patches = x.reshape(batch, 3, rows, PATCH, cols, PATCH).permute(0, 2, 4, 1, 3, 5)
    x = (
        patches.reshape(batch, rows * cols, 3 * PATCH * PATCH)
        @ w["patch_generator.embedder.weight"].T
    )
    table = w["patch_generator.pos_embed"].reshape(1, STORED, STORED, -1).permute(0, 3, 1, 2)
    side = max(rows, cols)
    table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=align_corners)
    x = x + table[:, :, :rows, :cols].flatten(2).transpose(1, 2)
    tokens = w["patch_generator.cls_token.token"]
    x = torch.cat([tokens.expand(batch, -1, -1), x], dim=1)
    dim = x.shape[-1]
    head_dim, count = dim // HEADS, x.shape[1]
    for i in range(DEPTH):
        b = {k.split(f"blocks.{i}.", 1)[1]: v for k, v in w.items() if k.startswith(f"blocks.{i}.")}
        ls1, ls2 = b.get("ls1.grandma", 1.0), b.get("ls2.grandma", 1.0)
        h = F.layer_norm(x, (dim,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        qkv = (h @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]).view(
            batch, count, 3, HEADS, head_dim
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, count, dim)
        x = x + ls1 * (mixed @ b["attn.proj.weight"].T + b["attn.proj.bias"])
        h = F.layer_norm(x, (dim,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        hidden = F.gelu(h @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"])
        x = x + ls2 * (hidden @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"])
    return x


def config_overrides(path, size: int) -> list[str]:
    return [
        "backbone=radiov25_vitb16",
        f"backbone.weights={path}",
        f"backbone.img_size={size}",
        *[f"+backbone.arch_kwargs.{key}={value}" for key, value in SMALL.items()],
    ]


def normalised(backbone: FrozenBackbone, images: torch.Tensor) -> torch.Tensor:
    """What the data pipeline hands the backbone: the config's normalisation."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (backbone.mean, backbone.std))
    return (images - mean) / std


def test_the_hugging_face_file_gives_radios_tokens_prefix_tokens_never_patches(tmp_path):
    """nvidia/RADIO-B's layout through the radiov25_vitb16 config (its normalisation, arch
    and prefix tokens) at 48 px: 3 x 3 patches from the 12 x 12 table; the 8 prefix tokens are
    RADIO's summaries and registers, the patches and their mean exclude them."""
    from mim_agg.aggregators import build_aggregator

    state = authors_state()
    save_file(hf_file(state), tmp_path / "model.safetensors")
    cfg = compose_config(config_overrides(tmp_path / "model.safetensors", 48), tmp_path)
    backbone, backbone_config = build_backbone(cfg), cfg.backbone
    assert (backbone.mean, backbone.std) == (list(CLIP_MEAN), list(CLIP_STD))
    assert (backbone.layout.num_prefix_tokens, backbone.layout.grid) == (PREFIX, (3, 3))
    images = pixels(48)
    tokens = backbone(normalised(backbone, images))
    expected = reference(state, images)
    torch.testing.assert_close(tokens.all, expected, **TOLERANCE)
    torch.testing.assert_close(tokens.cls, expected[:, 0], **TOLERANCE)  # DFN CLIP's summary
    torch.testing.assert_close(tokens.patches, expected[:, PREFIX:], **TOLERANCE)
    mean = build_aggregator("mean", backbone.layout)(tokens)
    torch.testing.assert_close(mean, expected[:, PREFIX:].mean(1), **TOLERANCE)
    # LP and k-NN read RADIO's summary: the three trained teachers' tokens, concatenated
    summary = build_aggregator(backbone_config.linear_input, backbone.layout)(tokens)
    torch.testing.assert_close(summary, expected[:, :3].flatten(1), **TOLERANCE)


@pytest.mark.parametrize("count", [2, 4])
def test_summary_tokens_other_than_the_files_summary_are_refused(tmp_path, count):
    """The file names prefix slots 0, 1, 2 (``summary_idxs``): reading 2 would leave SigLIP's
    out silently, 4 would take in SAM's untrained token."""
    save_file(hf_file(authors_state()), tmp_path / "model.safetensors")
    overrides = [*config_overrides(tmp_path / "model.safetensors", 48)]
    cfg = compose_config([*overrides, f"backbone.summary_tokens={count}"], tmp_path)
    with pytest.raises(ConfigError, match="names prefix slots \\[0, 1, 2\\].*summary_tokens=3"):
        build_backbone(cfg)


def test_the_torch_hub_file_loads_its_ema_weights_beside_pickled_arguments(tmp_path):
    """radio-v2.5-b_half.pth.tar's layout (their hubconf.py reads ``state_dict_ema`` where
    there is one), at 64 px: 4 x 4 patches."""
    ema = authors_state(seed=1)
    torch.save(hub_file(authors_state(seed=0), ema=ema), tmp_path / "radio.pth.tar")
    backbone = build_backbone(
        compose_config(config_overrides(tmp_path / "radio.pth.tar", 64), tmp_path)
    )
    images = pixels(64)
    torch.testing.assert_close(
        backbone(normalised(backbone, images)).all, reference(ema, images), **TOLERANCE
    )


def test_a_grid_that_is_not_square_keeps_the_top_left_window_of_the_resized_table(tmp_path):
    """48 x 32 px: the table resized to 3 x 3, its first two columns kept."""
    state = authors_state()
    save_file(hf_file(state), tmp_path / "model.safetensors")
    kwargs = {"reg_tokens": 7, "no_embed_class": True, "final_norm": False, **SMALL}
    model = timm.create_model("vit_base_patch16_224", img_size=(48, 32), num_classes=0, **kwargs)
    load_checkpoint_into(model.eval(), tmp_path / "model.safetensors")
    images = pixels(48, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features((images - mean) / std)
    torch.testing.assert_close(tokens, reference(state, images), **TOLERANCE)


def test_c_radio_v3_original_files_through_timms_conversion_and_ours(tmp_path):
    """C-RADIOv3-B's original Hugging Face layout (LayerScale ``grandma``), as timm's tag
    was made from it: timm's own conversion (``_convert_radio`` with the bilinear,
    align_corners=True resize its ``vit_base_patch16_radio_v3`` pairs it with, the C-RADIOv3-B
    repository's code) and ours (their torch.hub code's align_corners=False) each give the
    reference tokens computed their way."""
    state = authors_state(layer_scale=True)
    path = tmp_path / "model.safetensors"
    save_file(hf_file(state), path)
    images = pixels(48)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    timms = timm.create_model(
        "vit_base_patch16_radio_v3",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        img_size=48,
        num_classes=0,
        **SMALL,
    ).eval()
    with torch.no_grad():
        converted = timms.forward_features((images - mean) / std)
    torch.testing.assert_close(converted, reference(state, images, align_corners=True), **TOLERANCE)
    ours = FrozenBackbone("vit_base_patch16_radio_v3", str(path), img_size=48, arch_kwargs=SMALL)
    torch.testing.assert_close(
        ours((images - mean) / std).all, reference(state, images), **TOLERANCE
    )


def with_changes(**changes) -> dict:
    state = hf_file(authors_state())
    for key, value in changes.items():
        if value is None:
            del state[f"radio_model.{key}"]
        else:
            state[f"radio_model.{key}"] = value
    return state


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            hf_file(authors_state(dim=48)),
            r"(?s)\(radio format\) does not fit .*The checkpoint has embed_dim=48",
        ),
        (hf_file(authors_state(prefix=5)), r"(?s)holds \[cls\] and 4 register.*reg_tokens: 4"),
        (
            with_changes(**{"feature_normalizer.mean": torch.zeros(DIM)}),
            r"normalises its patch features .*feature_normalizer.mean",
        ),
        (
            with_changes(
                **{
                    "model.blocks.0.attn.qkv.weight": None,
                    "model.blocks.0.attn.qkv.parametrizations.weight.original": torch.zeros(
                        3 * DIM, DIM
                    ),
                }
            ),
            r"spectrally reparametrised \(blocks.0.attn.qkv.parametrizations",
        ),
        (
            with_changes(**{"input_conditioner.norm_mean": torch.full((3, 1, 1), 0.5)}),
            r"input_conditioner.norm_mean is \[0.5, 0.5, 0.5\], not CLIP's",
        ),
        (with_changes(summary_idxs=torch.tensor([1, 2])), r"summary tokens are prefix slots"),
        (with_changes(**{"model.extra.weight": torch.zeros(2)}), r"unexpected keys: extra.weight"),
    ],
    ids=["width", "prefix", "normalizer", "reparametrised", "conditioner", "summaries", "unplaced"],
)
def test_a_misfit_is_refused_naming_the_format_and_why(tmp_path, state, message):
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=message):
        FrozenBackbone(
            "vit_base_patch16_224",
            str(tmp_path / "model.safetensors"),
            img_size=48,
            arch_kwargs={"reg_tokens": 7, "no_embed_class": True, "final_norm": False, **SMALL},
        )


def test_only_radios_layouts_are_claimed():
    assert recognise(hf_file(authors_state())).name == "radio"
    assert recognise(hub_file(authors_state())).name == "radio"
    timm_names = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0}
    assert recognise(timm_names) is None
    assert recognise({"state_dict": {"base_model.blocks.0.norm1.weight": 0}}) is None


@pytest.mark.slow
def test_the_script_fetches_the_configs_hugging_face_file(tmp_path):
    """``download_weights.py backbone=radiov25_vitb16`` fetches the config's url (its
    repository and file, here under a fake ``HF_ENDPOINT`` on 127.0.0.1) and checks it as a
    run reads it; the config then loads it offline."""
    state = authors_state()
    payload = save(hf_file(state))
    overrides = [
        "backbone=radiov25_vitb16",
        "backbone.img_size=48",
        *[f"+backbone.arch_kwargs.{key}={value}" for key, value in SMALL.items()],
        f"paths.root_dir={tmp_path}",
    ]
    url = compose_config(overrides, tmp_path).backbone.url
    assert url == "https://huggingface.co/nvidia/RADIO-B/resolve/main/model.safetensors"
    fetched = fetch_from_hub(url, payload, overrides, tmp_path)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert "is ready (radio format" in fetched.stdout
    assert (tmp_path / "weights" / "radio_v2.5-b.safetensors").read_bytes() == payload
    backbone = build_backbone(compose_config(overrides, tmp_path))
    images = pixels(48)
    torch.testing.assert_close(
        backbone(normalised(backbone, images)).all, reference(state, images), **TOLERANCE
    )
