"""What makes two caches the same cache: everything that changes the stored numbers.

The model (architecture, the weights' tag or file digest, block, final norm, image size,
normalisation, the oracle), how it ran (precision), what is stored (fields, dtype, views) and
the data of every split (its images' identities, order and labels, and its transform). A run
finds its cache by this key and a cache never serves a run whose key differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mim_agg.backbones import TokenRequest
from mim_agg.backbones.frozen import is_timm_tag, resolve_normalization


def weights_identity(weights: str | None, seed: int) -> dict:
    """A tag names timm's weights; a file is named by its content; random weights by the seed
    that drew them."""
    if weights is None:
        return {"random": True, "seed": seed}
    if is_timm_tag(weights):
        return {"tag": weights}
    with open(weights, "rb") as file:
        return {
            "file": Path(weights).name,
            "sha256": hashlib.file_digest(file, "sha256").hexdigest(),
        }


def split_identity(split) -> str:
    """SHA-256 of a split (a ``TransformedSubset``): its source's images, the chosen indices
    in order, their labels and the transform (its ``repr`` lists every parameter)."""
    digest = hashlib.sha256()
    base = split.base
    samples = getattr(base, "samples", None)
    if samples is not None:  # image files: their paths below the root (image content is not read)
        root = str(getattr(base, "root", ""))
        for path, label in samples:
            digest.update(f"{Path(path).relative_to(root) if root else path}:{label}\n".encode())
    else:  # in-memory sets: the pixels themselves
        pixels = getattr(base, "data", getattr(base, "images", None))
        digest.update(np.ascontiguousarray(np.asarray(pixels)).tobytes())
    digest.update(np.asarray(split.indices, dtype=np.int64).tobytes())
    digest.update(np.asarray(split.targets, dtype=np.int64).tobytes())
    digest.update(repr(split.transform).encode())
    return digest.hexdigest()


def cache_identity(
    cfg: DictConfig, request: TokenRequest, splits: dict, views: dict[str, int]
) -> dict:
    backbone = cfg.backbone
    mean, std = resolve_normalization(backbone.weights, backbone.mean, backbone.std)
    oracle = None
    if request.oracle is not None:
        arch, weights = request.oracle
        oracle = {"arch": arch, "weights": weights_identity(weights, cfg.seed)}
    return {
        "arch": backbone.arch,
        "weights": weights_identity(backbone.weights, cfg.seed),
        "block": backbone.block,
        "final_norm": backbone.final_norm,
        "img_size": backbone.img_size,
        "mean": mean,
        "std": std,
        "oracle": oracle,
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
        "dtype": cfg.cache.dtype,
        "request": {
            "tokens": request.tokens,
            "cls_attn": request.cls_attn,
            "cls_blocks": request.cls_blocks,
            "pooled": list(request.pooled),
        },
        "dataset": cfg.dataset.name,
        "splits": {name: split_identity(split) for name, split in splits.items()},
        "views": views,
    }


def cache_key(identity: dict) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
