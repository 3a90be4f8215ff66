"""A token cache on disk: one folder per key, a JSON manifest, safetensors shards per split.

Each shard ``<split>/shard-<i>.safetensors`` holds ``shard_size`` consecutive images of the
split: every stored field as ``[n, views, ...]`` plus ``targets [n]``. An extraction first
fixes the plan (``plan.json``: the manifest without shards); each shard is written whole
(temporary file, fsync, rename), then its record (``shard-<i>.json``: size and SHA-256). Any
number of processes may fill one cache, each its own shards (``mim_agg.cache.parts``): a
shard counts once its record exists, so a killed process leaves complete shards and nothing
half-written that a rerun or a reader could take. Whoever records the last shard writes the
manifest, once (a hard link that only one process can make), from the plan and the records:
the same manifest however many processes took part. The manifest carries the SHA-256 of its
own content, checked on every read: an edited count or class number is refused, not trained
on. A complete cache is never written again, so reading one takes no lock and needs no write
access (a read-only mount).
safetensors maps the file (``torch.UntypedStorage.from_file``): reading an image touches only
its pages, stays in the stored dtype, and needs no memory that grows with the dataset
(measured against ``numpy.memmap``: the same speed; safetensors keeps bfloat16, names and
shapes in a checked header).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from mim_agg.errors import UserError
from mim_agg.runs.identity import config_hash
from mim_agg.utils.files import (
    FILE_MODE,
    read_json,
    sha256_of,
    strict_json,
    write_atomic,
    write_json,
)

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the manifest carries its own digest
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int8": torch.int8,
}
SCALE = ".scale"  # int8 fields carry a float32 scale per row of their last dimension
VERIFIED = "verified.json"  # shards whose SHA-256 was checked, with their size and mtime then
PLAN = "plan.json"  # the manifest-to-be, without shards: what every extracting process fills
DIGEST = "digest"  # the manifest's key for the SHA-256 of the rest of its content
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
REBUILD = "python run.py task=extract <this run's overrides>"


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


def shard_file(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.safetensors"


def shard_record(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.json"


def create_once(path: Path, content: str) -> bool:
    """Write ``path`` whole unless it exists; False when it did. Of processes racing to write
    it, exactly one succeeds (``os.link`` never replaces), and no reader sees a partial file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, FILE_MODE)
        with os.fdopen(handle, "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(temporary).unlink(missing_ok=True)


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without its digest, as canonical JSON (key order and spacing
    do not count, every value does)."""
    content = {key: value for key, value in manifest.items() if key != DIGEST}
    return config_hash(content, digits=64)  # manifests are strict JSON: no NaN to tell apart


class TokenCache:
    """One cache folder: its manifest, its shards, their writing and checking. ``rebuild``:
    the command every refusal names."""

    def __init__(self, root: Path | str, rebuild: str = REBUILD) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.plan_path = self.root / PLAN
        self.rebuild = rebuild

    @property
    def manifest(self) -> dict:
        """The manifest (empty when there is none), refused unless its content matches the
        digest written with it: the counts, classes and shard digests it serves are trusted
        only as written."""
        manifest = read_json(self.manifest_path) or {}
        if manifest and manifest.get(DIGEST) != manifest_digest(manifest):
            raise CacheError(
                f"The cache manifest {self.manifest_path} is changed since it was written (its "
                f"content does not match its digest). Remove {self.root} and rebuild it: "
                f"{self.rebuild}"
            )
        return manifest

    @staticmethod
    def _signed(manifest: dict) -> str:
        signed = {**manifest, DIGEST: manifest_digest(manifest)}
        return json.dumps(strict_json(signed), indent=2, allow_nan=False) + "\n"

    @property
    def complete(self) -> bool:
        manifest = self.manifest
        return bool(manifest) and all(
            len(split["shards"]) == SplitPlan(**split["plan"]).num_shards
            for split in manifest["splits"].values()
        )

    # ------------------------------------------------------------------------- writing
    def start(self, manifest: dict) -> dict:
        """The plan every extracting process follows: the first to start writes ``manifest``
        (its ``splits`` without shards) as ``plan.json``, later ones (a resumed extraction,
        the other parts) check its key and keep its plan (its shard size, say)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists() and not self.complete:  # an older format's progress
            self.manifest_path.unlink(missing_ok=True)
        create_once(self.plan_path, json.dumps(manifest, indent=2) + "\n")
        plan = read_json(self.plan_path)
        if plan.get("key") != manifest["key"]:
            raise CacheError(
                f"{self.plan_path} belongs to another cache (key {plan.get('key')}, "
                f"not {manifest['key']}); remove {self.root} to rebuild it."
            )
        return plan

    @contextlib.contextmanager
    def locked(self, name: str = ".lock", wait: bool = True):
        """Yield whether this process holds the lock file ``name``: one extraction job per
        cache (per part of it, ``mim_agg.cache.parts``); another waits for it (a sweep's jobs
        share one cache), or with ``wait=False`` is told at once. Readers need no lock: they
        read only a complete cache, which nobody writes."""
        with self._open_lock(name) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                log.info("Another process is writing %s; waiting for it.", self.root)
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open_lock(self, name: str):
        """The lock file, in the cache folder: the first write of an extraction, so a folder
        that cannot be written is refused here, before any work."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return open(self.root / name, "a+")
        except OSError as error:
            if error.errno not in NOT_WRITABLE:
                raise
            raise CacheError(
                f"The token cache {self.root} must be extracted, but {error.filename} cannot be "
                f"written ({error.strerror}). Set paths.cache_dir= to a writable folder (a "
                "complete cache is read without writing, from a read-only mount too)."
            ) from None

    def shard_done(self, split: str, shard: int) -> bool:
        return (self.root / shard_record(split, shard)).is_file()

    def write_shard(self, split: str, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard whole, then its record: its size, SHA-256 (of the bytes written,
        so ``check`` need not read them again) and the size and time it was written with."""
        data = save({k: v.contiguous() for k, v in tensors.items()})
        (self.root / split).mkdir(exist_ok=True)
        path = write_atomic(self.root / shard_file(split, shard), data)
        status = path.stat()
        record = {
            "file": shard_file(split, shard),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "verified": [status.st_size, status.st_mtime_ns],
        }
        write_json(self.root / shard_record(split, shard), record)

    def publish(self) -> bool:
        """Write the manifest when every shard of the plan is recorded (else False): the
        plan with every split's shards in order, the shards verified as written. Several
        processes may find the last record at once; one writes the manifest, all return True.
        Temporary files of killed writers go then: nobody writes this cache again."""
        if self.complete:
            return True
        plan = read_json(self.plan_path)
        records = {}
        for split, entry in plan["splits"].items():
            shards = range(SplitPlan(**entry["plan"]).num_shards)
            records[split] = [read_json(self.root / shard_record(split, s)) for s in shards]
            if None in records[split]:
                return False
        verified = {r["file"]: r.pop("verified") for split in records.values() for r in split}
        for split, entry in plan["splits"].items():
            entry["shards"] = records[split]
        self._record_verified(verified)
        if create_once(self.manifest_path, self._signed(plan)):
            for temporary in self.root.glob("*/.shard-*.tmp"):
                temporary.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------------- reading
    def check(self, key: str, verify: bool | str = True) -> None:
        """Refuse, before any training, a cache that is missing, incomplete, for another key,
        truncated or damaged. ``verify``: ``true`` compares the SHA-256 of every shard not
        hashed before or whose size or modification time changed since (``verified.json``);
        ``full`` hashes every shard (damage that kept the time, a copy from elsewhere);
        ``false`` checks sizes and headers only."""
        manifest = self.manifest
        if not manifest:
            raise CacheError(f"No token cache at {self.root}. Build it: {self.rebuild}")
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise CacheError(
                f"The cache at {self.root} was written for other tokens or by another format "
                f"(key {manifest.get('key')}, format {manifest.get('format')}). Remove it and "
                f"rebuild: {self.rebuild}"
            )
        if not self.complete:
            raise CacheError(f"The cache at {self.root} is incomplete. Resume it: {self.rebuild}")
        hashed = read_json(self.root / VERIFIED, {}) if verify is True else {}
        stamps = {}
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                stamps[shard["file"]] = stamp = self._check_shard(shard)
                if verify and hashed.get(shard["file"]) != stamp:
                    self._check_hash(shard)
        if verify and stamps != hashed:
            self._record_verified(stamps)

    def _damaged(self, shard: dict, why: str) -> str:
        path = self.root / shard["file"]
        return f"Cache shard {path} is {why}. Remove {self.root} and rebuild it: {self.rebuild}"

    def _check_shard(self, shard: dict) -> list[int]:
        """Check one shard's size and header; its (size, modification time), under which a
        hashed shard need not be hashed again."""
        path = self.root / shard["file"]
        if not path.is_file():
            raise CacheError(self._damaged(shard, "missing"))
        status = path.stat()
        if status.st_size != shard["bytes"]:
            why = f"truncated ({status.st_size} of {shard['bytes']} bytes)"
            raise CacheError(self._damaged(shard, why))
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise CacheError(self._damaged(shard, f"unreadable ({error})")) from None
        return [status.st_size, status.st_mtime_ns]

    def _check_hash(self, shard: dict) -> None:
        if sha256_of(self.root / shard["file"]) != shard["sha256"]:
            why = "damaged (its SHA-256 differs from the manifest's)"
            raise CacheError(self._damaged(shard, why))

    def _record_verified(self, stamps: dict) -> None:
        """Remember the verified shards under their size and time. A read-only mount cannot
        remember: a warning says that the next run hashes again, and how to spare it."""
        try:
            write_json(self.root / VERIFIED, stamps)
        except OSError as error:
            if error.errno not in NOT_WRITABLE:
                raise
            log.warning(
                "Every shard of %s verified, but %s cannot be written (%s): the next run "
                "hashes them again. A read-only copy verified where it was written needs no "
                "hashing: cache.verify=false.",
                self.root,
                VERIFIED,
                error.strerror,
            )

    def open_shard(self, split: str, shard: int) -> dict[str, torch.Tensor]:
        """A shard's tensors, memory-mapped (nothing is read until it is indexed). Its file
        is found by its name, not in the manifest: a loader opens every shard of an epoch."""
        with safe_open(self.root / shard_file(split, shard), "pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118

    def manifest_entry(self, split: str) -> dict:
        return self.manifest["splits"][split]
