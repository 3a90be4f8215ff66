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
which shows them beside the run's test accuracy), and the dataset config it scored (paths,
decoder, class list, image count): results of another are replaced only with ``resume=false``.
The set's labels index ``dataset.wnids`` (default ImageNet-1k's), which must be the probe's
classes in order as the run recorded them (its ``classes.json``), else nothing is scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from mim_agg.data.device_decode import collate, finish_images
from mim_agg.data.imagenet_variants import EvaluationImages
from mim_agg.data.sources import DataError, source_options
from mim_agg.errors import UserError
from mim_agg.report.evaluated import CHECKPOINT, CHECKPOINT_KEY, FOLDER
from mim_agg.runs.folder import RECORD
from mim_agg.tasks.probe import CLASSES
from mim_agg.utils.files import read_json, sha256_of, write_json
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import HeadPredictions, write_predictions
from mim_agg.utils.results import write_csv

log = logging.getLogger(__name__)

SUMMARY = (
    "score a finished probe run's heads on another test set (evaluate.run, dataset=imagenet_r)"
)
USES_RUN_FOLDER = False  # results go into the probe run's folder, under evaluate/<set>/
SETTINGS_GROUP = "evaluate"
DATASET_KEY = "dataset_config"  # in metrics.json: what was scored (scored_dataset)
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
    check_same_classes(run_dir, trained, test, num_classes, cfg.dataset.get("wnids"))
    folder, scored_set = run_dir / FOLDER / test.title, scored_dataset(cfg, test)
    check_replaceable(folder, scored_set, cfg.resume)
    batches = DataLoader(
        images,
        batch_size=cfg.evaluate.batch_size,
        num_workers=cfg.dataset.num_workers,
        collate_fn=collate,
    )
    predicted, top5 = score(trained, heads, layout, batches, test)
    summary = {
        **results(trained, run_dir, test, predicted, top5, grid),
        CHECKPOINT_KEY: digest,
        DATASET_KEY: scored_set,
    }
    write_results(folder, test, summary, predicted, num_classes)
    for name, values in summary["heads"].items():
        log.info("%s on %s: test acc1 %s", name, test.title, values["test/acc1"])
    return summary


def finished_probe_run(run_dir: Path) -> DictConfig:
    """The run's config, if it is a probe run (asked first: another task's run is named as
    such, finished or not) that finished (its results and checkpoint)."""
    if not run_dir.is_dir():
        raise UserError(f"evaluate.run={str(run_dir)!r} does not exist; give a probe run's folder.")
    if (run_dir / "multirun.yaml").is_file():
        runs = ", ".join(sorted(p.name for p in run_dir.iterdir() if p.is_symlink())[:3])
        raise UserError(
            f"evaluate.run={str(run_dir)!r} is a sweep folder; evaluate.run takes one of its "
            f"runs ({runs or 'none linked yet'}{', ...' if runs else ''}): score each run alone."
        )
    config = run_dir / "config.yaml"
    trained = OmegaConf.load(config) if config.is_file() else None
    if trained is not None and trained.get("task") != "probe":
        raise UserError(
            f"evaluate.run={str(run_dir)!r} is a task={trained.get('task')} run; task=evaluate "
            "scores the heads of a probe run (task=probe)."
        )
    record = run_dir / RECORD
    status = json.loads(record.read_text()).get("status") if record.is_file() else None
    needed = [config, run_dir / "metrics.json", run_dir / CHECKPOINT]
    if status != "done" or not all(path.is_file() for path in needed):
        raise UserError(
            f"evaluate.run={str(run_dir)!r} is no finished run (its {RECORD} says status "
            f"{status!r}; it needs config.yaml, metrics.json and {CHECKPOINT}); "
            "finish that probe run first (the same command continues it)."
        )
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


def check_same_classes(
    run_dir: Path, trained: DictConfig, test: EvaluationImages, num_classes: int, wnids
) -> None:
    """The probe's classes are the set's ``class_names`` (``dataset.wnids``, default
    ImageNet-1k's): the same names in the same order, as the run recorded them
    (``classes.json``); mixed-up labels would score every head wrongly without a sign. A run
    whose labels have no names (``dataset.split_file``) is taken at ``dataset.wnids``' word,
    which must then be given."""
    names = trained_classes(run_dir, trained)
    if names is None and wnids is None:
        raise UserError(
            f"The probe run {run_dir} trained on labels without class names (the integers of "
            "a dataset.split_file): set dataset.wnids to a file listing the wnid of each of its "
            "labels, in label order."
        )
    if names is not None and names != test.class_names:
        pairs = enumerate(zip(names, test.class_names, strict=False))
        wrong = [i for i, (ours, theirs) in pairs if ours != theirs]
        shown = ", ".join(f"{i}: {names[i]} vs {test.class_names[i]}" for i in wrong[:3])
        raise UserError(
            f"The probe run {run_dir} predicts {len(names)} classes ({CLASSES}), dataset.wnids "
            f"{wnids or '(default: ImageNet-1k)'} lists {len(test.class_names)}, not the same in "
            f"the same order ({shown or 'label: run vs wnids'}); set dataset.wnids to a file "
            f"listing the names in {run_dir / CLASSES}, one per line, in order."
        )
    if len(test.class_names) != num_classes:
        raise DataError(
            f"The probe predicts {num_classes} classes, dataset.wnids lists "
            f"{len(test.class_names)}; list the probe's training classes, in label order."
        )


def trained_classes(run_dir: Path, trained: DictConfig) -> list[str] | None:
    """The names of the run's labels 0..N-1 as it recorded them (None: bare integer labels);
    for a run older than that record, its training class folders if they are still on disk."""
    record = read_json(run_dir / CLASSES)
    if record is not None:
        names = record.get("classes", ()) if isinstance(record, dict) else ()
        if names is not None and not (
            isinstance(names, list) and names and all(isinstance(n, str) for n in names)
        ):
            raise UserError(
                f'{run_dir / CLASSES} holds no class names ({{"classes": [names] or null}}); '
                "train that run again (resume=false)."
            )
        return names
    if trained.dataset.get("split_file") is not None:
        return None
    root = trained.dataset.get("root")
    train = Path(root).expanduser() / "train" if root else None
    if train is None or not train.is_dir():
        raise UserError(
            f"The probe run {run_dir} records no class names ({CLASSES}, written by runs since "
            f"it was added) and the folders it trained on ({train}) are gone: nothing says "
            f"which class each label is. Restore {train}, or train that run again (resume=false)."
        )
    return sorted(p.name for p in train.iterdir() if p.is_dir())


def scored_dataset(cfg: DictConfig, test: EvaluationImages) -> dict:
    """What decides the numbers of a set's results: the source's options (``root``,
    ``wnids``, ``variant``, ...; paths absolute), ``decode``, the SHA-256 of the class list
    the labels index and the image count."""
    options = {key: cfg.dataset.get(key) for key in source_options(cfg.dataset.name)}
    for key in ("root", "wnids"):
        if options.get(key) is not None:
            options[key] = os.path.abspath(Path(options[key]).expanduser())
    classes = hashlib.sha256("\n".join(test.class_names).encode()).hexdigest()
    return {**options, "decode": cfg.dataset.decode, "classes_sha256": classes, "images": len(test)}


def check_replaceable(folder: Path, scored_set: dict, resume: bool) -> None:
    """Results of another dataset config (another copy, decoder or class list) are not
    replaced silently: ``resume=false`` says to score again and replace them."""
    previous = read_json(folder / "metrics.json")
    if previous is None or not resume:
        return
    recorded = previous.get(DATASET_KEY) if isinstance(previous, dict) else None
    if recorded != scored_set:
        keys = sorted(k for k in scored_set if (recorded or {}).get(k) != scored_set[k])
        what = f"differing: {', '.join(keys)}" if recorded else "no dataset config recorded"
        raise UserError(
            f"{folder} holds results of another dataset config ({what}); pass resume=false to "
            "score this one and replace them, or move that folder away."
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
            tokens = source(finish_images(inputs, device))
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
