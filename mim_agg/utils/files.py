"""Result files are written whole or not at all, and hold strict JSON (null, never NaN)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from mim_agg.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files private


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Write to a temporary file beside ``path``, flush it to disk, then rename over ``path``:
    a reader, a crash or a full disk never leaves a half-written file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, FILE_MODE)
        with os.fdopen(handle, "wb" if isinstance(content, bytes) else "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def strict_json(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def write_json(path: Path, value) -> Path:
    return write_atomic(path, json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n")


def no_space(error: OSError) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


class DamagedFile(UserError):
    """A file of ours that no longer parses (cut short by a crash, a full disk or a copy)."""


def read_json(path: Path, default=None):
    """The file's JSON, or ``default`` when there is no file; a damaged file is named, never
    read as empty (that would forget a run's history) nor overwritten."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFile(
            f"{path} is damaged ({error}); it was left as it is. Restore it from a backup, or "
            "move it away and rerun: a missing record is started anew, a missing cache "
            "manifest makes the cache be extracted again."
        ) from None


def sha256_of(path: Path | str, chunk: int = 1 << 24) -> str:
    """The file's SHA-256, read in 16 MB chunks (no whole-file copy in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def under_root(root_dir: str, path: str) -> Path:
    """``path`` as the runs read it: absolute, a relative one taken from ``paths.root_dir``
    (``MIM_AGG_ROOT``), where the outputs, data, weights and caches are, not from the current
    folder."""
    return Path(os.path.abspath(Path(root_dir) / os.path.expanduser(path)))
