"""Downloading a checkpoint: against a local HTTP server on 127.0.0.1 serving a generated
MoCo v3 checkpoint, cut off half-way once; the rerun resumes with a Range request, the
checksum is verified, and the backbone then loads the file offline."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading

import pytest
import torch

from mim_agg.builders import build_backbone
from mim_agg.errors import UserError
from mim_agg.utils.download import download
from tests.helpers import PROJECT_ROOT, cli_environment, compose_config
from tests.test_formats import IMAGES, reference_tokens, vit_weights


class Server:
    """Serves ``payload`` at /file with Range support; the first ``cut`` responses stop
    half-way (the connection drops)."""

    def __init__(self, payload: bytes, cut: int = 0, content_type: str | None = None) -> None:
        self.payload, self.cut, self.ranges = payload, cut, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                body = outer.payload[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.end_headers()
                if outer.cut > 0:
                    outer.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def checkpoint(tmp_path) -> tuple[bytes, dict]:
    encoder = vit_weights(seed=1)
    path = tmp_path / "served.pth"
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in encoder.items()}}, path)
    return path.read_bytes(), encoder


def test_an_interrupted_download_resumes_and_is_checked(tmp_path, checkpoint):
    payload, _ = checkpoint
    server = Server(payload, cut=1)
    target = tmp_path / "weights" / "model.pth"
    digest = hashlib.sha256(payload).hexdigest()
    try:
        with pytest.raises(UserError, match="Rerun the same command to continue"):
            download(server.url, target, digest, timeout=5)
        part = target.with_name("model.pth.part")
        assert 0 < part.stat().st_size < len(payload) and not target.exists()
        download(server.url, target, digest, timeout=5)
    finally:
        server.close()
    assert target.read_bytes() == payload and not part.exists()
    assert server.ranges == [None, f"bytes={len(payload) // 2}-"]
    assert (tmp_path / "weights" / "model.pth.sha256").read_text().startswith(digest)


def test_a_wrong_checksum_deletes_the_file(tmp_path, checkpoint):
    server = Server(checkpoint[0])
    try:
        with pytest.raises(UserError, match="not the configured 000"):
            download(server.url, tmp_path / "model.pth", "000", timeout=5)
    finally:
        server.close()
    assert not list(tmp_path.glob("model.pth*"))


def test_a_web_page_instead_of_the_file_is_refused_and_not_kept(tmp_path):
    server = Server(b"<html>Google Drive can't scan this file</html>", content_type="text/html")
    try:
        with pytest.raises(UserError, match="answered with a web page, not the checkpoint"):
            download(server.url, tmp_path / "model.pth", timeout=5)
    finally:
        server.close()
    assert not list(tmp_path.glob("model.pth*"))


@pytest.mark.slow
def test_the_script_fetches_a_backbone_that_then_loads_offline(tmp_path, checkpoint):
    payload, encoder = checkpoint
    server = Server(payload)
    overrides = [
        "backbone=mocov3_vits",
        f"backbone.url={server.url}",
        f"backbone.sha256={hashlib.sha256(payload).hexdigest()}",
        "+backbone.arch_kwargs.depth=2",  # two blocks, as served
        f"paths.root_dir={tmp_path}",
    ]
    try:
        result = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py"), *overrides],
            capture_output=True,
            text=True,
            timeout=300,
            env=cli_environment(tmp_path),
        )
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = compose_config(overrides, tmp_path)
    assert (tmp_path / "weights" / "mocov3_vit-s-300ep.pth.tar").read_bytes() == payload
    tokens = build_backbone(cfg)(IMAGES).all
    torch.testing.assert_close(
        tokens, reference_tokens(encoder, IMAGES, heads=12), atol=1e-5, rtol=1e-5
    )
