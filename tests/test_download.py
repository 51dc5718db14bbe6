"""`app.py download` end to end, against a fake Hugging Face hub on 127.0.0.1 (never the internet):
the file lands in models/Stable-diffusion; offline or unreachable, one error line and no partial file."""
from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.download import DEFAULT_MODEL
from tests.browser_helpers import LOOPBACK, REPO, free_port

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # not a real checkpoint: download does not read it
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers the hub's `resolve` URL for the default model, as huggingface.co does (HEAD with the
    commit, ETag and size headers; GET with the bytes, honouring a Range); 404 for anything else."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        super().__init__((LOOPBACK, 0), Handler)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    wanted = f"/{DEFAULT_MODEL.repo_id}/resolve/main/{DEFAULT_MODEL.filename}"

    def log_message(self, *args):
        pass

    def _answer(self, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        if self.path.split("?")[0] != self.wanted:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, status = PAYLOAD, 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0])
            data, status = PAYLOAD[start:], 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(PAYLOAD).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {len(PAYLOAD) - len(data)}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture()
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def download(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, str(REPO / "app.py"), "download", "--models-dir", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=environment)


def checkpoint_files(models: Path) -> list[Path]:
    """The checkpoint, or a partial download of it (huggingface_hub's `.incomplete` files); its
    `.lock`/`.metadata` bookkeeping under `.cache/` is neither."""
    return [p for p in models.rglob("*") if p.is_file() and (p.name == DEFAULT_MODEL.filename or p.name.endswith(".incomplete"))]


def test_download_fetches_the_default_model_into_the_checkpoint_folder(tmp_path, hub):
    done = download(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    dest = tmp_path / "models" / "Stable-diffusion" / DEFAULT_MODEL.filename
    assert done.stdout.strip().splitlines()[-1] == str(dest)
    assert dest.read_bytes() == PAYLOAD
    assert checkpoint_files(tmp_path / "models") == [dest]  # no .incomplete part left behind
    assert ("GET", Handler.wanted) in hub.requests


def test_download_of_a_model_already_on_disk_does_not_touch_the_network(tmp_path, hub):
    dest = tmp_path / "models" / "Stable-diffusion" / DEFAULT_MODEL.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"mine")
    done = download(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(dest)
    assert dest.read_bytes() == b"mine" and hub.requests == []


def assert_one_line_failure(done: subprocess.CompletedProcess, models: Path) -> None:
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: download:") and "Traceback" not in done.stderr
    assert checkpoint_files(models) == []


def test_download_offline_fails_with_one_line_and_no_partial_file(tmp_path):
    done = download(tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_failure(done, tmp_path / "models")


def test_download_with_the_hub_unreachable_fails_with_one_line_and_no_partial_file(tmp_path):
    done = download(tmp_path, HF_ENDPOINT=f"http://{LOOPBACK}:{free_port()}", HF_HUB_OFFLINE="0")
    assert_one_line_failure(done, tmp_path / "models")
