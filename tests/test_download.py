"""Downloading a checkpoint: against a local HTTP server on 127.0.0.1 serving a generated
MoCo v3 checkpoint, cut off half-way once; the rerun resumes with a Range request, the
checksum is verified, and the backbone then loads the file offline. Whatever the server sends
is opened as a run opens it before it counts as downloaded."""

from __future__ import annotations

import functools
import hashlib
import http.server
import random
import subprocess
import sys
import threading

import pytest
import timm
import torch

from mim_agg.backbones.loading import describe_checkpoint
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


GARBAGE = {
    "random_bytes": (
        random.Random(0).randbytes(3000),
        r"cannot be read: it is truncated, damaged or not a",
    ),
    "a_web_page": (
        b"<html><body>Quota exceeded</body></html>",
        r"it holds text \(it begins '<html>",
    ),
}


@pytest.mark.parametrize("served", GARBAGE)
def test_a_file_that_does_not_open_as_a_checkpoint_is_moved_aside(tmp_path, served):
    payload, says = GARBAGE[served]
    server = Server(payload, content_type="application/octet-stream")
    target = tmp_path / "model.pth"
    try:
        with pytest.raises(UserError, match=says) as refused:
            download(server.url, target, timeout=5, check=describe_checkpoint)
    finally:
        server.close()
    bad = tmp_path / "model.pth.bad"
    assert f"It was moved aside to {bad} ({len(payload)} bytes" in str(refused.value)
    assert "rerun the same command to download it afresh" in str(refused.value)
    assert bad.read_bytes() == payload  # kept to look at, where no run or rerun reads it
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth.bad"]  # no .sha256, no .part


@pytest.mark.slow
def test_the_script_refuses_garbage_then_fetches_the_file_and_says_how_to_pin_it(
    tmp_path, checkpoint
):
    payload, _ = checkpoint
    server = Server(
        b"<html><body>Quota exceeded</body></html>", content_type="application/octet-stream"
    )
    overrides = ["backbone=mocov3_vits", f"backbone.url={server.url}", f"paths.root_dir={tmp_path}"]
    overrides.append("+backbone.arch_kwargs.depth=2")  # two blocks, as served
    script = [sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py"), *overrides]
    env = cli_environment(tmp_path)
    target = tmp_path / "weights" / "mocov3_vit-s-300ep.pth.tar"
    try:
        refused = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env)
        server.payload = payload  # the server behaves again
        fetched = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env)
    finally:
        server.close()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "is ready" not in refused.stdout
    (message,) = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert f"Checkpoint {str(target)!r} cannot be read: it holds text" in message
    assert f"It was moved aside to {target}.bad" in message

    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert target.read_bytes() == payload
    digest = hashlib.sha256(payload).hexdigest()
    assert f"{target} is ready (mocov3 format, " in fetched.stdout
    assert f"add the line `sha256: {digest}` to conf/backbone/mocov3_vits.yaml" in fetched.stdout
    assert f"backbone.sha256={digest}" in fetched.stdout


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


class HubServer:
    """The two answers huggingface_hub needs for one file of a model repository (HEAD with
    the commit and ETag, then GET), under ``HF_ENDPOINT``; anything else is not found."""

    def __init__(self, filename: str, payload: bytes) -> None:
        commit, etag = "0123456789abcdef" * 2 + "01234567", hashlib.sha256(payload).hexdigest()

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, body: bool) -> None:
                if not self.path.split("?")[0].endswith(f"/resolve/main/{filename}"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def do_HEAD(self):  # noqa: N802 (http.server's name)
                self.answer(body=False)

            def do_GET(self):  # noqa: N802
                self.answer(body=True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def fetch_from_hub(url: str, payload: bytes, overrides: list[str], tmp_path):
    """``download_weights.py`` with ``overrides`` and ``backbone.url=url`` (a Hugging Face
    file's address), that file being ``payload``, served under a fake ``HF_ENDPOINT`` on
    127.0.0.1 (the address's host becomes it); the finished script."""
    hub = HubServer(url.rsplit("/", 1)[1], payload)
    served = hub.url + "/" + url.split("://", 1)[1].split("/", 1)[1]
    script = [sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py"), *overrides]
    try:
        return subprocess.run(
            [*script, f"backbone.url={served}"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**cli_environment(tmp_path), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        )
    finally:
        hub.close()


@pytest.mark.slow
def test_the_script_prefetches_a_timm_tag_that_then_loads_offline(tmp_path):
    from safetensors.torch import save

    from mim_agg.backbones import FrozenBackbone
    from tests.helpers import TINY_ARCH

    tag = f"{TINY_ARCH}.augreg_in21k"  # in no other test's hub cache
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in timm.create_model(TINY_ARCH).state_dict().items()}
    hub = HubServer("model.safetensors", save(weights))
    script = [sys.executable, str(PROJECT_ROOT / "scripts" / "download_weights.py")]
    env = {**cli_environment(tmp_path), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    try:
        fetched = subprocess.run(
            [*script, "backbone=vit_tiny", f"backbone.weights={tag}"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    finally:
        hub.close()
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert f"backbone.weights={tag} is ready in the Hugging Face cache" in fetched.stdout
    backbone = FrozenBackbone(TINY_ARCH, weights=tag, img_size=224)  # offline, from that cache
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], msg=key)


def test_the_script_refuses_weights_of_another_architecture(tmp_path, tiny_state_dict, capsys):
    """Weights that load as a checkpoint but do not fit the backbone's architecture (ViT-Ti
    served for MoCo v3 ViT-S) are not called ready: a run would refuse them."""
    import runpy

    served = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, served)
    server = Server(served.read_bytes())
    script = runpy.run_path(str(PROJECT_ROOT / "scripts" / "download_weights.py"))
    try:
        status = script["main"](
            ["backbone=mocov3_vits", f"backbone.url={server.url}", f"paths.root_dir={tmp_path}"]
        )
    finally:
        server.close()
    err = capsys.readouterr().err
    assert status == 2 and "does not fit backbone.arch=vit_small_patch16_224" in err
    assert (tmp_path / "weights" / "mocov3_vit-s-300ep.pth.tar.bad").is_file()
    assert script["main"](["backbone=mocov3_vit_s"]) == 2  # a misspelled name: one message
    assert "Error: backbone=mocov3_vit_s: no such option. Did you mean backbone=mocov3_vits?" in (
        capsys.readouterr().err
    )


def test_a_url_that_is_not_found_says_to_check_it_not_to_rerun(tmp_path):
    served = tmp_path / "empty"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/nothing.pth"
    try:
        with pytest.raises(UserError, match=r"answers 404 .*Check backbone.url") as refused:
            download(url, tmp_path / "weights.pth")
    finally:
        httpd.shutdown()
    assert "Rerun" not in str(refused.value) and not (tmp_path / "weights.pth").exists()


def test_a_hugging_face_file_that_cannot_be_fetched_says_what_to_check(tmp_path):
    """A repository file's address goes to Hugging Face's client (offline here, as in every
    test): its error is named with the URL, the licence page and the login a gated one needs."""
    url = "https://huggingface.co/facebook/PE-Core-B16-224/resolve/main/PE-Core-B16-224.pt"
    with pytest.raises(
        UserError,
        match=r"PE-Core-B16-224\.pt could not be fetched \(\w+Error: .*\)\. Check backbone\.url; "
        r"a repository .* at https://huggingface\.co/facebook/PE-Core-B16-224, and logged in",
    ):
        download(url, tmp_path / "PE-Core-B16-224.pt")
    assert not (tmp_path / "PE-Core-B16-224.pt").exists()
