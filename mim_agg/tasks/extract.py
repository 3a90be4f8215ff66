"""The ``extract`` task: fill the token cache that ``probe.features=cached`` trains from.

It stores what this run's aggregators need (``aggregator`` and ``heads``), for every split; rerun
after an interruption, it continues after the last complete shard. Its folder is the cache's.
Under ``trainer=ddp`` every rank writes its share of the shards; ``cache.part=i/N`` writes part
``i`` of ``N`` (a SLURM array task), and the last part to end completes the cache.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mim_agg.builders import backbone_layout, build_aggregators, build_datamodule
from mim_agg.cache import open_cache
from mim_agg.cache.extract import human

log = logging.getLogger(__name__)

SUMMARY = "fill the token cache that probe.features=cached and knn read"
USES_RUN_FOLDER = False
Settings = None  # its options are the cache group's, shared with the tasks that read a cache


def run(cfg: DictConfig, watch=None) -> dict:
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    aggregators = build_aggregators(cfg, backbone_layout(cfg))
    cache = open_cache(cfg, datamodule, list(aggregators.values()), watch, distributed=True)
    if not cache.complete:
        return {"cache_dir": str(cache.root), "part": cfg.cache.part, "complete": False}
    manifest = cache.manifest
    total = sum(shard["bytes"] for s in manifest["splits"].values() for shard in s["shards"])
    counts = {split: entry["plan"]["count"] for split, entry in manifest["splits"].items()}
    log.info("Token cache ready: %s (%s; %s)", cache.root, human(total), counts)
    return {"cache_dir": str(cache.root), "bytes": total, "images": counts, "complete": True}
