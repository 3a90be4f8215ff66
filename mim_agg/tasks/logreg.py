"""The ``logreg`` task: multinomial logistic regression on the aggregated features of frozen
tokens (DINOv2's and DINOv3's protocol).

Every aggregator (``aggregator`` plus ``heads``, parameter-free, or the aggregator of a
trained probe's winning head via ``logreg.probe_ckpt``) is evaluated from one pass over the
token cache. Per aggregator, a model is fitted on the training images for every ``C`` of a
log-spaced grid (theirs: 45 values from 1e-6 to 1e5) and scored on the held-out split (taken
from train, as for probes); the best ``C`` (the smallest among ties, as their tracker keeps
the first best) is fitted again on train plus held-out, and the test split is scored once.
The fit is ``mim_agg/logreg``'s L-BFGS, scikit-learn's objective, on the GPU when there is one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING, DictConfig

from mim_agg.backbones.tokens import require_finite
from mim_agg.builders import build_datamodule
from mim_agg.cache.features import evaluation_config, frozen_aggregators, pooled_features
from mim_agg.errors import ConfigError
from mim_agg.knn.vote import accuracy
from mim_agg.logreg import c_grid, fit_logistic_regression
from mim_agg.utils.files import write_atomic, write_json
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import HeadPredictions, write_predictions
from mim_agg.utils.results import show_selection, write_csv

log = logging.getLogger(__name__)

SUMMARY = "logistic regression of every aggregator's features, C chosen on held-out (logreg.*)"
USES_RUN_FOLDER = True
IGNORED = ("dataset.augment", "cache.views", "trainer.max_epochs", "logreg.batch_size")
SPLITS = ("train", "heldout", "test")
SETTINGS_GROUP = "logreg"
DTYPES = {"float64": torch.float64, "float32": torch.float32}  # logreg.dtype (validation.py)


@dataclass
class Settings:  # values and their meaning: conf/logreg/default.yaml
    c_min: float = MISSING
    c_max: float = MISSING
    c_steps: int = MISSING
    max_iter: int = MISSING
    tol: float = MISSING
    dtype: str = MISSING
    batch_size: int = MISSING
    probe_ckpt: str | None = MISSING


COLUMNS = ("head", "aggregator", "C", "iterations", "val/acc1_best", "test/acc1", "test/acc5")


def reads(cfg: DictConfig) -> tuple[str, ...]:
    """The config groups logistic regression's results depend on (its run's identity)."""
    groups = ("task", "seed", "heads", "backbone", "aggregator", "dataset", "cache", "trainer")
    return (*groups, "logreg")


def run(cfg: DictConfig, watch=None) -> dict:
    cfg = evaluation_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    aggregators = frozen_aggregators(cfg, SETTINGS_GROUP, "logistic regression")
    check_grid(cfg, datamodule, len(aggregators))
    pooled = pooled_features(cfg, datamodule, aggregators, group=SETTINGS_GROUP, watch=watch)
    if pooled is None:  # trainer=ddp: this rank extracted its part; rank zero evaluates
        return {}
    if datamodule.low_shot:
        write_atomic(output_dir / "subset.txt", datamodule.subset_listing())
    splits = {s: pooled.whole(s, "logreg") for s in SPLITS}
    labels = {s: splits[s][1] for s in SPLITS}
    results, predicted = {}, {}
    for name in aggregators:
        features = {s: splits[s][0][name] for s in SPLITS}
        results[name], predicted[name] = evaluate(
            cfg, name, features, labels, datamodule.num_classes, watch
        )
    winner = max(results, key=lambda n: results[n]["val/acc1_best"] or 0.0)
    summary = {"winner": winner, **results[winner], "heads": results}
    show(summary)
    rows = [{"head": n, "aggregator": aggregators[n].name, **r} for n, r in results.items()]
    test_labels = labels["test"].cpu().numpy()
    predictions = HeadPredictions.in_image_order(
        np.arange(len(test_labels)),  # the cached test split, read in order
        test_labels,
        {name: classes.cpu().numpy() for name, classes in predicted.items()},
        datamodule.num_classes,
    )
    write_predictions(output_dir / PREDICTIONS, predictions)
    write_csv(output_dir / "heads.csv", rows, COLUMNS)
    write_json(output_dir / "metrics.json", summary)
    return summary


def check_grid(cfg: DictConfig, datamodule, num_aggregators: int) -> None:
    """Before any work: a choice among aggregators and C values has held-out data (the
    winner is chosen there, never on test)."""
    choices = num_aggregators * cfg.logreg.c_steps
    if not datamodule.has_heldout and choices > 1:
        raise ConfigError(
            f"Choosing among {num_aggregators} aggregator(s) x logreg.c_steps="
            f"{cfg.logreg.c_steps} values of C needs held-out data; set "
            "dataset.heldout_fraction > 0 or evaluate one aggregator with logreg.c_steps=1 "
            "(C = logreg.c_min)."
        )


def evaluate(cfg, name: str, features: dict, labels: dict, classes: int, watch=None):
    """Held-out accuracy of a fit on train for every C; the best C is fitted again on train
    plus held-out, which scores the test split once. Returns the results and each test
    image's predicted class."""
    settings = cfg.logreg

    dtype = DTYPES[settings.dtype]

    def fit(x, y, C):
        if watch is not None:
            watch.check()
        model = fit_logistic_regression(
            x, y, classes, C, max_iter=settings.max_iter, tol=settings.tol, dtype=dtype
        )
        require_finite(
            f"The logistic regression weights of head {name!r} (C={C:g})",
            [model.weight, model.bias],
            "logreg.dtype (float64 is the protocol's) and the features' scale",
        )
        if model.iterations == 0:  # zero weights: every image gets one class, a chance score
            raise ConfigError(
                f"logreg.tol={settings.tol:g} ended the fit of head {name!r} (C={C:g}) before "
                "its first step: the gradient at zero weights is already within it. Use a "
                "smaller logreg.tol (the protocol's: 1e-12)."
            )
        return model

    grid = c_grid(settings.c_min, settings.c_max, settings.c_steps)
    scores = {}
    if len(labels["heldout"]):
        for C in grid:
            model = fit(features["train"], labels["train"], C)
            scores[C] = accuracy(model.logits(features["heldout"]), labels["heldout"])
            log.info("%s: C=%.4g, held-out acc1 %.4f", name, C, scores[C])
    C = max(scores, key=scores.get) if scores else grid[0]  # the first best: the smallest C
    model = fit(
        torch.cat([features["train"], features["heldout"]]),
        torch.cat([labels["train"], labels["heldout"]]),
        C,
    )
    logits = model.logits(features["test"])
    return {
        "C": C,
        "iterations": model.iterations,
        "val/acc1_best": scores.get(C),
        "test/acc1": accuracy(logits, labels["test"]),
        "test/acc5": accuracy(logits, labels["test"], top=5),
        "heldout": {f"C={c:.4g}": acc for c, acc in scores.items()},
    }, logits.argmax(1)


def finished(output_dir: Path) -> dict:
    summary = json.loads((Path(output_dir) / "metrics.json").read_text())
    show(summary)
    return summary


def show(summary: dict) -> None:
    settings = {"C": lambda r: f"{r['C']:.4g}"}
    outcomes = {"iterations": lambda r: str(r["iterations"])}
    show_selection(summary, "logistic regression", "C", settings, outcomes)
