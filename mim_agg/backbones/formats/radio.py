"""RADIO (NVlabs/RADIO): NVIDIA's files of RADIOv2.5 (and the C-RADIO models of the same
layout), for a timm ``VisionTransformer`` with ``no_embed_class`` and the file's prefix tokens
(``[cls]`` plus ``reg_token``).

Their encoder is a timm ViT whose patch embedding, ``[cls]`` and position table were replaced by
a ``ViTPatchGenerator`` (``radio/enable_cpe_support.py``, ``radio/vit_patch_generator.py``):
``embedder``, a bias-free linear map of each patch's pixels flattened as (channel, row, column),
which is timm's convolution kernel reshaped; ``pos_embed``, a square table for their largest
input (``cpe_max_size`` 2048 px: 128 x 128 cells at patch 16) added to the patches alone; then
``cls_token.token``, one summary token per teacher followed by registers (RADIOv2.5: DFN CLIP,
SigLIP, DINOv2, SAM's untrained one, 4 registers; NVlabs/RADIO issue 80), prepended unpositioned.
timm's ``[cls]`` is the first of them and its ``reg_token`` the rest: the same order. Their
final norm is replaced by an identity (``create_model_from_args``), so the file has none.

At evaluation the generator computes the image's position table from the stored one (CPE,
``_get_pos_embeddings``, not training): resized bilinearly (``align_corners=False``, no
antialiasing, in float32) to a square of the grid's longer side, then its top-left window of the
image's grid is kept. ``fit`` computes that once for the model as built; the model's forward
then adds the same table RADIO adds. (Their Hugging Face repositories' copies of the code, and
RADIO's own before 2025-06, resize with ``align_corners=True``; their torch.hub code, which
efficient-probing ran, is followed here.)

Two layouts: the Hugging Face ``model.safetensors`` of nvidia/RADIO-B, RADIO-L, C-RADIO*
(their ``RADIOModel`` for ``trust_remote_code``: ``radio_model.model.*`` the encoder,
``radio_model.input_conditioner``, ``radio_model.summary_idxs``, ``radio_model.adaptors``), and
the torch.hub ``.pth.tar`` of nvidia/RADIO (``{"args", "state_dict"}``: ``base_model.*`` the
encoder, ``input_conditioner.*``, ``_heads.*`` / ``_feature_projections.*`` the teachers' heads;
``state_dict_ema`` where present, as their ``hubconf.py``). The teachers' heads and the
normaliser only their ``forward_intermediates`` applies are left out; the input conditioner,
``(x - mean) / std`` on [0, 1] pixels, is the data's normalisation here, so the file's must be
CLIP's, which the RADIO configs set.
"""

from __future__ import annotations

import math
import re

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from torch import nn

from mim_agg.backbones.formats import (
    SUMMARY_SLOTS,
    State,
    checkpoint_format,
    nested,
    prefixed,
)
from mim_agg.errors import ConfigError

_EMBEDDER = "patch_generator.embedder.weight"
_HF_ROOT, _HF_ENCODER, _HUB_ENCODER = "radio_model.", "model.", "base_model."
_HUB_STATES = ("state_dict_ema", "state_dict")  # the EMA weights first, as their hubconf.py
_GENERATOR = {
    "patch_generator.embedder.bias": "patch_embed.proj.bias",
    "patch_generator.pos_embed": "pos_embed",
}
# Besides the encoder: the teachers' heads (adaptors), and the normaliser of their
# forward_intermediates alone; never part of the tokens a forward computes.
_LEFT_OUT = (
    "adaptors.",
    "_heads.",
    "_feature_projections.",
    "inter_feature_normalizer.",
    "_intermediate_feature_normalizer.",
    "summary_idxs",
)
_FEATURE_NORMALIZER = ("feature_normalizer.", "_feature_normalizer.")
_CONDITIONER = {"input_conditioner.norm_mean": OPENAI_CLIP_MEAN,
                "input_conditioner.norm_std": OPENAI_CLIP_STD}  # fmt: skip
_LAYER_SCALE = re.compile(r"(blocks\.\d+\.ls[12])\.grandma")  # their LayerScale's name


def hub_state(checkpoint: dict) -> dict:
    """The torch.hub file's state dict (EMA first), or an empty one."""
    for key in _HUB_STATES:
        state = nested(checkpoint, key)
        if _HUB_ENCODER + _EMBEDDER in state:
            return state
    return {}


def is_radio(checkpoint: dict) -> bool:
    """RADIO's patch generator under either layout's encoder prefix: no other family of the
    field names its patch embedding so."""
    return _HF_ROOT + _HF_ENCODER + _EMBEDDER in checkpoint or bool(hub_state(checkpoint))


def crop_position_grid(state: State, model: nn.Module) -> State:
    """``state`` with the position table RADIO adds at evaluation for ``model``'s grid (see
    the module docstring). A table that is not a square grid, or a model without a patch grid,
    is left for the load to name."""
    table = state.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    side = math.isqrt(table.shape[1]) if table is not None and table.dim() == 3 else 0
    if grid is None or not side or side * side != table.shape[1]:
        return state
    size = max(grid)
    square = resample_abs_pos_embed(
        table.float(),
        new_size=(size, size),
        old_size=(side, side),
        num_prefix_tokens=0,
        interpolation="bilinear",
        antialias=False,
        align_corners=False,
    )
    window = square.unflatten(1, (size, size))[:, : grid[0], : grid[1]]
    return {**state, "pos_embed": window.flatten(1, 2)}


@checkpoint_format("radio", is_radio, fit=crop_position_grid)
def convert_radio(checkpoint: dict) -> State:
    """timm's names for the encoder; the conditioner and the summary slots checked, the heads
    left out. A key not placed keeps its name (within its model), so the strict load names it."""
    encoder, rest = split_layout(checkpoint)
    check_conditioner(rest)
    slots = summary_slots(checkpoint)
    check_first_token_is_a_summary(slots)
    refuse_feature_normalizer(rest)
    kept = {k: v for k, v in rest.items() if not k.startswith((*_LEFT_OUT, *_CONDITIONER))}
    named = {} if slots is None else {SUMMARY_SLOTS: torch.tensor(slots)}
    return convert_encoder(encoder) | kept | named


def split_layout(checkpoint: dict) -> tuple[State, State]:
    """The encoder's weights and the rest of the model's, either layout's prefixes removed."""
    if _HF_ROOT + _HF_ENCODER + _EMBEDDER in checkpoint:
        state, encoder = checkpoint, _HF_ROOT + _HF_ENCODER
        rest = {k.removeprefix(_HF_ROOT): v for k, v in state.items() if not k.startswith(encoder)}
    else:
        state, encoder = hub_state(checkpoint), _HUB_ENCODER
        rest = {k: v for k, v in state.items() if not k.startswith(encoder)}
    return prefixed(state, encoder), rest


def convert_encoder(encoder: State) -> State:
    """The patch generator as timm's patch embedding, position table and prefix tokens; the
    blocks under timm's names (their LayerScale ``grandma`` is timm's ``gamma``)."""
    refuse_reparametrized(encoder)
    state: State = {}
    for key, value in encoder.items():
        side = kernel_side(value) if key == _EMBEDDER and value.dim() == 2 else 0
        if side:
            state["patch_embed.proj.weight"] = value.reshape(len(value), 3, side, side)
            state.setdefault("patch_embed.proj.bias", value.new_zeros(len(value)))
        elif key == "patch_generator.cls_token.token" and value.dim() == 2:
            state["cls_token"] = value[None, :1]
            if len(value) > 1:
                state["reg_token"] = value[None, 1:]
        elif key in _GENERATOR:
            state[_GENERATOR[key]] = value
        else:
            state[_LAYER_SCALE.sub(r"\1.gamma", key)] = value
    return state


def kernel_side(weight: torch.Tensor) -> int:
    """The patch side ``p`` of an embedder of ``3 p p`` inputs, or 0 (the load names it)."""
    side = math.isqrt(weight.shape[1] // 3)
    return side if 3 * side * side == weight.shape[1] else 0


def summary_slots(checkpoint: dict) -> list[int] | None:
    """The prefix tokens RADIO returns as its summary: the Hugging Face file's
    ``summary_idxs``, or, as their hubconf.py derives them from a torch.hub file's arguments,
    the first slot of each teacher whose summary is used (``use_summary``)."""
    if isinstance(idxs := checkpoint.get(_HF_ROOT + "summary_idxs"), torch.Tensor):
        return idxs.tolist()
    args = checkpoint.get("args")
    teachers = getattr(args, "teachers", None)
    if not isinstance(teachers, list):
        return None
    if not getattr(args, "cls_token_per_teacher", True):
        return [0]
    first: dict[str, int] = {}
    for slot, teacher in enumerate(teachers):
        if teacher.get("use_summary", True):
            first.setdefault(teacher["name"], slot)
    return sorted(first.values())


def check_first_token_is_a_summary(slots: list[int] | None) -> None:
    """Our ``[cls]`` is RADIO's first prefix token: it must be a teacher's summary, not an
    untrained slot (SAM's) or a register."""
    if slots is not None and 0 not in slots:
        raise ConfigError(
            f"This RADIO file's summary tokens are prefix slots {slots}, not the first: the "
            "[cls] read here (backbone.linear_input=cls) would be no teacher's summary. Use a "
            "RADIO file whose first prefix token is a summary (RADIOv2.5's: DFN CLIP's), or "
            "backbone.linear_input=mean."
        )


def check_conditioner(rest: State) -> None:
    """The file's input conditioner is the data's normalisation here: CLIP's statistics, which
    every RADIO config sets (to fp16 precision: the half files store it so)."""
    for key, expected in _CONDITIONER.items():
        value = rest.get(key)
        if value is not None and not torch.allclose(
            value.float().flatten(), torch.tensor(expected), atol=1e-3
        ):
            raise ConfigError(
                f"This RADIO file's {key} is {value.flatten().tolist()}, not CLIP's "
                f"{list(expected)}, which the RADIO configs normalise images with; set "
                "backbone.mean and backbone.std to the file's values in its conf/backbone/ file."
            )


def refuse_feature_normalizer(rest: State) -> None:
    """A file whose patch features RADIO passes through a learned affine map after the last
    block (``FeatureNormalizer``, PHI-S): timm's ViT has no place for it, and the patches
    without it are not RADIO's."""
    found = sorted(k for k in rest if k.startswith(_FEATURE_NORMALIZER))
    if found:
        raise ConfigError(
            f"This RADIO file normalises its patch features after the last block ({found}), "
            "which timm's ViT has no place for: its patches would not be RADIO's. Use a RADIO "
            "file without a feature normaliser (RADIOv2.5-B / L)."
        )


def refuse_reparametrized(encoder: State) -> None:
    """A training file whose linear weights are stored spectrally reparametrised
    (``parametrizations.weight.original`` and a scale): the weights the model computes with are
    derived by their loader, not stored."""
    found = sorted(k for k in encoder if ".parametrizations." in k)
    if found:
        raise ConfigError(
            f"This RADIO file stores its weights spectrally reparametrised ({found[0]}, ...: a "
            "training form whose effective weights their loader computes). Use the Hugging Face "
            "model.safetensors of the same model, which stores the weights computed."
        )
