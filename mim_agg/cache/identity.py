"""What makes two caches the same cache: everything that changes the stored numbers.

The model (architecture, the weights' tag or file digest, block, final norm, image size,
normalisation, the oracle), how it ran (precision), what is stored (fields, dtype, views) and
the data of every split (its images' identities, order and labels, and its transform). A run
finds its cache by this key and a cache never serves a run whose key differs.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mim_agg.backbones import TokenRequest
from mim_agg.backbones.frozen import is_timm_tag, resolve_normalization
from mim_agg.runs.identity import config_hash
from mim_agg.utils.files import sha256_of


def weights_identity(weights: str | None, seed: int) -> dict:
    """A tag names timm's weights; a file is named by its content; random weights by the seed
    that drew them."""
    if weights is None:
        return {"random": True, "seed": seed}
    if is_timm_tag(weights):
        return {"tag": weights}
    status = os.stat(weights)
    digest = file_digest(os.path.realpath(weights), status.st_size, status.st_mtime_ns)
    return {"file": Path(weights).name, "sha256": digest}


@functools.lru_cache(maxsize=16)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A weights file is hashed once per process while its size and time stay the same (a
    layer-wise sweep keys a cache per block with the same file)."""
    return sha256_of(path)


def split_identity(split) -> str:
    """SHA-256 of a split (a ``TransformedSubset``): its source's images, the chosen indices
    in order, their labels, the transform (its ``repr`` lists every parameter) and the seed
    its augmentations are drawn from."""
    digest = hashlib.sha256()
    base = split.base
    samples = getattr(base, "samples", None)
    if samples is not None:  # image files: where they are, their size and modification time
        root = os.path.realpath(os.path.expanduser(str(getattr(base, "root", "") or "/")))
        digest.update(root.encode())
        for path, label in samples:
            status = os.stat(path)
            relative = os.path.relpath(os.path.realpath(path), root)
            digest.update(f"{relative}:{label}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    else:  # in-memory sets: the pixels themselves
        pixels = getattr(base, "data", getattr(base, "images", None))
        digest.update(np.ascontiguousarray(np.asarray(pixels)).tobytes())
    digest.update(np.asarray(split.indices, dtype=np.int64).tobytes())
    digest.update(np.asarray(split.targets, dtype=np.int64).tobytes())
    digest.update(repr(split.transform).encode())
    digest.update(f"seed={split.seed}".encode())
    return digest.hexdigest()


def cache_identity(
    cfg: DictConfig,
    request: TokenRequest,
    split_ids: dict[str, str],
    views: dict[str, int],
    oracle: tuple[str, str | None] | None = None,
) -> dict:
    """``request``: what is stored; ``split_ids``: ``split_identity`` of every split;
    ``oracle``: the attention oracle the extraction runs (also when only an oracle head's
    pooled output is stored)."""
    backbone = cfg.backbone
    mean, std = resolve_normalization(backbone.weights, backbone.mean, backbone.std)
    if oracle is not None:
        arch, weights = oracle
        oracle = {"arch": arch, "weights": weights_identity(weights, cfg.seed)}
    return {
        "arch": backbone.arch,
        "arch_kwargs": OmegaConf.to_container(backbone.arch_kwargs or OmegaConf.create()),
        "weights": weights_identity(backbone.weights, cfg.seed),
        "block": backbone.block,
        "final_norm": backbone.final_norm,
        "img_size": backbone.img_size,
        "mean": mean,
        "std": std,
        "oracle": oracle,
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
        "dtype": cfg.cache.dtype,
        "request": request.as_dict(),
        "dataset": cfg.dataset.name,
        "splits": split_ids,
        "views": views,
    }


def cache_key(identity: dict) -> str:
    return config_hash(identity, digits=12)
