"""The ``knn`` task: weighted k-NN on the aggregated features of frozen tokens (DINO's protocol).

Every aggregator (``aggregator`` plus ``heads``, parameter-free, or the aggregator of a
trained probe's winning head via ``knn.probe_ckpt``) is evaluated from one pass over the token
cache: features are L2-normalised; a query's ``k`` most cosine-similar training images vote
with weight ``exp(sim / T)``. ``k`` and ``T`` are chosen per aggregator on the held-out split
(taken from train, as for probes) and the test split is scored once with the chosen pair.
Training images are the bank and never all in memory: they stream through in chunks, merged
into a running top-k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING, DictConfig

from mim_agg.builders import build_datamodule
from mim_agg.cache.features import evaluation_config, frozen_aggregators, pooled_features
from mim_agg.errors import ConfigError
from mim_agg.knn import NearestNeighbours, weighted_vote
from mim_agg.knn.vote import accuracy
from mim_agg.utils.files import write_atomic, write_json
from mim_agg.utils.predictions import FILE as PREDICTIONS
from mim_agg.utils.predictions import HeadPredictions, write_predictions
from mim_agg.utils.results import show_selection, write_csv

SUMMARY = "weighted k-NN of every aggregator's features (knn.k, knn.temperatures, knn.probe_ckpt)"
USES_RUN_FOLDER = True
IGNORED = ("dataset.augment", "cache.views", "trainer.max_epochs")  # fixed, or unused, by k-NN
QUERY_SPLITS = ("heldout", "test")
SETTINGS_GROUP = "knn"


@dataclass
class Settings:  # values and their meaning: conf/knn/default.yaml
    k: list[int] = MISSING
    temperatures: list[float] = MISSING
    batch_size: int = MISSING
    probe_ckpt: str | None = MISSING


COLUMNS = ("head", "aggregator", "k", "temperature", "val/acc1_best", "test/acc1", "test/acc5")


def reads(cfg: DictConfig) -> tuple[str, ...]:
    """The config groups k-NN's results depend on (its run's identity)."""
    return ("task", "seed", "heads", "backbone", "aggregator", "dataset", "cache", "knn", "trainer")


def run(cfg: DictConfig, watch=None) -> dict:
    cfg = evaluation_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    aggregators = frozen_aggregators(cfg, SETTINGS_GROUP, "k-NN")
    check_grid(cfg, datamodule, len(aggregators))
    pooled = pooled_features(cfg, datamodule, aggregators, group=SETTINGS_GROUP, watch=watch)
    if pooled is None:  # trainer=ddp: this rank extracted its part; rank zero evaluates
        return {}
    if datamodule.low_shot:
        write_atomic(output_dir / "subset.txt", datamodule.subset_listing())
    features = {s: pooled.whole(s, "k-NN") for s in QUERY_SPLITS}
    k = max(cfg.knn.k)
    found = {
        s: {n: NearestNeighbours(features[s][0][n], k) for n in aggregators} for s in QUERY_SPLITS
    }
    for bank, labels in pooled.stream("train", "k-NN"):
        for split in QUERY_SPLITS:
            for name, neighbours in found[split].items():
                neighbours.add(bank[name], labels)
    heldout, heldout_labels = features["heldout"]
    for name, neighbours in found["test"].items():  # the test bank: all training images
        neighbours.add(heldout[name], heldout_labels)
    evaluated = {
        name: evaluate(
            cfg,
            found["heldout"][name],
            found["test"][name],
            [features[s][1] for s in QUERY_SPLITS],
            datamodule.num_classes,
        )
        for name in aggregators
    }
    results = {name: result for name, (result, _) in evaluated.items()}
    winner = max(results, key=lambda n: results[n]["val/acc1_best"] or 0.0)
    summary = {"winner": winner, **results[winner], "heads": results}
    show(summary)
    rows = [{"head": n, "aggregator": aggregators[n].name, **r} for n, r in results.items()]
    test_labels = features["test"][1].cpu().numpy()
    predictions = HeadPredictions.in_image_order(
        np.arange(len(test_labels)),  # the cached test split, read in order
        test_labels,
        {name: predicted.cpu().numpy() for name, (_, predicted) in evaluated.items()},
        datamodule.num_classes,
    )
    write_predictions(output_dir / PREDICTIONS, predictions)
    write_csv(output_dir / "heads.csv", rows, COLUMNS)
    write_json(output_dir / "metrics.json", summary)
    return summary


def check_grid(cfg: DictConfig, datamodule, num_aggregators: int) -> None:
    """Before any work: k fits the training images, and a choice among aggregators and
    (k, T) has held-out data (the winner is chosen there, never on test)."""
    bank_size = len(datamodule.splits["train"])
    if max(cfg.knn.k) > bank_size:
        raise ConfigError(
            f"knn.k={list(cfg.knn.k)} asks for more neighbours than the {bank_size} training "
            f"images; use k <= {bank_size}."
        )
    choices = num_aggregators * len(cfg.knn.k) * len(cfg.knn.temperatures)
    if not datamodule.has_heldout and choices > 1:
        raise ConfigError(
            f"Choosing among {num_aggregators} aggregator(s) x knn.k={list(cfg.knn.k)} x "
            f"knn.temperatures={list(cfg.knn.temperatures)} needs held-out data; set "
            "dataset.heldout_fraction > 0 or evaluate one aggregator with one k and one "
            "temperature."
        )


def finished(output_dir: Path) -> dict:
    summary = json.loads((Path(output_dir) / "metrics.json").read_text())
    show(summary)
    return summary


def evaluate(cfg, heldout: NearestNeighbours, test: NearestNeighbours, targets, classes):
    """Held-out accuracy of every (k, T); the best pair scores the test split once, its
    neighbours found among all training images (held-out ones included, as in DINO).
    Returns the results and each test image's predicted class."""
    grid = [(k, t) for k in cfg.knn.k for t in cfg.knn.temperatures]
    scores = {}
    if len(targets[0]):
        for k, t in grid:
            votes = weighted_vote(heldout.sims, heldout.labels, classes, k, t)
            scores[(k, t)] = accuracy(votes, targets[0])
    k, t = max(scores, key=scores.get) if scores else grid[0]
    votes = weighted_vote(test.sims, test.labels, classes, k, t)
    return {
        "k": k,
        "temperature": t,
        "val/acc1_best": scores.get((k, t)),
        "test/acc1": accuracy(votes, targets[1]),
        "test/acc5": accuracy(votes, targets[1], top=5),
        "heldout": {f"k={kk},T={tt}": acc for (kk, tt), acc in scores.items()},
    }, votes.topk(1, dim=1).indices[:, 0]  # the class accuracy() counts as the top-1 guess


def show(summary: dict) -> None:
    settings = {"k": lambda r: str(r["k"]), "T": lambda r: f"{r['temperature']:g}"}
    show_selection(summary, "k-NN", "k and T", settings)
