"""Fetch a file over HTTP(S) with a progress bar, resuming a partial download, checksummed.

The bytes go to ``<file>.part`` and are renamed to ``<file>`` only when complete (and, when a
SHA-256 is known, verified): a reader never sees a half-downloaded checkpoint, and a rerun
after an interruption asks the server for the rest (an HTTP ``Range`` request). A complete
file is then opened as its reader will open it (``check``); one that does not open is moved
aside, so that a rerun fetches it afresh. A file of a Hugging Face repository (its
``resolve`` URL) is fetched by Hugging Face's client instead, which resumes too and sends the
user's token, so a repository whose licence must be accepted serves the user who accepted it.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from tqdm import tqdm

from mim_agg.errors import UserError
from mim_agg.utils.files import sha256_of, write_atomic

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def download(
    url: str,
    target: Path | str,
    sha256: str | None = None,
    timeout: float = 30,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """``target`` holding ``url``'s bytes; an existing complete ``target`` is kept as it is.

    ``check(target)`` (reading it as a run will) must pass before the file counts as there, a
    file kept from before included: a server can answer with anything (a quota page served as
    ``application/octet-stream``, a truncated body of the announced length).
    """
    target = Path(target)
    if target.is_file():
        log.info("%s is there already.", target)
    elif (hub := hub_file(url)) is not None:
        _download_from_hub(url, *hub, target, sha256)
    else:
        _download(url, target, sha256, timeout)
    if check is not None:
        _checked(target, check)
    return target


def _download(url: str, target: Path, sha256: str | None, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.is_file() else 0
    try:
        _fetch(url, part, done, timeout)
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise UserError(
                f"Downloading {url} stopped: the server answers {error.code} ({error.reason}); "
                f"rerun the same command later, or fetch the file by other means to {target}."
            ) from None
        raise UserError(
            f"{url} answers {error.code} ({error.reason}): the file is not there for us. Check "
            f"backbone.url, or fetch the file by other means to {target}."
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        kept = part.stat().st_size if part.is_file() else 0
        progress = f"{kept} bytes are kept in {part}. " if kept else ""
        raise UserError(
            f"Downloading {url} stopped ({type(error).__name__}: {error}); {progress}Rerun the "
            f"same command to continue, or fetch the file by other means to {target}."
        ) from None
    _settle(part, target, url, sha256)


def _settle(fetched: Path, target: Path, url: str, sha256: str | None) -> None:
    """The complete ``fetched`` bytes checked against ``sha256`` and moved to ``target``."""
    digest = sha256_of(fetched)
    if sha256 is not None and digest != sha256:
        fetched.unlink()
        raise UserError(
            f"{url} arrived with SHA-256 {digest}, not the configured {sha256}; the file was "
            "deleted. Check backbone.url / backbone.sha256 and download again."
        )
    os.replace(fetched, target)
    write_atomic(_digest_file(target), f"{digest}  {target.name}\n")
    log.info("Downloaded %s (SHA-256 %s).", target, digest)


def hub_file(url: str) -> tuple[str, str, str] | None:
    """``(repository, revision, filename)`` of a Hugging Face file's address,
    ``<endpoint>/<owner>/<name>/resolve/<revision>/<filename>`` (the endpoint is
    ``HF_ENDPOINT``'s, huggingface.co by default); None for any other URL."""
    prefix = constants.ENDPOINT.rstrip("/") + "/"
    found = re.fullmatch(
        r"([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.split("?")[0].removeprefix(prefix)
    )
    return found.groups() if url.startswith(prefix) and found else None


def _download_from_hub(url: str, repo: str, revision: str, filename: str, target: Path, sha256):
    """The file through Hugging Face's client, into ``target``'s folder (its bookkeeping in
    ``.cache/huggingface`` there), then checked and named as ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetched = hf_hub_download(repo, filename, revision=revision, local_dir=target.parent)
    except (OSError, EntryNotFoundError) as error:  # the client's errors, gated repos' too
        raise UserError(
            f"{url} could not be fetched ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}). Check backbone.url; a repository whose licence "
            f"must be accepted serves its files once you have, at {constants.ENDPOINT}/{repo}, "
            f"and logged in here (hf auth login, or HF_TOKEN); or fetch the file by other means "
            f"to {target}."
        ) from None
    _settle(Path(fetched), target, url, sha256)


def _checked(target: Path, check: Callable[[Path], object]) -> None:
    """Run ``check``; a file it refuses is renamed ``<file>.bad``, not deleted (what the server
    sent, often a page about a quota or a sign-in, says what went wrong), and no longer stands
    where a run or a rerun looks."""
    try:
        check(target)
    except UserError as error:
        bad = target.with_name(target.name + ".bad")
        os.replace(target, bad)
        _digest_file(target).unlink(missing_ok=True)
        raise UserError(
            f"{error} It was moved aside to {bad} ({bad.stat().st_size} bytes; look inside for "
            "what the server sent, then delete it); rerun the same command to download it "
            f"afresh, or fetch the file by other means to {target}."
        ) from None


def _digest_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


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
