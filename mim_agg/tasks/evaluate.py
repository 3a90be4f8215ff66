"""The ``evaluate`` task: score a finished probe run's heads on another test set.

``python run.py task=evaluate evaluate.run=<probe run folder> dataset=imagenet_r`` rebuilds
the run's frozen backbone and every head from the run's ``config.yaml``, loads each head's
held-out-selected weights from its ``last.ckpt`` (as the run's own test did), streams the set
through the backbone online with the run's eval transform, and scores every head: top-1 (and
top-5) over the classes the set scores (ImageNet-R/-A: their 200), or, on ReaL, a prediction
in the image's label set. Nothing is chosen here: the run's winner stays its held-out winner.
Results go beside the run's own, in ``<run>/evaluate/<set>/`` (``metrics.json``, ``heads.csv``,
``predictions.safetensors``, on ReaL with each image's label set), written whole, never over
the run's own files. ``metrics.json`` records the SHA-256 of the ``last.ckpt`` it scored, so a
report refuses results the run has outgrown (trained again since: ``mim_agg.report.evaluated``,
which shows them beside the run's test accuracy).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from tqdm import tqdm

from mim_agg.aggregators import token_request
from mim_agg.backbones.loading import read_run_checkpoint
from mim_agg.backbones.tokens import require_finite
from mim_agg.builders import (
    backbone_layout,
    build_datamodule,
    build_live_source,
    head_grid,
    selected_head,
)
from mim_agg.data.datamodule import TransformedSubset
from mim_agg.data.decode import encoded
from mim_agg.data.imagenet_variants import EvaluationImages
from mim_agg.data.sources import DataError
from mim_agg.errors import UserError
from mim_agg.report.evaluated import CHECKPOINT, CHECKPOINT_KEY, FOLDER
from mim_agg.runs.folder import RECORD
from mim_agg.utils.files import sha256_of, write_json
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import HeadPredictions, write_predictions
from mim_agg.utils.results import write_csv

log = logging.getLogger(__name__)

SUMMARY = (
    "score a finished probe run's heads on another test set (evaluate.run, dataset=imagenet_r)"
)
USES_RUN_FOLDER = False  # results go into the probe run's folder, under evaluate/<set>/
SETTINGS_GROUP = "evaluate"
COLUMNS = ("head", "aggregator", "test/acc1", "test/acc5", "images")


@dataclass
class Settings:  # values and their meaning: conf/evaluate/default.yaml
    run: str = MISSING
    batch_size: int = MISSING


def run(cfg: DictConfig, watch=None) -> dict:
    run_dir = Path(cfg.evaluate.run).expanduser()
    trained = finished_probe_run(run_dir)
    checkpoint = run_dir / CHECKPOINT
    digest = sha256_of(checkpoint)  # before it is read: the report holds results to it
    fix = "evaluate a finished probe run, or train that run again (resume=false)"
    keys = ("state_dict", "head_selection", "diverged_heads")
    state = read_run_checkpoint(checkpoint, fix, keys=keys)
    grid = head_grid(trained)
    if set(state["head_selection"]) != set(grid):
        raise UserError(
            f"{checkpoint} holds heads {sorted(state['head_selection'])}, but the run's "
            f"config.yaml makes {sorted(grid)}; train that run again."
        )
    layout = backbone_layout(trained)
    heads = {
        name: selected_head(trained, state, name, layout, checkpoint)
        for name in grid
        if name not in state["diverged_heads"]
    }
    num_classes = next(iter(heads.values())).classifier.out_features
    test, images = test_images(cfg, trained, run_dir, num_classes)
    check_same_classes(trained, test, num_classes)
    batches = DataLoader(
        images, batch_size=cfg.evaluate.batch_size, num_workers=cfg.dataset.num_workers
    )
    predicted, top5 = score(trained, heads, layout, batches, test)
    summary = {**results(trained, run_dir, test, predicted, top5, grid), CHECKPOINT_KEY: digest}
    write_results(run_dir / FOLDER / test.title, test, summary, predicted, num_classes)
    for name, values in summary["heads"].items():
        log.info("%s on %s: test acc1 %s", name, test.title, values["test/acc1"])
    return summary


def finished_probe_run(run_dir: Path) -> DictConfig:
    """The run's config, if it is a probe run that finished (its results and checkpoint)."""
    record = run_dir / RECORD
    status = json.loads(record.read_text()).get("status") if record.is_file() else None
    needed = [run_dir / f for f in ("config.yaml", "metrics.json", CHECKPOINT)]
    if status != "done" or not all(path.is_file() for path in needed):
        raise UserError(
            f"evaluate.run={str(run_dir)!r} is no finished run (its {RECORD} says status "
            f"{status!r}; it needs config.yaml, metrics.json and {CHECKPOINT}); "
            "finish that probe run first (the same command continues it)."
        )
    trained = OmegaConf.load(run_dir / "config.yaml")
    if trained.task != "probe":
        raise UserError(f"evaluate.run={str(run_dir)!r} is a task={trained.task} run, no probe.")
    return trained


def test_images(cfg: DictConfig, trained: DictConfig, run_dir: Path, num_classes: int):
    """The set (``EvaluationImages``) and its images with the run's eval transform (its
    backbone's size and normalisation, and this dataset's ``decode``)."""
    evaluation = trained.copy()
    with open_dict(evaluation):
        evaluation.dataset = cfg.dataset
    datamodule = build_datamodule(evaluation)
    test = datamodule.source.load(num_classes, datamodule.seed)[1]
    if not isinstance(test, EvaluationImages):
        raise UserError(
            f"dataset={cfg.dataset.name} is no evaluation set; task=evaluate scores "
            "imagenet_v2, imagenet_sketch, imagenet_r, imagenet_a or imagenet_real."
        )
    log.info("%s: %d images, probe run %s", test.title, len(test), run_dir)
    decoded = encoded(test, datamodule.decode, test.title)
    return test, TransformedSubset(decoded, np.arange(len(test)), datamodule.eval_transform)


def check_same_classes(trained: DictConfig, test: EvaluationImages, num_classes: int) -> None:
    """The probe's classes are the set's ``class_names`` (``dataset.wnids``, default
    ImageNet-1k's): as many, and, where the run trained on class folders still on disk
    (``root/train/<wnid>``), the same names in the same order; mixed-up labels would score
    every head wrongly without a sign."""
    root = trained.dataset.get("root")
    train = Path(root).expanduser() / "train" if root else None
    if train is not None and train.is_dir() and trained.dataset.get("split_file") is None:
        folders = sorted(p.name for p in train.iterdir() if p.is_dir())
        if folders != test.class_names:
            raise DataError(
                f"The probe was trained on the {len(folders)} class folders of {train}, which "
                f"are not the {len(test.class_names)} of dataset.wnids (default: ImageNet-1k's); "
                "set dataset.wnids to a file listing those folders' names, in order."
            )
    if len(test.class_names) != num_classes:
        raise DataError(
            f"The probe predicts {num_classes} classes, dataset.wnids lists "
            f"{len(test.class_names)}; list the probe's training classes, in label order."
        )


def score(trained, heads: dict, layout, batches: DataLoader, test: EvaluationImages):
    """Every head's prediction per image, the argmax over the classes the set scores
    (``test.scored_classes``: ImageNet-R/-A's 200), and whether its top 5 of them hold the
    label."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    request = token_request(head.aggregator for head in heads.values())
    source = build_live_source(trained, {layout.depth - 1: request}).to(device).eval()
    heads = {name: head.to(device) for name, head in heads.items()}
    scored = test.scored_classes
    columns = None if scored is None else torch.as_tensor(scored, device=device)
    predicted, top5 = {n: [] for n in heads}, {n: [] for n in heads}
    with torch.inference_mode():
        for inputs, targets in tqdm(batches, desc=test.title, unit="batch"):
            tokens = source(inputs.to(device))
            require_finite("The tokens the probe reads", tokens.tensors())
            for name, head in heads.items():
                logits = head(tokens).float()
                if columns is not None:  # restricted to the set's classes, mapped back
                    logits = logits[:, columns]
                ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
                if columns is not None:
                    ranked = columns[ranked]
                ranked = ranked.cpu()
                predicted[name].append(ranked[:, 0])
                top5[name].append((ranked == targets[:, None]).any(dim=1))
    return (
        {n: torch.cat(p).numpy() for n, p in predicted.items()},
        {n: torch.cat(p).numpy() for n, p in top5.items()},
    )


def results(trained, run_dir: Path, test: EvaluationImages, predicted, top5, grid) -> dict:
    """Per head: top-1 (on ReaL: the prediction in the image's label set) and top-5 (none
    on ReaL); the winner is the run's own, chosen on its held-out split."""
    labels = np.asarray(test.targets)
    heads = {}
    for name, spec in grid.items():
        aggregator = spec.options["name"]
        if name not in predicted:  # diverged in training: no number, as in the run
            heads[name] = {"aggregator": aggregator, "test/acc1": None, "test/acc5": None}
            continue
        if test.label_sets is None:
            right = predicted[name] == labels
            acc5 = float(np.mean(top5[name]))
        else:
            right = np.array(
                [int(p) in s for p, s in zip(predicted[name], test.label_sets, strict=True)]
            )
            acc5 = None
        heads[name] = {
            "aggregator": aggregator,
            "test/acc1": float(np.mean(right)),
            "test/acc5": acc5,
        }
    winner = json.loads((run_dir / "metrics.json").read_text())["winner"]
    return {
        "dataset": test.title,
        "run": str(run_dir),
        "images": len(labels),
        "scored_classes": len(test.scored_classes or test.class_names),
        "winner": winner,
        **heads[winner],
        "heads": heads,
    }


def write_results(folder: Path, test, summary: dict, predicted, num_classes: int) -> None:
    """``metrics.json``, ``heads.csv`` and the predictions (on ReaL with the label sets),
    each whole."""
    folder.mkdir(parents=True, exist_ok=True)
    predictions = HeadPredictions.in_image_order(
        np.arange(len(test)), np.asarray(test.targets), predicted, num_classes, test.label_sets
    )
    write_predictions(folder / PREDICTIONS, predictions)
    rows = [
        {"head": name, "images": summary["images"], **values}
        for name, values in summary["heads"].items()
    ]
    write_csv(folder / "heads.csv", rows, COLUMNS)
    write_json(folder / "metrics.json", summary)
