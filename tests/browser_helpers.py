"""Starting `app.py serve` as a real process on loopback, for the server and browser tests."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"  # these tests never send traffic anywhere else


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def serve_command(tmp: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "app.py"), "serve", "--no-browser", "--port", str(port),
            "--outdir", str(tmp / "outputs"), "--data-dir", str(tmp / "data"), *extra]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    outdir: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_server(tmp: Path, *extra: str, timeout: float = 180) -> Server:
    """Start the server (loopback only) and wait until it answers HTTP; fail with its log if it dies."""
    return start_server_on(LOOPBACK, tmp, *extra, timeout=timeout)


def start_server_on(host: str, tmp: Path, *extra: str, env: dict | None = None, timeout: float = 180) -> Server:
    """Like start_server, but reached at `host` (the address given to --listen, which must be loopback
    or an address the calling test created itself) and with extra environment variables (`env`)."""
    import os

    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(serve_command(tmp, port, *extra), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(process, f"http://{host}:{port}", log, tmp / "outputs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            requests.get(server.url + "/", timeout=2)  # any answer (even 401/403) means it is up
            return server
        except requests.ConnectionError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not answer within {timeout:.0f}s:\n{server.log_text()[-3000:]}")


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium(*extra_args: str):
    """A generator for a module fixture: Debian's Chromium driven by Playwright, closed afterwards.
    Without Chromium the tests skip, except under CI, where they fail."""
    import os

    import pytest

    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args])
    yield browser
    browser.close()
    playwright.stop()
