"""Fetch a file over HTTP(S) with a progress bar, resuming a partial download, checksummed.

The bytes go to ``<file>.part`` and are renamed to ``<file>`` only when complete (and, when a
SHA-256 is known, verified): a reader never sees a half-downloaded checkpoint, and a rerun
after an interruption asks the server for the rest (an HTTP ``Range`` request).
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mim_agg.errors import UserError
from mim_agg.utils.files import sha256_of, write_atomic

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def download(url: str, target: Path | str, sha256: str | None = None, timeout: float = 30) -> Path:
    """``target`` holding ``url``'s bytes; an existing complete ``target`` is kept as it is."""
    target = Path(target)
    if target.is_file():
        log.info("%s is there already.", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    try:
        _fetch(url, part, done, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        kept = part.stat().st_size if part.is_file() else 0
        progress = f"{kept} bytes are kept in {part}. " if kept else ""
        raise UserError(
            f"Downloading {url} stopped ({type(error).__name__}: {error}); {progress}Rerun the "
            f"same command to continue, or fetch the file by other means to {target}."
        ) from None
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise UserError(
            f"{url} arrived with SHA-256 {digest}, not the configured {sha256}; the file was "
            "deleted. Check backbone.url / backbone.sha256 and download again."
        )
    os.replace(part, target)
    write_atomic(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n")
    log.info("Downloaded %s (SHA-256 %s).", target, digest)
    return target


def _fetch(url: str, part: Path, done: int, timeout: float) -> None:
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # nothing left: the part is complete
            return
        raise
    with response:
        if response.headers.get_content_type() == "text/html":
            target = part.with_name(part.name.removesuffix(".part"))
            raise UserError(
                f"{url} answered with a web page, not the checkpoint (Google Drive does so for "
                "large files, asking to confirm); nothing was kept. Fetch the file in a browser "
                f"and save it as {target}."
            )
        if done and response.status != 206:  # the server ignored the range: start over
            done = 0
        length = int(response.headers.get("Content-Length") or 0)
        with (
            open(part, "ab" if done else "wb") as file,
            tqdm(total=done + length or None, initial=done, unit="B", unit_scale=True,
                 desc=part.name.removesuffix(".part")) as bar,
        ):  # fmt: skip
            while chunk := response.read(CHUNK):
                file.write(chunk)
                bar.update(len(chunk))
        if length and part.stat().st_size < done + length:
            raise http.client.IncompleteRead(b"", done + length - part.stat().st_size)
