"""CONTRIBUTING.md's recipes, followed for real: a new aggregator and a new dataset source are
written as files of a package of their own (as a lab keeps them), loaded through
``$MIM_AGG_PLUGINS``, composed by name, and trained together by the probe task."""

from __future__ import annotations

import copy
import csv
import textwrap

import pytest
from hydra.core.config_store import ConfigStore

from mim_agg.aggregators import AGGREGATORS
from mim_agg.cli import import_plugins
from mim_agg.config import register_configs
from mim_agg.data import SOURCES
from mim_agg.runs.runner import run_task
from tests.helpers import FAST, PROJECT_ROOT, compose_config

CONTRIBUTING = (PROJECT_ROOT / "CONTRIBUTING.md").read_text()

# The aggregator recipe: one module, a registered Aggregator whose keyword-only arguments are
# its options.
AGGREGATOR_MODULE = '''
    """A learned scalar gate on the patch mean: the smallest learned aggregator."""

    import torch
    from torch import nn

    from mim_agg.aggregators import Aggregator, register


    @register("gated_mean")
    class GatedMean(Aggregator):
        """``sigmoid(g) * mean(patches)``; ``init`` is the gate's starting logit."""

        def __init__(self, layout, *, init: float = 0.0) -> None:
            super().__init__(layout)
            self.gate = nn.Parameter(torch.tensor(init))

        def forward(self, tokens):
            return torch.sigmoid(self.gate) * tokens.patches.mean(dim=1)
'''

# The dataset recipe: one module with a registered builder, and its YAML.
SOURCE_MODULE = '''
    """Vertical stripes, a grey level per class: a source with one option."""

    import numpy as np

    from mim_agg.data.sources import ArrayImages, source


    @source("stripes")
    def stripes(num_classes, seed, *, width: int = 2):
        """A grey level per class, dark stripes every ``width`` pixels; 48 train and 16 test images
        per class, drawn from ``seed``."""
        rng = np.random.default_rng(seed)

        def split(per_class):
            labels = np.repeat(np.arange(num_classes), per_class)
            images = rng.integers(0, 40, size=(len(labels), 16, 16, 3), dtype=np.uint8)
            images += (labels * 60).astype(np.uint8)[:, None, None, None]  # a grey per class
            images[:, :, ::width] //= 2  # dark stripes
            return ArrayImages(images, labels)

        return split(48), split(16)
'''
SOURCE_YAML = """\
# Stripes: a grey level per class (tests/test_contributing.py).
defaults:
  - /schema/dataset/stripes@_here_
  - _self_

num_classes: 3
heldout_fraction: 0.25
num_workers: 0
"""


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """``my_lab/`` with the two modules and ``conf/dataset/stripes.yaml``, importable and named
    in ``$MIM_AGG_PLUGINS``; every registry is restored afterwards."""
    package = tmp_path / "lab" / "my_lab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "poolers.py").write_text(textwrap.dedent(AGGREGATOR_MODULE))
    (package / "datasets.py").write_text(textwrap.dedent(SOURCE_MODULE))
    conf = tmp_path / "lab" / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "stripes.yaml").write_text(SOURCE_YAML)
    monkeypatch.syspath_prepend(str(tmp_path / "lab"))
    monkeypatch.setenv("MIM_AGG_PLUGINS", "my_lab.poolers, my_lab.datasets")
    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", copy.deepcopy(store.repo))
    before = (dict(AGGREGATORS), dict(SOURCES))
    yield conf
    for registry, saved in zip((AGGREGATORS, SOURCES), before, strict=True):
        registry.clear()
        registry.update(saved)


def test_the_recipes_name_their_files():
    for recipe in ("aggregator", "checkpoint format", "dataset source", "task"):
        assert f"## A new {recipe}" in CONTRIBUTING, recipe
    for path in (
        "mim_agg/aggregators/",
        "mim_agg/backbones/formats/",
        "mim_agg/data/",
        "conf/dataset/",
        "mim_agg/tasks/",
        "conf/config.yaml",
        "MIM_AGG_PLUGINS",
    ):
        assert path in CONTRIBUTING, path


@pytest.mark.slow  # trains for real
def test_a_plugin_aggregator_and_dataset_source_compose_and_train_together(
    plugin_package, tmp_path
):
    import_plugins()  # what run.py does first
    register_configs()
    assert "gated_mean" in AGGREGATORS and "stripes" in SOURCES
    search = f"hydra.searchpath=[file://{plugin_package}]"
    overrides = [*FAST, search, "dataset=stripes", "dataset.width=4", "aggregator=gated_mean"]
    cfg = compose_config([*overrides, "+aggregator@heads.mean=mean", "probe.epochs=3"], tmp_path)
    assert cfg.aggregator.init == 0.0 and cfg.dataset.width == 4
    summary = run_task(cfg)
    with open(tmp_path / "run" / "heads.csv") as handle:
        rows = {row["head"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"gated_mean", "mean"}
    assert int(rows["gated_mean"]["trainable_params"]) == int(rows["mean"]["trainable_params"]) + 1
    assert summary["test/acc1"] > 0.5  # three classes a grey level apart: far above chance
