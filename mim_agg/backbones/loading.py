"""Checkpoint files of the field -> a state dict that fits a timm model, with clear errors.

MAE saves ``{"model": state_dict}``, DINO/iBOT ``{"teacher": ...}`` or plain dicts, SimMIM
prefixes its keys with ``encoder.``, DDP with ``module.``; pretraining checkpoints carry decoder
and mask-token weights a frozen encoder never uses.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from mim_agg.backbones.formats import FORMATS, SUMMARY_SLOTS, recognise
from mim_agg.backbones.tokens import require_finite
from mim_agg.errors import ConfigError, MissingFile, UserError

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")
KEY_PREFIXES = ("module.", "encoder.", "backbone.", "model.")
UNUSED_KEY_STARTS = ("decoder", "mask_token", "masked_embed", "head.", "fc_norm.", "lm_head")


# Objects the field's checkpoints pickle beside their weights, allowed by name: iBOT / BEiT v2
# store their argparse arguments, SimMIM its yacs config. A yacs ``CfgNode`` is a dict subclass,
# pickled as its class, its items and its attributes; it is read as an ``OrderedDict`` holding
# the same items and attributes (weights_only fills dict subclasses only of its own allowed
# types), so yacs is never imported and nothing becomes constructible that torch did not allow.
# Nothing else is ever imported while reading a checkpoint.
SAFE_GLOBALS = [argparse.Namespace, (OrderedDict, "yacs.config.CfgNode")]


def require_file(path: str | Path, backbone: str = "<name>") -> Path:
    """``path`` as a checkpoint file that exists; else an error saying how to get it
    (``backbone``: the config whose ``url`` ``scripts/download_weights.py`` fetches)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(
            f"backbone.weights={str(path)!r} is neither an existing checkpoint file nor a timm "
            "pretrained tag like 'vit_base_patch16_224.mae'; check the path, or fetch it: "
            f"python scripts/download_weights.py backbone={backbone}"
        )
    return path


# What a damaged backbone file's message advises; a run's own checkpoints pass their own fix.
REFETCH = (
    "fetch it again (python scripts/download_weights.py backbone=<name> for a config's file) "
    "or set backbone.weights to a complete checkpoint of plain tensors (.pth or .safetensors)"
)


def read_checkpoint(path: str | Path, fix: str = REFETCH):
    """A ``.safetensors`` or torch checkpoint, read without running code (``weights_only``
    with an allow-list of the plain objects checkpoints of the field carry).

    Damaged bytes are the file's fault, not the code's, and torch and safetensors report them
    with a dozen exception types (OSError, RuntimeError, EOFError, UnpicklingError, struct and
    Unicode errors, ... for truncated, bit-flipped or foreign files): all of them become one
    message naming the file, what it holds and ``fix``.
    """
    path = require_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # any parse failure: see the docstring
        raise UserError(unreadable(path, error, fix)) from None


def unreadable(path: Path, error: Exception, fix: str) -> str:
    """Why ``path`` is no checkpoint, in words of our own: torch's text for a refused pickle
    advises ``weights_only=False``, which would run whatever the file holds."""
    if refused := refused_global(path, error):
        why = (
            f"is not a plain tensor checkpoint: it pickles {refused}, which could run code when "
            "loaded; it was refused, and nothing in it was executed"
        )
    elif text := text_start(path):
        why = f"cannot be read: it holds text (it begins {text!r}: a web page or a message?)"
    else:
        # torch's own words only where they cannot carry its weights_only=False advice
        advice = isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error)
        detail = "" if advice else ": " + str(error).split("\n")[0].split(". ")[0][:120]
        size = path.stat().st_size
        why = (
            "cannot be read: it is truncated, damaged or not a checkpoint "
            f"({size} bytes; {type(error).__name__}{detail})"
        )
    return f"Checkpoint {str(path)!r} {why}; {fix}."


# torch's words for a global its safe loader will not import: an allowed-list miss, and (for
# modules such as os, posix or subprocess) a blocked module.
REFUSED_GLOBAL = (
    r"Unsupported global: GLOBAL (\S+) was not an allowed global"
    r"|Trying to load unsupported GLOBAL (\S+) whose module \S+ is blocked"
)


def refused_global(path: Path, error: Exception) -> str | None:
    """The object torch's safe loader refused in a complete checkpoint (a zip archive whose
    pickle reads back whole, checksum and all), else None: a cut through a pickle can leave half
    a name that torch reports as refused too, and such a file is damaged, not crafted."""
    found = re.search(REFUSED_GLOBAL, str(error))
    if found is None or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("/data.pkl"):
                    archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    return found.group(1) or found.group(2)


def text_start(path: Path, size: int = 64) -> str | None:
    """The file's first line when it starts as text (an HTML page or an error message saved
    in place of the weights); None for binary data, which every checkpoint format is, and for
    a few bytes too short to tell."""
    with open(path, "rb") as file:
        start = file.read(size)
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text.strip()) < 16 or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    return text.strip().splitlines()[0][:40]


def read_state_dict(path: str | Path, fix: str = REFETCH) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's encoder weights and the name of the format they were found in; a file
    that holds no named tensors (a list, a bare tensor, a run's metrics) is refused here."""
    checkpoint = read_checkpoint(path, fix)
    known = recognise(checkpoint)
    if known is not None:
        state, name = known.convert(checkpoint), known.name
    else:
        state, name = unwrap(checkpoint), "generic"
    if not is_state_dict(state):
        raise UserError(
            f"Checkpoint {str(path)!r} holds no model weights (names mapped to tensors) but "
            f"{summary(checkpoint)}; {fix}."
        )
    return state, name


def is_state_dict(state) -> bool:
    """Names (strings) mapped to tensors: what every later step (prefixes, shapes) reads."""
    return (
        isinstance(state, dict)
        and all(isinstance(key, str) for key in state)
        and any(isinstance(value, torch.Tensor) for value in state.values())
    )


def summary(checkpoint) -> str:
    """A few words on what a file that is no checkpoint of the kind asked for holds."""
    if isinstance(checkpoint, dict):
        return f"a mapping of {_abbrev(sorted(map(str, checkpoint)), limit=5)}"
    return f"a {type(checkpoint).__name__}"


def describe_checkpoint(path: str | Path, fix: str = REFETCH) -> str:
    """What a checkpoint file holds, read exactly as a run reads it (safe loader, format
    detection): a download is called ready only after this succeeded."""
    state, name = read_state_dict(path, fix)
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    values = sum(tensor.numel() for tensor in tensors)
    return f"{name} format, {len(tensors)} tensors, {values / 1e6:.1f}M values"


def read_run_checkpoint(path: str | Path, fix: str, keys: tuple[str, ...]) -> dict:
    """A checkpoint a probe run wrote (``last.ckpt``), read as safely as weights are, a damaged
    one named with ``fix``; one without ``keys`` is some other file."""
    checkpoint = read_checkpoint(path, fix)
    missing = [key for key in keys if not (isinstance(checkpoint, dict) and key in checkpoint)]
    if missing:
        raise UserError(
            f"Checkpoint {str(path)!r} is no probe run's checkpoint (it lacks {', '.join(missing)}"
            f"; it holds {summary(checkpoint)}); {fix}."
        )
    return checkpoint


def unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """Generic layouts: ``{"model" | "state_dict" | "teacher" | "module": weights}`` or plain."""
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return checkpoint


def normalize_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop pretraining-only weights."""
    stripped = {strip_prefixes(key): value for key, value in state_dict.items()}
    return {key: value for key, value in stripped.items() if not key.startswith(UNUSED_KEY_STARTS)}


def load_checkpoint_into(
    model: nn.Module, path: str | Path, summary_tokens: int | None = None
) -> None:
    """Load a checkpoint file into ``model`` (strictly, apart from its classifier head): its
    tokens before the patches must be the architecture's, and the first ``summary_tokens`` of
    them its summary where its format names one; biases of zeros the architecture has no place
    for are left out, others refused; buffers its format fixes are copied in."""
    stored, source_format = read_state_dict(path)
    state = normalize_keys(stored)
    check_summary_tokens(state.pop(SUMMARY_SLOTS, None), summary_tokens, path)
    carried = carried_buffers(state, source_format)  # before timm's filter, which drops them
    state_dict = timm_filtered(model, fitted(model, state, source_format))
    check_prefix_tokens(model, state_dict, f"{str(path)!r} ({source_format} format)")
    state_dict = without_zero_biases(model, state_dict)
    buffers = {k: v for k, v in model.named_buffers() if k in carried}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(UNUSED_KEY_STARTS)}
    expected |= buffers
    given = state_dict | carried
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {_shape(given[k])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and _shape(given[k]) != tuple(v.shape)
    )
    if unexpected and not (missing or misshaped):
        check_attention_biases(model, unexpected, f"{str(path)!r} ({source_format} format)")
    if missing or unexpected or misshaped:
        raise ConfigError(
            f"Checkpoint {str(path)!r} ({source_format} format) does not fit "
            f"backbone.arch={_arch(model)} ({_describe(model)}).\n"
            f"  missing keys: {_abbrev(missing)}\n"
            f"  unexpected keys: {_abbrev(unexpected)}\n"
            f"  misshaped keys: {_abbrev(misshaped)}\n"
            f"{_describe_state(state_dict)}Set backbone.arch (and backbone.arch_kwargs, e.g. "
            "num_heads) to the architecture the checkpoint was trained with, or "
            "backbone.weights to a checkpoint of this one."
        )
    require_finite(
        f"Values of the weights in {str(path)!r}",
        given.values(),
        "the file: fetch it again, or pass a checkpoint saved before its training diverged",
    )
    model.load_state_dict(state_dict, strict=False)
    for key, value in carried.items():
        buffers[key].copy_(value)
    log.info(
        "Loaded %s (%s format) into backbone.arch=%s: all %d tensors it reads, none missing; "
        "left out as pretraining-only: %s.",
        path,
        source_format,
        _arch(model),
        len(expected),
        _abbrev(sorted({key.split(".")[0] for key in unused_keys(stored)}), limit=6),
    )


def check_summary_tokens(slots: torch.Tensor | None, summary_tokens: int | None, path) -> None:
    """Refuse ``backbone.summary_tokens`` where the file names other prefix slots as its
    summary (``SUMMARY_SLOTS``, RADIO's ``summary_idxs``): a concatenation that took in an
    untrained token or a register, or left a teacher out, would load without an error."""
    if slots is None or summary_tokens is None or slots.tolist() == list(range(summary_tokens)):
        return
    named = slots.tolist()
    fix = (
        f"set backbone.summary_tokens={len(named)}"
        if named == list(range(len(named)))
        else "leave backbone.summary_tokens null and read the [cls] alone "
        "(backbone.linear_input=cls)"
    )
    raise ConfigError(
        f"backbone.summary_tokens={summary_tokens} reads the first {summary_tokens} prefix tokens "
        f"as the summary, but {str(path)!r} names prefix slots {named} as its summary: {fix}."
    )


def carried_buffers(state: dict[str, torch.Tensor], source_format: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (taken out of it) that its format gives as the values of buffers
    timm computes itself (``Format.buffers``: DINOv3's RoPE periods, stored rounded to bfloat16,
    which the authors' model computes with): copied in after the load."""
    known = FORMATS.get(source_format)
    names = known.buffers if known is not None else ()
    return {name: state.pop(name) for name in names if name in state}


def fitted(model: nn.Module, state: dict[str, torch.Tensor], source_format: str) -> dict:
    """``state`` as its format computes it for ``model`` as built (``Format.fit``: RADIO's
    position grid cropped to the model's), else as it is: timm's filter then finds the
    tables at the model's size and leaves them."""
    known = FORMATS.get(source_format)
    return known.fit(state, model) if known is not None and known.fit is not None else state


def prefix_tokens(has_cls: bool, registers: int) -> str:
    cls = "[cls]" if has_cls else "no [cls]"
    return f"{cls} and {registers} register/storage tokens (reg_token)"


def check_prefix_tokens(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a file whose tokens before the patches ([cls], registers, DINOv3's storage
    tokens) are not the architecture's: each patch would be read from another position, a
    shifted grid that loads without an error elsewhere only by luck. A file without a patch
    embedding is no ViT's at all: the key comparison after this says what it holds."""
    if "patch_embed.proj.weight" not in state:
        return
    theirs = ("cls_token" in state, _count_registers(state.get("reg_token")))
    ours = (
        getattr(model, "cls_token", None) is not None,
        _count_registers(getattr(model, "reg_token", None)),
    )
    if theirs == ours:
        return
    options = inspect.signature(type(model)).parameters
    fixes = []
    if theirs[0] != ours[0] and "class_token" in options:
        fixes.append(f"class_token: {str(theirs[0]).lower()}")
    register_option = next((n for n in ("num_reg_tokens", "reg_tokens") if n in options), None)
    if theirs[1] != ours[1] and register_option:
        fixes.append(f"{register_option}: {theirs[1]}")
    fix = (
        f"set backbone.arch_kwargs: {{{', '.join(fixes)}}} in its conf/backbone/ file, or "
        if fixes
        else ""
    )
    raise ConfigError(
        f"Checkpoint {source} holds {prefix_tokens(*theirs)} before its patches, but "
        f"backbone.arch={_arch(model)} is built with {prefix_tokens(*ours)}: every patch would "
        f"be read from another token's place. Use an architecture with the checkpoint's prefix "
        f"tokens ({fix}pick the arch it was trained with), or backbone.weights to a checkpoint "
        "of this one."
    )


def _count_registers(reg_token) -> int:
    return int(reg_token.shape[1]) if isinstance(reg_token, torch.Tensor) else 0


def without_zero_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """``state`` less the all-zero biases of layers the model builds without a bias (timm's
    DINOv3 archs without ``_qkvb`` for the published files' zero q/v biases): adding zero
    computes what leaving it out does."""
    expected = model.state_dict()

    def adds_nothing(key: str, value) -> bool:
        module, _, name = key.rpartition(".")
        return (
            key not in expected
            and (name == "bias" or name.endswith("_bias"))
            and isinstance(value, torch.Tensor)
            and not bool(value.any())
            and _has_module(model, module)
        )

    return {k: v for k, v in state.items() if not adds_nothing(k, v)}


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_attention_biases(model: nn.Module, unexpected: list[str], source: str) -> None:
    """Where non-zero attention biases are all that does not fit (timm's own DINOv3 filter
    would drop them silently), name the architecture that holds them."""
    biases = [k for k in unexpected if re.search(r"\.attn\.(q_bias|v_bias|qkv\.bias)$", k)]
    if biases != unexpected:
        return
    arch = _arch(model)
    holder = f"{arch}_qkvb"
    fix = (
        f"backbone.arch={holder}"
        if holder in timm.list_models()
        else "backbone.arch_kwargs: {qkv_bias: true} in its conf/backbone/ file"
    )
    raise ConfigError(
        f"Checkpoint {source} adds non-zero attention biases ({_abbrev(biases, limit=3)}), which "
        f"backbone.arch={arch} has no place for: loaded without them, every token would change. "
        f"Use {fix}, an architecture that holds them."
    )


def unused_keys(stored: dict[str, torch.Tensor]) -> list[str]:
    """The checkpoint's keys a frozen encoder never reads (decoders, mask tokens, heads)."""
    return [key for key in map(strip_prefixes, stored) if key.startswith(UNUSED_KEY_STARTS)]


def strip_prefixes(key: str) -> str:
    for prefix in KEY_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def timm_filtered(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """The state dict after the architecture's own timm filter function (position embeddings
    resampled to the model's image size, timm's format conversions). A checkpoint of another
    architecture can break the filter itself (a position table of another grid cannot be
    reshaped, a missing table is read): then the keys are compared unfiltered, which says why."""
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if timm_filter is None:
        return state_dict
    try:
        return timm_filter(state_dict, model)
    except (RuntimeError, ValueError, AttributeError, KeyError, IndexError, TypeError):
        return state_dict


def _shape(value) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def _describe(model: nn.Module) -> str:
    if isinstance(getattr(model, "stages", None), nn.Sequential):  # ConvNeXt: widths per stage
        widths = [info["num_chs"] for info in model.feature_info]
        return f"stage widths {widths}, depths {[len(stage.blocks) for stage in model.stages]}"
    embed_dim = getattr(model, "embed_dim", "?")
    depth = len(getattr(model, "blocks", []))
    return f"embed_dim={embed_dim}, depth={depth}"


def _describe_state(state: dict) -> str:
    """The checkpoint's width and depth as its keys give them (timm's names), when they do."""
    widths = [
        state[k].shape[-1]
        for k in ("pos_embed", "norm.weight")
        if isinstance(state.get(k), torch.Tensor) and state[k].dim()
    ]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not (widths and blocks):
        return ""
    return f"The checkpoint has embed_dim={widths[0]}, depth={max(blocks) + 1}. "


def _abbrev(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")
