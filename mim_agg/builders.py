"""Objects built from config, in one place for every task: data, aggregators and heads, token
source, probe.

Aggregators (and the heads around them) are built first and once per run, on the backbone's
architecture alone (``skeleton``: no weights, no download), so one that cannot serve this
backbone refuses before anything is fetched; what they read is then merged into one
``TokenRequest`` for the token source (``token_request``), a cache's plan included.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from mim_agg.aggregators import Aggregator, build_aggregator, token_request
from mim_agg.backbones import FrozenBackbone, LiveTokens, TokenLayout, TokenRequest, TokenSource
from mim_agg.backbones.frozen import is_timm_tag, resolve_normalization, skeleton
from mim_agg.backbones.loading import read_run_checkpoint, require_file
from mim_agg.backbones.tokens import require_finite
from mim_agg.data import ProbeDataModule
from mim_agg.errors import ConfigError, UserError
from mim_agg.probe import LinearProbe, ProbeHead
from mim_agg.probe.module import RUN_HASH
from mim_agg.runs.folder import RECORD
from mim_agg.runs.identity import config_hash, result_config
from mim_agg.validation import backbone_arguments, check_representation

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> ProbeDataModule:
    """Images of ``dataset``, normalised for ``backbone``, batched by ``probe.batch_size``."""
    mean, std = resolve_normalization(cfg.backbone.weights, cfg.backbone.mean, cfg.backbone.std)
    return ProbeDataModule.from_config(
        OmegaConf.to_container(cfg.dataset, resolve=True, throw_on_missing=True),
        img_size=cfg.backbone.img_size,
        mean=mean,
        std=std,
        batch_size=cfg.probe.batch_size,
    )


def backbone_layout(cfg: DictConfig) -> TokenLayout:
    """The probed block's token layout, from the architecture alone (nothing downloaded); a
    backbone config whose representation rules read a ``[cls]`` it lacks is refused here."""
    layout = skeleton(**backbone_arguments(cfg.backbone)).layout
    check_representation(cfg.backbone, layout.has_cls)
    return layout


def aggregator_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """``aggregator`` plus the named entries of ``heads``, by config key (``aggregator``'s is
    its name)."""
    aggregators = {cfg.aggregator.name: cfg.aggregator}
    for key, options in cfg.heads.items():
        if key in aggregators and options != aggregators[key]:
            raise ConfigError(
                f"Two different heads are named {key!r}; add one under another name: "
                f"+aggregator@heads.{key}_2={options.name}"
            )
        aggregators[key] = options
    return aggregators


def build_aggregators(cfg: DictConfig, layout: TokenLayout) -> dict[str, Aggregator]:
    """The run's aggregators on ``layout``, by config key, for what they read (a cache's plan)
    or, parameter-free, for k-NN; learned ones draw their weights without moving the random
    state (a probe's heads are ``build_heads``', initialised from ``seed``)."""
    aggregators = {}
    for key, options in aggregator_configs(cfg).items():
        with named_by_config_key(cfg, key), torch.random.fork_rng(devices=[]):
            aggregators[key] = build_aggregator(
                layout=layout, **OmegaConf.to_container(options, resolve=True)
            )
    return aggregators


def cache_companions(cfg: DictConfig) -> list[Aggregator]:
    """The aggregators of ``cache.also_for``, built for what they read alone: a cache keyed for
    them too is the one another job that trains them opens, so two jobs of one sweep (k-NN and
    a probe) share one backbone pass."""
    if not cfg.cache.also_for:
        return []
    companions = cfg.copy()
    with open_dict(companions):
        companions.heads = cfg.cache.also_for
    return list(build_aggregators(companions, backbone_layout(cfg)).values())


@contextlib.contextmanager
def named_by_config_key(cfg: DictConfig, key: str):
    """A refused option names the key the user sets (``heads.center_crop.k``, not the
    aggregator's ``k`` alone)."""
    prefix = "aggregator." if key == cfg.aggregator.name else f"heads.{key}."
    try:
        yield
    except ConfigError as error:
        raise ConfigError(str(error).replace("aggregator.", prefix, 1)) from None


class HeadSpec(NamedTuple):
    """One point of the head grid: what the head pools and how it is optimised."""

    options: dict  # the aggregator's, as build_aggregator takes them
    blr: float  # base learning rate
    wd: float  # weight decay of its weight matrices


def optimizer_grid(cfg: DictConfig) -> tuple[list[float], list[float]]:
    """``probe.blrs`` (or ``probe.blr`` alone) and ``probe.wds`` (or ``probe.weight_decay``
    alone); a choice among several heads needs held-out data to be made on. ``get``: a probe
    run's config from before ``probe.wds`` existed has none."""
    blrs = list(cfg.probe.blrs or [cfg.probe.blr])
    wds = list(cfg.probe.get("wds") or [cfg.probe.weight_decay])
    heads = len(aggregator_configs(cfg)) * len(blrs) * len(wds)
    if heads > 1 and cfg.dataset.heldout_fraction == 0:
        raise ConfigError(
            "Choosing among several heads needs held-out data; set dataset.heldout_fraction > 0."
        )
    return blrs, wds


def head_grid(cfg: DictConfig) -> dict[str, HeadSpec]:
    """Every (aggregator options, base learning rate, weight decay) of the run, by head name.

    The aggregators are those of ``aggregator_configs``; the rates and decays are
    ``optimizer_grid``'s, every pair. A single rate or decay keeps names without it.
    """
    blrs, wds = optimizer_grid(cfg)
    return {
        head_name(key, blr, wd, len(blrs), len(wds)): HeadSpec(
            OmegaConf.to_container(options, resolve=True), blr, wd
        )
        for key, options in aggregator_configs(cfg).items()
        for blr in blrs
        for wd in wds
    }


def head_name(aggregator_key: str, blr: float, wd: float, num_blrs: int, num_wds: int) -> str:
    """``abmilp``; ``abmilp_blr0p1`` in a learning-rate grid, ``abmilp_wd0p0001`` in a
    weight-decay grid, ``abmilp_blr0p1_wd0p0001`` in both (no dots: module names)."""
    name = aggregator_key
    if num_blrs > 1:
        name += f"_blr{blr:g}".replace(".", "p")
    if num_wds > 1:
        name += f"_wd{wd:g}".replace(".", "p")
    return name


def build_head(seed: int, layout: TokenLayout, options: dict, num_classes: int) -> ProbeHead:
    """Initialise from ``seed`` alone, so a head starts the same alone or in any grid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHead(build_aggregator(layout=layout, **options), num_classes)


def build_heads(cfg: DictConfig, layout: TokenLayout, num_classes: int) -> dict[str, ProbeHead]:
    """One head per (aggregator, learning rate, weight decay) of ``head_grid``, by head name:
    the run's aggregators, built once, here (a cache's plan reads the heads' own)."""
    blrs, wds = optimizer_grid(cfg)
    heads = {}
    for key, options in aggregator_configs(cfg).items():
        options = OmegaConf.to_container(options, resolve=True)
        with named_by_config_key(cfg, key):
            for blr in blrs:
                for wd in wds:
                    head = build_head(cfg.seed, layout, options, num_classes)
                    heads[head_name(key, blr, wd, len(blrs), len(wds))] = head
    return heads


def build_backbone(cfg: DictConfig) -> FrozenBackbone:
    """Random weights (``backbone.weights=null``) are drawn from ``seed`` alone: the same
    config gives the same backbone in every task, online or extracting a cache. A checkpoint
    file that is not there yet is named with the command that fetches it."""
    weights = cfg.backbone.weights
    if weights is not None and not is_timm_tag(weights):
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        require_file(weights, choices.get("backbone", "<name>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FrozenBackbone(**backbone_arguments(cfg.backbone))


def build_live_source(cfg: DictConfig, requests: dict[int, TokenRequest]) -> LiveTokens:
    """The frozen backbone (and oracle) kept up to the deepest of ``requests``' blocks
    (``0 .. depth-1``), serving each block its request from one pass; checked on the
    architecture first, so a request it cannot serve fails before the weights are fetched."""
    deepest = cfg_at_block(cfg, max(requests))
    check = skeleton(**backbone_arguments(deepest.backbone))
    for block, request in requests.items():
        check.provide(request, block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # a random oracle, too, is the seed's
        return LiveTokens(build_backbone(deepest), requests)


def cfg_at_block(cfg: DictConfig, block: int) -> DictConfig:
    """This run's config probing block ``block`` instead (random weights stay the seed's)."""
    moved = copy.deepcopy(cfg)
    moved.backbone.block = block
    return moved


def build_probe(
    cfg: DictConfig,
    num_classes: int | None = None,
    source: TokenSource | None = None,
    heads: dict[str, ProbeHead] | None = None,
) -> LinearProbe:
    """One head per grid point (``heads``, when a cache's plan was made from them; else built
    here) over one token source (default: the live backbone serving what they read).
    ``num_classes``: the data's count (default: ``dataset.num_classes``)."""
    num_classes = num_classes or cfg.dataset.num_classes
    layout = source.layout if source else backbone_layout(cfg)
    heads = heads or build_heads(cfg, layout, num_classes)
    grid = head_grid(cfg)
    if source is None:
        request = token_request(head.aggregator for head in heads.values())
        source = build_live_source(cfg, {layout.depth - 1: request})
    return LinearProbe(
        source,
        heads,
        blrs={name: spec.blr for name, spec in grid.items()},
        weight_decays={name: spec.wd for name, spec in grid.items()},
        num_classes=num_classes,
        batch_size=cfg.probe.batch_size,
        optimizer=cfg.probe.optimizer,
        momentum=cfg.probe.momentum,
        warmup_epochs=cfg.probe.warmup_epochs,
        run_hash=config_hash(result_config(cfg)),
    )


def load_probe_head(cfg: DictConfig, checkpoint: str, layout: TokenLayout) -> ProbeHead:
    """The winning head of a finished probe run, with the weights held-out selected for it,
    for k-NN and the analysis, which use its aggregator (its pooling), never its classifier.

    The checkpoint is read with ``weights_only=True`` (a crafted file cannot run code). Checked
    against the probe run's ``config.yaml``: refused where the numbers would be wrong, a head
    trained on other tokens (``same_tokens``) or with non-finite weights; only noted, another
    dataset (``note_other_dataset``), as pooling learnt on one dataset and applied to another
    is a legitimate transfer. The rest of the probe's config (learning rates, epochs, other
    heads, low-shot subset) is how it was trained, not what it reads: not compared.
    """
    checkpoint_path = Path(checkpoint)
    run_dir = checkpoint_path.parent.parent
    if not checkpoint_path.is_file() or not (run_dir / "metrics.json").is_file():
        raise UserError(
            f"The probe checkpoint {str(checkpoint_path)!r} must be a finished probe run's "
            "<run>/checkpoints/last.ckpt, beside that run's config.yaml and metrics.json."
        )
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    same_tokens(run_cfg, cfg, run_dir)
    name = json.loads((run_dir / "metrics.json").read_text())["winner"]
    fix = "pass a finished probe run's last.ckpt, or train that run again (resume=false)"
    state = read_run_checkpoint(checkpoint_path, fix, keys=("state_dict", "head_selection"))
    head = selected_head(run_cfg, state, name, layout, checkpoint_path)
    note_other_dataset(run_cfg, cfg, run_dir, head.classifier.out_features)
    return head


def selected_head(
    run_cfg: DictConfig, state: dict, name: str, layout: TokenLayout, checkpoint_path: Path
) -> ProbeHead:
    """Head ``name`` of a probe run (its ``config.yaml``: ``run_cfg``) with the weights
    held-out selected for it in checkpoint ``state`` (its last ones when nothing was held out,
    as the probe's test does); refused where they were written by another run (a copied
    file), are not finite or do not fit the head the run's config builds (another aggregator or
    backbone width)."""
    written_by, record = state.get(RUN_HASH), checkpoint_path.parent.parent / RECORD
    recorded = json.loads(record.read_text()).get("config_hash") if record.is_file() else None
    if written_by and recorded and written_by != recorded:  # older files record none
        raise UserError(
            f"{str(checkpoint_path)!r} was written by another run (config hash {written_by}; "
            f"{str(record)!r} says {recorded}): it was copied there. Pass the "
            "last.ckpt of the run that wrote it, or train this run again (resume=false)."
        )
    selected = state["head_selection"][name]["state"]
    if selected is None:  # nothing was held out: the last epoch's weights are the selected ones
        prefix = f"heads.{name}."
        weights = state["state_dict"]
        selected = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    where = f"head {name!r} in {str(checkpoint_path)!r}"
    if "classifier.weight" not in selected:
        raise UserError(f"The checkpoint holds no weights of {where}; train that run again.")
    num_classes = selected["classifier.weight"].shape[0]
    head = build_head(run_cfg.seed, layout, head_grid(run_cfg)[name].options, num_classes)
    require_finite(
        f"The weights of {where}",
        selected.values(),
        "that probe run (heads.csv, cli.log) or use another probe run",
    )
    try:
        head.load_state_dict(selected)
    except RuntimeError as error:
        raise UserError(
            f"The weights of {where} do not fit the head its config.yaml builds (backbone or "
            f"aggregator changed?): {str(error).splitlines()[0]} Train that run again."
        ) from None
    return head.eval()


def same_tokens(trained: DictConfig, current: DictConfig, run_dir: Path) -> None:
    """Refuse a probe whose head would read other tokens than it was trained on: another
    backbone (architecture, weights, block, final norm, image size, normalisation) or, with
    random weights (``backbone.weights=null``, drawn from the seed), another ``seed``: a
    random backbone of another seed is another backbone."""
    keys = ("arch", "arch_kwargs", "weights", "block", "final_norm", "img_size")
    pairs = {k: [OmegaConf.select(c.backbone, k) for c in (trained, current)] for k in keys}
    pairs["mean, std"] = [
        resolve_normalization(c.backbone.weights, c.backbone.mean, c.backbone.std)
        for c in (trained, current)
    ]
    if trained.backbone.weights is None:
        pairs["seed"] = [trained.seed, current.seed]
    shown = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in pairs.items() if a != b)
    if shown:
        raise UserError(
            f"The probe in {str(run_dir)!r} was trained on other tokens than these ({shown}); "
            "use it with the backbone (and for random weights the seed) it was trained on."
        )


def note_other_dataset(trained: DictConfig, current: DictConfig, run_dir: Path, classes: int):
    """Say so when the probe was trained on another dataset (``dataset.name``, or the number of
    classes where this run's is set): allowed, its pooling is what is used, but a transfer a
    reader should not take for an in-domain result."""
    differing = []
    if trained.dataset.name != current.dataset.name:
        differing.append(f"dataset.name: {trained.dataset.name} vs {current.dataset.name}")
    if current.dataset.num_classes not in (None, classes):
        differing.append(f"classes: {classes} vs {current.dataset.num_classes}")
    if differing:
        log.warning(
            "The probe in %s was trained on another dataset (%s): its pooling is used here as "
            "a transfer, its classifier not at all.",
            run_dir,
            ", ".join(differing),
        )
