"""Checkpoints written whole or not at all, as every other file of a run folder is."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mim_agg.utils.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but the file is written beside its target and renamed over
    it (``write_atomic``). Lightning's own writes into the temporary folder and moves the file:
    where that folder is another file system (usual on clusters) the move is a copy, which a
    full disk or a kill cuts short, leaving a truncated ``last.ckpt`` where a good one was.
    Probe checkpoints hold only the heads, so the bytes are made in memory first."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), buffer.getvalue())
