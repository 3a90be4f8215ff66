"""The cache a run needs: planned from config, found by its key, extracted when missing.

Planning needs no weights: the run's aggregators, built on the architecture alone, say which
fields to store (``token_request``: the outputs of parameter-free aggregators, the tokens only
when a learned one reads them), and the data module's splits give the images. Only when shards
are missing is the backbone loaded and run: by every rank of a multi-process trainer
(``trainer=ddp``), or by the part of a cache this job fills (``cache.part``), each writing its
own shards (``mim_agg.cache.parts``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mim_agg.aggregators import Aggregator, token_request
from mim_agg.backbones import TokenLayout, TokenRequest
from mim_agg.backbones.frozen import skeleton
from mim_agg.backbones.memory import breakdown, extraction_memory, gigabytes, memory_warning
from mim_agg.builders import (
    backbone_layout,
    build_aggregators,
    build_live_source,
    cache_companions,
    cfg_at_block,
)
from mim_agg.cache.extract import Target, bytes_per_view, disk_refusal, extract, field_shapes, human
from mim_agg.cache.identity import cache_identity, cache_key, split_identity
from mim_agg.cache.parts import Ranks, start_ranks
from mim_agg.cache.store import FORMAT, CacheError, SplitPlan, TokenCache
from mim_agg.data import ProbeDataModule
from mim_agg.errors import ConfigError
from mim_agg.validation import backbone_arguments

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "test")


@dataclass
class PlannedCache:
    """One cache as config and data define it, before anything is read or run: where it
    lives, its key and identity, the aggregators it serves (by ``output_key``), what it stores and
    what the backbone must provide for that."""

    cache: TokenCache
    key: str
    identity: dict
    layout: TokenLayout
    aggregators: dict[str, Aggregator]
    request: TokenRequest
    live_request: TokenRequest
    shapes: dict


def plan_cache(
    cfg: DictConfig,
    datamodule: ProbeDataModule,
    split_ids: dict[str, str],
    aggregators: list[Aggregator],
) -> PlannedCache:
    """The cache of ``aggregators`` (the run's, built once) on this backbone block and data;
    needs no weights."""
    layout = backbone_layout(cfg)
    by_key = {a.output_key: a for a in aggregators}  # a grid of learning rates repeats each key
    request = token_request(by_key.values(), cached=True)
    live_request = token_request(by_key.values())
    views = split_views(cfg, datamodule)
    identity = cache_identity(
        cfg, request, split_ids, views, datamodule.num_classes, live_request.oracle
    )
    key = cache_key(identity)
    folder = f"{cfg.backbone.arch}-{cfg.dataset.name}-{key}"
    out_dims = {k: a.out_dim for k, a in by_key.items()}
    return PlannedCache(
        cache=TokenCache(Path(cfg.paths.cache_dir).absolute() / folder, rebuild_command(cfg)),
        key=key,
        identity=identity,
        layout=layout,
        aggregators=by_key,
        request=request,
        live_request=live_request,
        shapes=field_shapes(layout, request, out_dims),
    )


def open_cache(
    cfg: DictConfig,
    datamodule: ProbeDataModule,
    aggregators: list[Aggregator],
    watch=None,
    build: bool = True,
    distributed: bool = False,
) -> TokenCache:
    """The complete, checked cache for ``aggregators`` (this run's, and ``cache.also_for``'s)
    on this data; missing shards are extracted first when ``build`` (else refused with the
    command that builds them), together with the caches of the blocks ``cache.blocks`` lists
    (the config's aggregators at those blocks) in the same backbone pass.

    A complete cache is read without a lock (so from a read-only mount too): nothing writes
    to it again. Its shards were renamed into place before the manifest that completes it,
    which is itself linked into place whole, and extraction only ever fills an incomplete
    cache, under the lock, after looking again. A reader that finds the cache incomplete
    waits for that lock, and finds it complete.

    With ``distributed`` (a caller that runs on every rank: the probe, the extract task), a
    multi-process trainer's ranks start here (``start_ranks``) and extract together; the
    training that follows runs in them. With ``cache.part`` (``task=extract`` only), the cache
    returned is complete only when this job wrote its last part."""
    datamodule.setup()
    split_ids = {name: split_identity(split) for name, split in datamodule.splits.items()}
    planned = plan_cache(cfg, datamodule, split_ids, [*aggregators, *cache_companions(cfg)])
    cache = planned.cache
    if not build and not cache.complete:
        raise CacheError(f"No complete token cache at {cache.root}. Build it: {cache.rebuild}")
    if build:
        ranks = start_ranks(cfg) if distributed else Ranks()
        if not ranks.broadcast(cache.complete):
            others = [plan_block(cfg, b, datamodule, split_ids) for b in other_blocks(cfg)]
            fill([planned, *others], cfg, datamodule, watch, ranks)
    if cfg.cache.part is not None and not cache.complete:  # other parts are still missing
        return cache
    log.info("Checking the token cache %s", cache.root)
    cache.check(planned.key, cfg.cache.verify)
    return cache


def plan_block(cfg: DictConfig, block: int, datamodule, split_ids) -> PlannedCache:
    """The cache of this run's aggregators at another block, built on that block's layout."""
    moved = cfg_at_block(cfg, block)
    aggregators = build_aggregators(moved, backbone_layout(moved))
    return plan_cache(moved, datamodule, split_ids, list(aggregators.values()))


def other_blocks(cfg: DictConfig) -> list[int]:
    """``cache.blocks`` without this run's own block, each checked against the backbone."""
    wanted = list(cfg.cache.blocks or [])
    if not wanted:
        return []
    depth = skeleton(**{**backbone_arguments(cfg.backbone), "block": -1}).layout.depth
    outside = [b for b in wanted if not -depth <= b < depth]
    if outside:
        raise ConfigError(
            f"cache.blocks={wanted} holds {outside}, outside {cfg.backbone.arch}'s blocks "
            f"0..{depth - 1} (or -{depth}..-1 from the end)."
        )
    return [b for b in dict.fromkeys(wanted) if b != cfg.backbone.block]


def fill(planned: list[PlannedCache], cfg: DictConfig, datamodule, watch, ranks: Ranks) -> None:
    """Extract this job's shards of every cache of ``planned`` that is still incomplete, all
    from one backbone pass (one per distinct shard plan, should a resumed cache keep an older
    one), under the job's locks (``Ranks.holding``); the last shard of a cache writes its
    manifest."""
    share = ranks.share(cfg)
    with ranks.holding([entry.cache for entry in planned], share.lock):
        incomplete = [i for i, entry in enumerate(planned) if not entry.cache.complete]
        pending = [planned[i] for i in ranks.broadcast(incomplete)]  # others may have finished
        groups: dict[tuple, list[PlannedCache]] = {}
        for entry in pending:
            plans = start(entry, cfg, datamodule)
            groups.setdefault(tuple(sorted(plans.items())), []).append(entry)
        for plan_items, entries in groups.items():
            extract_together(entries, dict(plan_items), cfg, datamodule, watch, ranks)
        for entry in pending:
            if not entry.cache.publish():
                log.info(
                    "Part %d of %d of %s is written; the last part to end completes the cache.",
                    share.part,
                    share.parts,
                    entry.cache.root,
                )


def extract_together(entries: list[PlannedCache], plans: dict, cfg, datamodule, watch, ranks):
    """One backbone pass, kept up to the deepest block of ``entries``, fills them all (this
    job's shards of them)."""
    targets, requests = [], {}
    for entry in entries:
        if ranks.rank == 0:
            describe(entry, cfg)
        block = entry.layout.depth - 1
        stored = {k: a for k, a in entry.aggregators.items() if k in entry.request.pooled}
        targets.append(Target(entry.cache, block, entry.shapes, stored))
        requests[block] = requests.get(block, TokenRequest()) | entry.live_request
    if ranks.rank == 0:
        warn_single_view(plans, datamodule.augment)
    refusal = ranks.broadcast(
        disk_refusal(targets, plans, cfg.cache.dtype) if ranks.rank == 0 else None
    )
    if refusal:
        raise CacheError(refusal)
    if ranks.rank == 0 and ranks.device.type == "cuda":
        check_gpu_memory(cfg, requests, entries[0].identity["precision"], ranks.device)
    extract(
        targets,
        build_live_source(cfg, requests),
        datamodule.splits,
        plans,
        cfg.cache.dtype,
        cfg.cache.batch_size,
        cfg.dataset.num_workers,
        augmented={"train"} if datamodule.augment else set(),
        precision=entries[0].identity["precision"],
        watch=watch,
        share=ranks.share(cfg),
        ranks=ranks,
    )
    if len(entries) > 1 and ranks.rank == 0:
        log.info(
            "One backbone pass filled the caches of blocks %s: %s",
            ", ".join(str(t.block) for t in targets),
            ", ".join(str(entry.cache.root) for entry in entries),
        )


def check_gpu_memory(cfg: DictConfig, requests: dict, precision: str, device) -> None:
    """Log what one backbone pass of ``cache.batch_size`` images needs on this GPU, computed
    (``mim_agg/backbones/memory.py``: an oracle's model is not counted), and warn with a batch
    size that fits when less is free: before the weights are loaded, so the free memory is
    what the weights and the pass share."""
    reads_attention = any(r.cls_attn or r.center_rows for r in requests.values())
    backbone = cfg_at_block(cfg, max(requests)).backbone
    bf16 = precision.startswith("bf16")
    try:
        need = extraction_memory(backbone, cfg.cache.batch_size, reads_attention, bf16)
    except ConfigError as unknown:
        log.info("No GPU memory estimate: %s", unknown)
        return
    free, _ = torch.cuda.mem_get_info(device)
    log.info(
        "One backbone pass of cache.batch_size=%d needs about %s (%s); %s free on the GPU.",
        cfg.cache.batch_size,
        gigabytes(need.total),
        breakdown(need),
        gigabytes(free),
    )
    warning = memory_warning(need, free)
    if warning:
        log.warning(warning)


def start(entry: PlannedCache, cfg: DictConfig, datamodule) -> dict[str, SplitPlan]:
    """Write the plan of a new cache; a resumed one, or another part of it, keeps the plan its
    first attempt wrote (its shard size, say)."""
    views = entry.identity["views"]
    plans = {
        split: SplitPlan(len(datamodule.splits[split]), views[split], cfg.cache.shard_size)
        for split in SPLITS
    }
    plan = entry.cache.start(
        {
            "format": FORMAT,
            "key": entry.key,
            "identity": entry.identity,
            "layout": asdict(entry.layout),
            "request": entry.identity["request"],
            "fields": {name: list(shape) for name, shape in entry.shapes.items()},
            "dtype": cfg.cache.dtype,
            "num_classes": datamodule.num_classes,
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
            "splits": {s: {"plan": asdict(p), "shards": []} for s, p in plans.items()},
        }
    )
    return {s: SplitPlan(**plan["splits"][s]["plan"]) for s in SPLITS}


def split_views(cfg: DictConfig, datamodule: ProbeDataModule) -> dict[str, int]:
    """``cache.views`` augmented views of each training image; one centre crop elsewhere."""
    if cfg.cache.views > 1 and not datamodule.augment:
        raise ConfigError(
            f"cache.views={cfg.cache.views} with dataset.augment=false would store "
            "identical views; use cache.views=1, or dataset.augment=true."
        )
    return {"train": cfg.cache.views, "heldout": 1, "test": 1}


def describe(entry: PlannedCache, cfg) -> None:
    """Say what will be stored and why, before anything is written."""
    dtype, shapes = cfg.cache.dtype, entry.shapes
    log.info("Token cache %s (%s, block %d):", entry.cache.root, dtype, entry.layout.depth - 1)
    learned = sorted({a.name for a in entry.aggregators.values() if not a.parameter_free})
    if "all" in shapes:
        log.info(
            "Full tokens are stored (%s per view) because learned aggregators read them: %s.",
            human(bytes_per_view({"all": shapes["all"]}, dtype)),
            ", ".join(learned),
        )
    else:
        log.info("Only the parameter-free aggregators' outputs are stored (none is learned).")


def warn_single_view(plans: dict, augment: bool) -> None:
    """Said once per extraction, however many blocks' caches it fills."""
    if augment and plans["train"].views == 1:
        log.warning(
            "cache.views=1 with dataset.augment=true: every epoch trains on the same random crop "
            "of each image (online, each epoch draws a new one). For the centre crop set "
            "dataset.augment=false; for online-like training, cache.views=<epochs>."
        )


def rebuild_command(cfg: DictConfig) -> str:
    """``python run.py task=extract <this run's overrides>``: less the task, ``resume`` and
    the other tasks' own settings (``logreg.*``), which an extraction does not read; k-NN's
    and logistic regression's fixed choices added (the centre crop, one view)."""
    from mim_agg.tasks import TASKS  # the tasks build caches: imported when one is refused

    not_read = {"task", "resume"} | {getattr(t, "SETTINGS_GROUP", "task") for t in TASKS.values()}
    overrides = []
    if HydraConfig.initialized():
        given = HydraConfig.get().overrides.task
        overrides = [o for o in given if re.split(r"[.=@]", o.lstrip("+~"))[0] not in not_read]
    if cfg.task in ("knn", "logreg"):
        overrides += ["dataset.augment=false", "cache.views=1"]
    return " ".join(["python run.py task=extract", *overrides])
