"""A token cache on disk: one folder per key, a JSON manifest, safetensors shards per split.

Each shard ``<split>/shard-<i>.safetensors`` holds ``shard_size`` consecutive images of the
split: every stored field as ``[n, views, ...]`` plus ``targets [n]``. Shards are written
whole (temporary file, fsync, rename) and entered in the manifest only afterwards, so a killed
extraction leaves complete shards that the manifest names and nothing half-written that a
reader could take. safetensors maps the file (``torch.UntypedStorage.from_file``): reading
an image touches only its pages, stays in the stored dtype, and needs no memory that grows
with the dataset (measured against ``numpy.memmap``: the same speed; safetensors keeps
bfloat16, names and shapes in a checked header).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mim_agg.errors import UserError
from mim_agg.utils.files import read_json, sha256_of, write_atomic, write_json

log = logging.getLogger(__name__)

FORMAT = 1
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
}
SCALE = ".scale"  # int8 fields carry a float32 scale per row of their last dimension
VERIFIED = "verified.json"  # shards whose SHA-256 was checked, with their size and mtime then


class CacheError(UserError):
    """A cache that cannot serve this run: missing, incomplete, damaged or for other tokens."""


@dataclass(frozen=True)
class SplitPlan:
    """What one split of the cache holds: ``count`` images, ``views`` views each."""

    count: int
    views: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.count))


def quantize(values: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``values`` in the stored dtype; int8 is symmetric per row (``x ~ q * scale``)."""
    if dtype != "int8":
        stored = values.to(DTYPES[dtype])
        if not torch.isfinite(stored).all() and torch.isfinite(values).all():
            raise CacheError(
                f"Tokens overflow cache.dtype={dtype} (largest magnitude "
                f"{values.abs().max().item():.3g}); use cache.dtype=bfloat16 or float32."
            )
        return {"": stored}
    scale = values.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    quantized = (values.float() / scale).round().clamp(-127, 127).to(torch.int8)
    return {"": quantized, SCALE: scale}


def dequantize(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored fields back as values: int8 times its scale, others unchanged (bf16 stays
    bf16 until the head's device)."""
    values = {}
    for name, stored in fields.items():
        if name.endswith(SCALE) or name == "targets":
            continue
        scale = fields.get(name + SCALE)
        values[name] = stored.float() * scale if scale is not None else stored
    return values


class TokenCache:
    """One cache folder: its manifest, its shards, their writing and checking."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    @property
    def manifest(self) -> dict:
        return read_json(self.manifest_path) or {}

    @property
    def complete(self) -> bool:
        manifest = self.manifest
        return bool(manifest) and all(
            len(split["shards"]) == SplitPlan(**split["plan"]).num_shards
            for split in manifest["splits"].values()
        )

    # ------------------------------------------------------------------------- writing
    def start(self, manifest: dict) -> None:
        """Create the folder and manifest, or check that an existing one is for the same key
        (shards already complete are kept: extraction resumes after them)."""
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self.manifest
        if existing and existing.get("key") != manifest["key"]:
            raise CacheError(
                f"{self.manifest_path} belongs to another cache (key {existing.get('key')}, "
                f"not {manifest['key']}); remove {self.root} to rebuild it."
            )
        if not existing:
            write_json(self.manifest_path, manifest)
        for temporary in self.root.glob("*/.shard-*.tmp"):  # a kill mid-write left these
            temporary.unlink()

    @contextlib.contextmanager
    def locked(self, shared: bool = False):
        """One extracting process per cache, readers side by side (``shared``); whoever
        cannot have the lock waits for it (a sweep's jobs share one cache)."""
        self.root.mkdir(parents=True, exist_ok=True)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with open(self.root / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Another process is writing or reading %s; waiting for it.", self.root)
                fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def shards_done(self, split: str) -> int:
        return len(self.manifest["splits"][split]["shards"])

    def write_shard(self, split: str, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard whole, then enter it in the manifest."""
        name = f"shard-{shard:05d}.safetensors"
        data = save({k: v.contiguous() for k, v in tensors.items()})
        folder = self.root / split
        folder.mkdir(exist_ok=True)
        write_atomic(folder / name, data)
        manifest = self.manifest
        shards = manifest["splits"][split]["shards"]
        if len(shards) != shard:
            raise CacheError(f"Shard {shard} of {split} written out of order in {self.root}.")
        shards.append(
            {
                "file": f"{split}/{name}",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        write_json(self.manifest_path, manifest)

    # ------------------------------------------------------------------------- reading
    def check(self, key: str, rebuild: str, deep: bool = True) -> None:
        """Refuse, before any training, a cache that is missing, incomplete, for another key,
        truncated or damaged (``deep``: every shard's SHA-256 against the manifest)."""
        manifest = self.manifest
        if not manifest:
            raise CacheError(f"No token cache at {self.root}. Build it: {rebuild}")
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise CacheError(
                f"The cache at {self.root} was written for other tokens or by another format "
                f"(key {manifest.get('key')}, format {manifest.get('format')}). Remove it and "
                f"rebuild: {rebuild}"
            )
        if not self.complete:
            raise CacheError(f"The cache at {self.root} is incomplete. Resume it: {rebuild}")
        verified = read_json(self.root / VERIFIED, {}) if deep else {}
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                stamp = self._check_shard(shard, rebuild, deep and shard["file"] not in verified)
                if deep and verified.get(shard["file"], stamp) != stamp:  # changed since
                    self._check_shard(shard, rebuild, deep=True)
                verified[shard["file"]] = stamp
        if deep:
            write_json(self.root / VERIFIED, verified)

    def _check_shard(self, shard: dict, rebuild: str, deep: bool) -> list[int]:
        """Check one shard; its (size, modification time), under which a hashed shard need
        not be hashed again."""
        path = self.root / shard["file"]
        damaged = f"Cache shard {path} is %s. Remove {self.root} and rebuild it: {rebuild}"
        if not path.is_file():
            raise CacheError(damaged % "missing")
        if path.stat().st_size != shard["bytes"]:
            raise CacheError(
                damaged % f"truncated ({path.stat().st_size} of {shard['bytes']} bytes)"
            )
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise CacheError(damaged % f"unreadable ({error})") from None
        if deep and sha256_of(path) != shard["sha256"]:
            raise CacheError(damaged % "damaged (its SHA-256 differs from the manifest's)")
        status = path.stat()
        return [status.st_size, status.st_mtime_ns]

    def open_shard(self, split: str, shard: int) -> dict[str, torch.Tensor]:
        """A shard's tensors, memory-mapped (nothing is read until it is indexed)."""
        path = self.root / self.manifest_entry(split)["shards"][shard]["file"]
        with safe_open(path, "pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118

    def manifest_entry(self, split: str) -> dict:
        return self.manifest["splits"][split]
