"""The checkpoint formats of the field, each turned into a timm state dict.

One module per format in this package, each registering its converter with
``@checkpoint_format(name, detect)``: a format is recognised from the checkpoint's own keys; its
converter keeps the evaluation encoder and renames its keys to timm's. Unknown layouts fall back
to the generic unwrapping in ``mim_agg/backbones/loading.py`` (``{"model": ...}``, ``module.`` /
``encoder.`` / ``backbone.`` prefixes). What a converter cannot place it keeps under the
checkpoint's own name, so the strict load reports it, naming the recognised format. A
converter may also return values for buffers timm computes itself rather than loads (``buffers``:
DINOv3's RoPE periods, which the published files store rounded): the load copies them in. Where
the authors' model computes a table for the input's size from a stored one (RADIO's position
grid, cropped and resampled at every forward), the format's ``fit`` computes it once for the
built model, before timm's own filter would resample it its way.

Adding a format is one module here (its ``detect`` and its converter) and one test that loads a
file in the authors' key layout and compares the tokens with an independent reference forward.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

State = dict[str, torch.Tensor]
# A converter may name the prefix slots its authors read as the image's summary (RADIO's one
# per teacher) under this key of the state it returns: the load checks them against
# backbone.summary_tokens and takes the entry out.
SUMMARY_SLOTS = "summary_slots"


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict], State]
    buffers: tuple[str, ...] = ()  # timm's non-persistent buffers whose values the file fixes
    fit: Callable[[State, nn.Module], State] | None = None  # the state for the built model


FORMATS: dict[str, Format] = {}


def checkpoint_format(
    name: str,
    detect: Callable[[dict], bool],
    buffers: tuple[str, ...] = (),
    fit: Callable[[State, nn.Module], State] | None = None,
):
    """Function decorator: the decorated converter serves checkpoints ``detect`` recognises;
    the keys ``buffers`` of what it returns are values for buffers the model computes itself;
    ``fit(state, model)`` turns what it returns into what ``model``, as built, computes with."""

    def add(convert: Callable[[dict], State]) -> Callable[[dict], State]:
        if name in FORMATS:
            raise ValueError(f"Checkpoint format {name!r} is registered twice.")
        FORMATS[name] = Format(name, detect, convert, buffers, fit)
        return convert

    return add


def recognise(checkpoint) -> Format | None:
    """The one format whose keys ``checkpoint`` has, or None. Two formats claiming one file would
    make the result depend on import order: a bug in a ``detect``, refused."""
    if not isinstance(checkpoint, dict):
        return None
    found = [f for f in FORMATS.values() if f.detect(checkpoint)]
    if len(found) > 1:
        raise ValueError(f"Checkpoint formats {[f.name for f in found]} all claim one file.")
    return found[0] if found else None


def prefixed(state: State, prefix: str) -> State:
    """The entries under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def nested(checkpoint: dict, key: str) -> dict:
    """``checkpoint[key]`` where that is a dict, else an empty one."""
    value = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    return value if isinstance(value, dict) else {}


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FORMATS", "Format", "State", "checkpoint_format", "nested", "prefixed", "recognise"]
