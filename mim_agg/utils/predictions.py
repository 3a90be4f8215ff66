"""``predictions.safetensors``: every head's predicted class for every test image.

Paired tests between heads (``mim_agg/report/significance.py``) need to know which images
each head got right, not only how many. An evaluation writes, once, the test images' indices
(their positions in the test split, ascending), their labels, and per head the predicted
class: int16 where the classes fit (ImageNet-21k's 21,841 do), 2 bytes per image and head
(50,000 ImageNet images x 24 heads: 2.4 MB). Written atomically, as every result file.

Where an image has several right answers (ImageNet-ReaL: a prediction is right if it is in the
image's label set), the file also holds every image's set, flattened (``label_values``, cut
at ``label_offsets``: 2 bytes per label and 8 per image, beside the heads' 2 per image and
head), and ``correct`` reads membership; ``targets`` is then each set's first label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from mim_agg.errors import UserError
from mim_agg.runs.folder import RECORD
from mim_agg.utils.files import DamagedFile, write_atomic

FILE = "predictions.safetensors"
FORMAT = "1"
HEAD_PREFIX = "predicted/"
OFFSETS, VALUES = "label_offsets", "label_values"


@dataclass
class LabelSets:
    """Every right answer per image: image ``i``'s are ``values[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # [N + 1] from 0, increasing: at least one label per image
    values: np.ndarray  # the labels, image after image

    @classmethod
    def of(cls, sets, num_classes: int) -> LabelSets:
        counts = [len(labels) for labels in sets]
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        values = np.array([label for labels in sets for label in labels], dtype=np.int64)
        return cls(offsets, values.astype(class_dtype(num_classes)))

    def contain(self, classes: np.ndarray) -> np.ndarray:
        """One bool per image: whether ``classes[i]`` is among image ``i``'s labels."""
        hits = np.repeat(classes, np.diff(self.offsets)) == self.values
        return np.logical_or.reduceat(hits, self.offsets[:-1])

    def problem(self, targets: np.ndarray, num_classes: int) -> str | None:
        offsets, values = self.offsets, self.values
        if offsets.dtype.kind not in "iu" or values.dtype.kind not in "iu":
            return "its label sets hold no class indices"
        if offsets.shape != (len(targets) + 1,) or values.ndim != 1:
            return f"its label offsets have shape {offsets.shape}, not ({len(targets) + 1},)"
        if offsets[0] != 0 or np.any(np.diff(offsets) < 1) or offsets[-1] != len(values):
            return "its label offsets do not cut the label values into one set per image"
        if values.min() < 0 or values.max() >= num_classes:
            return f"its label sets hold classes outside [0, {num_classes})"
        if not self.contain(targets).all():
            return "some image's target is not in its label set"
        return None


@dataclass
class HeadPredictions:
    image_index: np.ndarray  # [N] positions in the test split, ascending
    targets: np.ndarray  # [N] labels (with label_sets: each set's first)
    predicted: dict[str, np.ndarray]  # head -> [N] predicted classes
    num_classes: int
    label_sets: LabelSets | None = None  # several right answers per image (ReaL), else None

    @classmethod
    def in_image_order(
        cls, image_index, targets, predicted: dict, num_classes: int, label_sets=None
    ) -> HeadPredictions:
        """From arrays in any order (ranks of a distributed run, say), sorted by image;
        ``label_sets``: per image, its list of right answers, or None."""
        order = np.argsort(np.asarray(image_index), kind="stable")
        sets = None if label_sets is None else [label_sets[i] for i in order]
        return cls(
            np.asarray(image_index, dtype=np.int64)[order],
            np.asarray(targets)[order].astype(np.int32),
            {
                head: np.asarray(p)[order].astype(class_dtype(num_classes))
                for head, p in predicted.items()
            },
            num_classes,
            None if sets is None else LabelSets.of(sets, num_classes),
        )

    def correct(self, head: str) -> np.ndarray:
        """One bool per image: whether ``head`` predicted its label (one in its label set)."""
        if self.label_sets is not None:
            return self.label_sets.contain(self.predicted[head])
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
        if self.label_sets is not None:
            return self.label_sets.problem(self.targets, self.num_classes)
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
    if predictions.label_sets is not None:
        tensors |= {OFFSETS: predictions.label_sets.offsets, VALUES: predictions.label_sets.values}
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
            sets = None
            if OFFSETS in set(file.keys()):  # several right answers per image (ReaL)
                sets = LabelSets(file.get_tensor(OFFSETS), file.get_tensor(VALUES))
            predictions = HeadPredictions(
                file.get_tensor("image_index"),
                file.get_tensor("targets"),
                {head: file.get_tensor(HEAD_PREFIX + head) for head in heads},
                int(metadata["num_classes"]),
                sets,
            )
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise DamagedFile(
            f"{path} is damaged or no predictions file ({type(error).__name__}: {error}); "
            f"move it away (the report then leaves that run's heads unmarked) or {remedy(path)}."
        ) from None
    problem = predictions.problem()
    if problem:
        raise UserError(f"{path} cannot be used: {problem}. Move it away or {remedy(path)}.")
    return predictions


def remedy(path: Path) -> str:
    """How to write ``path`` anew: a run's own file (beside its ``run.json``) by training that
    run again, ``task=evaluate``'s (``<run>/evaluate/<set>/``) by scoring the set again."""
    if (path.parent / RECORD).is_file():
        return f"train that run again (its command with resume=false, run folder {path.parent})"
    return "score the set again (python run.py task=evaluate ... resume=false)"
