"""Config schemas: every group is validated at composition, so a misspelled key fails early.

Each YAML in ``conf/<group>/`` lists ``/schema/<group>@_here_`` first in its defaults;
schemas live outside the groups, so they are no options. Every default lives in one place:
the backbone and dataset schemas are derived from ``FrozenBackbone``'s and
``ProbeDataModule``'s signatures (their YAMLs say only what differs), each aggregator's
schema, from its keyword-only options, is itself its option of the ``aggregator`` group (no
YAML: ``register_aggregators``), and the groups whose values live in their YAML
files (probe, analysis, report, cache, knn, W&B) declare types only (``MISSING``).
"""

from __future__ import annotations

import inspect
import os
import textwrap
import typing
from dataclasses import Field, dataclass, field, make_dataclass
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import II, MISSING, DictConfig, OmegaConf

from mim_agg.aggregators import AGGREGATORS, options_schema
from mim_agg.backbones import FrozenBackbone
from mim_agg.data import SOURCES, ProbeDataModule
from mim_agg.runs.identity import run_name
from mim_agg.tasks import TASKS
from mim_agg.utils.files import under_root


@dataclass
class ProbeConfig:  # each recipe's values: conf/probe/*.yaml; below, what they all share
    optimizer: str = MISSING
    blr: float = MISSING
    blrs: list[float] | None = MISSING
    weight_decay: float = MISSING
    wds: list[float] | None = MISSING
    momentum: float = MISSING
    epochs: int = MISSING
    warmup_epochs: float = MISSING
    batch_size: int = MISSING  # per device
    effective_batch: int | None = None  # per optimizer step; null: batch_size x devices
    checkpoint_every_n_steps: int = 500  # besides every epoch; 0: epochs only
    features: str = "online"  # online: a live backbone per batch | cached: from the token cache
    test_each_epoch: bool = False  # also score test after each epoch: best-epoch figure, labelled


@dataclass
class CacheConfig:  # values and their meaning: conf/cache/default.yaml
    dtype: str = MISSING
    views: int = MISSING
    shard_size: int = MISSING
    batch_size: int = MISSING
    verify: Any = MISSING  # true | false | full (OmegaConf has no bool-or-str type)
    blocks: list[int] | None = MISSING
    also_for: dict[str, Any] = MISSING
    part: str | None = MISSING


@dataclass
class CsvLoggerConfig:  # values and their meaning: conf/logger/csv.yaml
    _target_: str = MISSING
    save_dir: str = MISSING
    name: str = MISSING


@dataclass
class WandbConfig:  # values and their meaning: conf/logger/wandb.yaml
    _target_: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    mode: str = MISSING
    save_dir: str = MISSING
    job_type: str = MISSING


@dataclass
class LoggerConfig:  # the loggers a run writes to, each a _target_ config (null: not used)
    csv: CsvLoggerConfig | None = None
    wandb: WandbConfig | None = None


def signature_schema(name: str, function, skip: tuple[str, ...] = (), **overrides) -> type:
    """A dataclass of ``function``'s parameters, their types and defaults: a config group whose
    keys and defaults are the code's. ``overrides`` replace a default where config means
    otherwise on purpose (``MISSING``: every YAML must say it; an interpolation; a
    ``dataclasses.field``)."""
    hints = typing.get_type_hints(function)
    fields = []
    for param in inspect.signature(function).parameters.values():
        if param.name == "self" or param.name in skip:
            continue
        default = overrides.get(param.name, param.default)
        if default is inspect.Parameter.empty:
            default = MISSING
        if not isinstance(default, Field):
            default = field(default=default)
        fields.append((param.name, hints[param.name], default))
    return make_dataclass(name, fields)


BackboneConfig = make_dataclass(
    "BackboneConfig",
    # The leaderboard's representation rules (efficient-probing's results.csv), config, never
    # guessed nor tried both ways; read by interpolation (experiment=ep_row), not by the
    # backbone, which never receives them (mim_agg.validation.backbone_arguments):
    # - linear_input: what its LP and k-NN read: cls, or mean (the patch mean) where the model
    #   has no [cls] (I-JEPA, CAPI, AIMv2, Hiera) or only the output of its own learned
    #   pooling (SigLIP, PE), or summary (RADIO's summary tokens, one per teacher,
    #   concatenated: backbone.summary_tokens);
    # - ep_tokens: what EP reads: patch, or all ([cls] beside the patches, their `ep_all`
    #   rows) where the pre-training objective is defined on [cls] (DINO, iBOT, MoCo v3, ...).
    [("linear_input", str, field(default="cls")), ("ep_tokens", str, field(default="patch"))],
    bases=(
        signature_schema(
            "BackboneConfig",
            FrozenBackbone.__init__,
            # mim | jea | hybrid | vlm | generative (the leaderboard's families) | none (random
            # weights): figures and reports group by it, so each config says it
            family=MISSING,
            arch_kwargs=field(default_factory=dict),  # a mapping: +backbone.arch_kwargs.depth=2
        ),
    ),
)
# What every dataset shares: ProbeDataModule's options. Each source's schema (dataset_schema)
# adds its builder's own, flat under `dataset.` (see mim_agg/data/sources.py for why).
# Three seeds, each fixing one thing:
# - `seed` (top level): the run's random state: the heads' initial weights, a backbone's random
#   weights (`backbone.weights=null`); and the default of `dataset.subset_seed`;
# - `dataset.seed`: the data: the held-out split, `train_size` / `test_size` subsets, the
#   training order and augmentations, and what a source draws (digits' train/test split,
#   synthetic images); fixed by default, so the data stays put while `seed` varies;
# - `dataset.subset_seed`: the low-shot subset alone (`shots` / `fraction`); it follows `seed`,
#   so `seed=0,1,2` averages three subsets; fix it to hold one subset.
DatasetConfig = signature_schema(
    "DatasetConfig",
    ProbeDataModule.__init__,
    skip=("img_size", "mean", "std", "batch_size", "source_options"),  # backbone, probe, source
    num_classes=None,  # null: the data's own count (class folders, torchvision)
    subset_seed=II("seed"),
)


def dataset_schema(name: str) -> type:
    """The schema of ``conf/dataset/<name>.yaml``: ``DatasetConfig`` plus source ``name``'s own
    options (its builder's keyword-only arguments), ``name`` defaulting to itself. Named
    ``DatasetConfig`` as well, the name Hydra's refusal of a key gives."""
    own = signature_schema("DatasetConfig", SOURCES[name], skip=("num_classes", "seed"))
    named = [("name", str, field(default=name))]
    return make_dataclass("DatasetConfig", named, bases=(own, DatasetConfig))


def register_datasets(store: ConfigStore) -> None:
    """Every registered source's schema as ``/schema/dataset/<name>``, which its YAML lists
    first; called again after a registration made at runtime to include it."""
    for name in SOURCES:
        store.store(group="schema/dataset", name=name, node=dataset_schema(name))


def auto_precision() -> str:
    """bf16 autocast where a GPU supports it (the paper's recipe), full precision elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="backbone", node=BackboneConfig)
    register_datasets(store)
    store.store(group="schema", name="probe", node=ProbeConfig)
    store.store(group="schema", name="logger", node=LoggerConfig)
    store.store(group="schema", name="cache", node=CacheConfig)
    for task in TASKS.values():
        if task.Settings is not None:  # the schema of the task's own group (analysis, knn, ...)
            store.store(group="schema", name=task.SETTINGS_GROUP, node=task.Settings)
    register_aggregators(store)
    resolvers = {
        "auto_precision": auto_precision,
        "run_dir": _run_dir,
        "config_groups": config_groups,
        "tasks": task_list,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def register_aggregators(store: ConfigStore) -> None:
    """Every registered aggregator as an option of the ``aggregator`` group, its options schema
    the whole config (``aggregator=abmilp``, ``+aggregator@heads.x=abmilp``), and ``heads=all``:
    each of them a head named by itself. Generated, so a new aggregator is its module alone;
    called again after a registration made at runtime (a notebook, a test) to include it."""
    for name in AGGREGATORS:
        store.store(group="aggregator", name=name, node=options_schema(name))
    every = [{f"/aggregator@{name}": name} for name in sorted(AGGREGATORS)]
    store.store(group="heads", name="all", node={"defaults": every})


def config_groups(width: int = 100) -> str:
    """The ``--help`` rows: each config group and its options, as Hydra finds them (files in
    ``conf/``, the registries' generated options, a searchpath's), so no list is kept by hand.
    The config schemas (``schema``) and Hydra's own groups but its launcher are left out, as
    is a group with nothing to choose (``local`` until a user writes one)."""
    sources = GlobalHydra.instance().config_loader().get_sources()
    groups = [
        g for g in group_options(sources, "", ObjectType.GROUP) if g not in ("hydra", "schema")
    ]
    groups = sorted([*groups, "hydra/launcher"])
    indent = max(len(group) for group in groups) + 1
    rows = []
    for group in groups:
        options = group_options(sources, group, ObjectType.CONFIG)
        if options:
            lines = textwrap.wrap(", ".join(options), width - indent, break_on_hyphens=False)
            rows.append(group.ljust(indent) + f"\n{' ' * indent}".join(lines))
    return "\n".join(rows)


def group_options(sources: list, group: str, kind: ObjectType) -> list[str]:
    """What every config source lists under ``group``, as Hydra's config loader answers it, but
    from the sources it already holds: the loader rebuilds them on each question (0.2 s), and
    the ``--help`` text is resolved whenever Hydra merges its config, on every run."""
    found = {n for s in sources if s.is_group(group) for n in s.list(group, results_filter=kind)}
    return sorted(found)


def task_list() -> str:
    """The ``--help`` rows of the tasks: each task module's name and ``SUMMARY``."""
    width = max(len(name) for name in TASKS) + 2
    return "\n".join(f"  {name.ljust(width)}{task.SUMMARY}" for name, task in TASKS.items())


def _run_dir(*, _root_: DictConfig) -> str:
    """``hydra.run.dir`` and ``hydra.sweep.subdir``: ``outputs/runs/<run_name>``, absolute (a
    sweep's jobs live beside single runs, not inside the sweep folder); that of a task without
    a run folder of its own (report, evaluate) is the root, which exists (it writes into
    ``report.out_dir``, the sweep it reads, or the probe run it scores)."""
    if _root_.task == "extract":  # the cache is its output; it picks its own folder by key
        return os.path.abspath(_root_.paths.cache_dir)
    if _root_.task in TASKS and not TASKS[_root_.task].USES_RUN_FOLDER:  # Hydra must make nothing
        return str(under_root(_root_.paths.root_dir, "."))
    if _root_.task not in TASKS:  # no identity to name it by: the runner refuses it by name
        return os.path.abspath(os.path.join(_root_.paths.output_root, "runs", "unknown-task"))
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default={})
    return os.path.abspath(
        os.path.join(_root_.paths.output_root, "runs", run_name(_root_, choices))
    )
