"""`app.py download` end to end, against a fake model host on 127.0.0.1 (never the internet): a
catalogue entry lands in its models folder with a progress bar; killed halfway, the next run resumes
with a Range request; a link is refused in one line; offline, one error line and nothing in models/."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser_helpers import LOOPBACK, REPO, free_port
from tests.fake_model_host import FakeModelHost, tiny_turbo_catalog

PAYLOAD = os.urandom(3 * (1 << 20) + 17)  # not a real checkpoint: download does not load it
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def hub():
    server = FakeModelHost().start()
    server.add_hub_file("test/tiny", "tiny-turbo.safetensors", PAYLOAD)
    yield server
    server.stop()


def catalog(tmp_path: Path) -> Path:
    return tiny_turbo_catalog(tmp_path / "catalog.json", PAYLOAD)


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "app.py"), "download", *args, "--models-dir", str(tmp_path / "models"),
            "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--catalog", str(catalog(tmp_path))]


def environment(tmp_path: Path, **env: str) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}


def download(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp_path, *args), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=environment(tmp_path, **env))


def model_files(tmp_path: Path) -> list[Path]:
    models = tmp_path / "models"
    return [p for p in models.rglob("*") if p.is_file()] if models.exists() else []


def test_download_without_a_name_fetches_the_recommended_checkpoint_with_a_progress_bar(tmp_path, hub):
    done = download(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    dest = tmp_path / "models" / "Stable-diffusion" / "tiny-turbo.safetensors"
    assert done.stdout.strip().splitlines() == [str(dest)]
    assert dest.read_bytes() == PAYLOAD and model_files(tmp_path) == [dest]
    assert "3.15M/3.15M" in done.stderr  # tqdm's bar reached the whole size


def test_download_of_a_model_already_on_disk_does_not_touch_the_network(tmp_path, hub):
    dest = tmp_path / "models" / "Stable-diffusion" / "tiny-turbo.safetensors"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"mine")
    done = download(tmp_path, "tiny-turbo", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(dest)
    assert dest.read_bytes() == b"mine" and hub.requests == []


def test_a_download_killed_halfway_resumes_with_a_range_request(tmp_path, hub):
    hub.pause_after = 1 << 20  # the first download gets 1 MiB, then the server waits
    process = subprocess.Popen(command(tmp_path, "tiny-turbo"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, env=environment(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"))
    part = tmp_path / "data" / "downloads" / f"sha256-{SHA}.part"
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.stat().st_size == 1 << 20):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    hub.release.set()
    assert model_files(tmp_path) == []

    done = download(tmp_path, "tiny-turbo", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "models" / "Stable-diffusion" / "tiny-turbo.safetensors").read_bytes() == PAYLOAD
    assert hub.ranges_seen() == [f"bytes={1 << 20}-"]
    assert not part.exists()


def test_list_prints_the_catalogue_with_advice_and_says_it_needs_the_internet_offline(tmp_path):
    done = download(tmp_path, "--list", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny-turbo: Tiny turbo (3.1 MB, test)" in done.stdout
    assert "recommended: few steps" in done.stdout
    assert "needs the internet (offline now)" in done.stdout


def assert_one_line_failure(done: subprocess.CompletedProcess, tmp_path: Path, code: int, text: str) -> None:
    assert done.returncode == code
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and text in lines[0] and "Traceback" not in done.stderr
    assert model_files(tmp_path) == []


def test_download_offline_fails_with_one_line_and_nothing_in_models(tmp_path):
    done = download(tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_failure(done, tmp_path, 1, "needs the internet, and HF_HUB_OFFLINE is set")


def test_download_with_the_hub_unreachable_fails_with_one_line_and_nothing_in_models(tmp_path):
    done = download(tmp_path, HF_ENDPOINT=f"http://{LOOPBACK}:{free_port()}", HF_HUB_OFFLINE="0")
    assert_one_line_failure(done, tmp_path, 1, "are you online?")


def test_download_of_an_http_link_is_bad_input_in_one_line(tmp_path):
    done = download(tmp_path, f"http://{LOOPBACK}:{free_port()}/model.safetensors")
    assert_one_line_failure(done, tmp_path, 2, "url: must be an https:// link")
