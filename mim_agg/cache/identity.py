"""What makes two caches the same cache: everything that changes what it serves.

The model (architecture, the weights' tag or file digest, block, final norm, image size,
normalisation, the oracle), how it ran (precision), what is stored (format, fields, dtype,
views, number of classes) and the data of every split (its images' identities and content,
order and labels, and its transform). A run finds its cache by this key and a cache never
serves a run whose key differs.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mim_agg.backbones import TokenRequest
from mim_agg.backbones.frozen import DEFAULT_DTYPE, is_timm_tag, resolve_normalization
from mim_agg.cache.store import FORMAT
from mim_agg.data.decode import DEFAULT_DECODE
from mim_agg.runs.identity import config_hash
from mim_agg.utils.files import sha256_of

SAMPLE_BYTES = 4096  # read from each end of an image file for the key: one page each
FILE_THREADS = 32  # concurrent reads while keying image files (a network file system waits)
FILES_PER_TASK = 256  # files per thread task (one task per file costs more than its read)


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


def file_identity(path: str, label: int, root: str) -> bytes:
    """The file's name under ``root`` (a folder, ending with a separator), its label, size,
    modification time and a hash of its first and last ``SAMPLE_BYTES``. The time alone
    misses a file replaced by one of the same size with the old time (``rsync -t``, a restore
    from backup); the ends of two images differ (the header, the last rows of the encoded
    pixels). The inode change time would notice a replacement too, but it also changes on
    every ``chmod`` or copy (a needless re-extraction) and is not the same on every node of
    some cluster file systems."""
    handle = os.open(path, os.O_RDONLY)
    try:
        status = os.fstat(handle)
        tail = max(SAMPLE_BYTES, status.st_size - SAMPLE_BYTES)
        ends = os.pread(handle, SAMPLE_BYTES, 0) + os.pread(handle, SAMPLE_BYTES, tail)
    finally:
        os.close(handle)
    name = path[len(root) :] if path.startswith(root) else path
    content = hashlib.sha256(ends).hexdigest()
    return f"{name}:{label}:{status.st_size}:{status.st_mtime_ns}:{content}\n".encode()


def files_identity(samples: list[tuple[str, int]], root: str) -> Iterator[bytes]:
    """``file_identity`` of every sample, in order, from ``FILE_THREADS`` threads: the reads
    wait on the disk (on a network file system, on its latency) and the hashing releases the
    GIL. (1.28M ImageNet files: see README, "Token cache".)"""

    def chunk_identity(start: int) -> list[bytes]:
        chunk = samples[start : start + FILES_PER_TASK]
        return [file_identity(path, label, root) for path, label in chunk]

    with ThreadPoolExecutor(FILE_THREADS) as pool:
        for lines in pool.map(chunk_identity, range(0, len(samples), FILES_PER_TASK)):
            yield from lines


def split_identity(split) -> str:
    """SHA-256 of a split (a ``TransformedSubset``): its source's images (files by
    ``file_identity``, in-memory sets by their pixels), the chosen indices in order, their
    labels, the transform (its ``repr`` lists every parameter) and the seed its augmentations
    are drawn from."""
    digest = hashlib.sha256()
    base = split.base
    samples = getattr(base, "samples", None)
    if samples is not None:  # image files: where they are, their size, time and content
        root = str(getattr(base, "root", "") or "")
        digest.update(os.path.realpath(os.path.expanduser(root or "/")).encode())
        for line in files_identity(samples, os.path.join(root, "")):
            digest.update(line)
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
    num_classes: int,
    oracle: tuple[str, str | None] | None = None,
) -> dict:
    """``request``: what is stored; ``split_ids``: ``split_identity`` of every split;
    ``num_classes``: the heads' width the cache serves (the same labels with another
    ``dataset.num_classes`` are another cache); ``oracle``: the attention oracle the
    extraction runs (also when only an oracle head's pooled output is stored)."""
    backbone = cfg.backbone
    mean, std = resolve_normalization(backbone.weights, backbone.mean, backbone.std)
    if oracle is not None:
        arch, weights = oracle
        oracle = {"arch": arch, "weights": weights_identity(weights, cfg.seed)}
    dtype = backbone.get("dtype", DEFAULT_DTYPE)  # named when set: older caches keep their keys
    decode = cfg.dataset.get("decode", DEFAULT_DECODE)  # the same
    # the layout the cache records and the summary it stores (and the file's check of it)
    summary = backbone.get("summary_tokens")
    return {
        "format": FORMAT,
        "arch": backbone.arch,
        **({"weights_dtype": dtype} if dtype != DEFAULT_DTYPE else {}),
        "arch_kwargs": OmegaConf.to_container(backbone.arch_kwargs or OmegaConf.create()),
        **({"summary_tokens": summary} if summary is not None else {}),
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
        **({"decode": decode} if decode != DEFAULT_DECODE else {}),
        "splits": split_ids,
        "views": views,
        "num_classes": num_classes,
    }


def cache_key(identity: dict) -> str:
    return config_hash(identity, digits=12)
