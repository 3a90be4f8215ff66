"""``predictions.safetensors``: every head's predicted class for every test image.

Paired tests between heads (``mim_agg/report/significance.py``) need to know which images
each head got right, not only how many. An evaluation writes, once, the test images' indices
(their positions in the test split, ascending), their labels, and per head the predicted
class: int16 where the classes fit (ImageNet-21k's 21,841 do), 2 bytes per image and head
(50,000 ImageNet images x 24 heads: 2.4 MB). Written atomically, as every result file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from mim_agg.errors import UserError
from mim_agg.utils.files import DamagedFile, write_atomic

FILE = "predictions.safetensors"
FORMAT = "1"
HEAD_PREFIX = "predicted/"


@dataclass
class HeadPredictions:
    image_index: np.ndarray  # [N] positions in the test split, ascending
    targets: np.ndarray  # [N] labels
    predicted: dict[str, np.ndarray]  # head -> [N] predicted classes
    num_classes: int

    @classmethod
    def in_image_order(
        cls, image_index, targets, predicted: dict, num_classes: int
    ) -> HeadPredictions:
        """From arrays in any order (ranks of a distributed run, say), sorted by image."""
        order = np.argsort(np.asarray(image_index), kind="stable")
        return cls(
            np.asarray(image_index, dtype=np.int64)[order],
            np.asarray(targets)[order].astype(np.int32),
            {
                head: np.asarray(p)[order].astype(class_dtype(num_classes))
                for head, p in predicted.items()
            },
            num_classes,
        )

    def correct(self, head: str) -> np.ndarray:
        """One bool per image: whether ``head`` predicted its label."""
        return self.predicted[head] == self.targets

    def accuracy(self, head: str) -> float:
        return float(np.count_nonzero(self.correct(head))) / len(self.targets)

    def problem(self) -> str | None:
        """What makes these predictions unusable, or None."""
        n = len(self.targets)
        arrays = {"image_index": self.image_index, "targets": self.targets, **self.predicted}
        for name, values in arrays.items():
            if values.dtype.kind not in "iu":
                return f"{name} holds {values.dtype} values, not class indices"
            if values.shape != (n,):
                return f"{name} has shape {values.shape}, the targets ({n},)"
        if n == 0:
            return "it holds no test image"
        if np.any(np.diff(self.image_index) <= 0) or self.image_index[0] < 0:
            return "its image indices are not distinct, ascending and non-negative"
        for name, values in {"targets": self.targets, **self.predicted}.items():
            if values.min() < 0 or values.max() >= self.num_classes:
                return f"{name} holds classes outside [0, {self.num_classes})"
        return None


def class_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


def write_predictions(path: Path, predictions: HeadPredictions) -> Path:
    problem = predictions.problem()
    if problem:
        raise ValueError(f"Refusing to write {path}: {problem}.")
    tensors = {
        "image_index": predictions.image_index,
        "targets": predictions.targets,
        **{HEAD_PREFIX + head: p for head, p in predictions.predicted.items()},
    }
    metadata = {
        "format": FORMAT,
        "num_classes": str(predictions.num_classes),
        "heads": json.dumps(list(predictions.predicted)),
    }
    return write_atomic(path, save(tensors, metadata=metadata))


def read_predictions(path: Path) -> HeadPredictions:
    """The file's predictions, checked; a damaged or inconsistent file is named."""
    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as file:
            metadata = file.metadata() or {}
            heads = json.loads(metadata["heads"])
            predictions = HeadPredictions(
                file.get_tensor("image_index"),
                file.get_tensor("targets"),
                {head: file.get_tensor(HEAD_PREFIX + head) for head in heads},
                int(metadata["num_classes"]),
            )
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise DamagedFile(
            f"{path} is damaged or no predictions file ({type(error).__name__}: {error}); "
            "move it away (the report then leaves that run's heads unmarked) or rerun the "
            "evaluation in a new folder."
        ) from None
    problem = predictions.problem()
    if problem:
        raise UserError(f"{path} cannot be used: {problem}. Move it away or rerun the evaluation.")
    return predictions
