"""The README's two set-up commands are exactly these, and both work as written."""
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START, TEST = "./launch.sh", "bash scripts/run_tests.sh"


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_exactly_the_two_setup_commands():
    assert setup_commands() == [START, TEST]


def test_ci_runs_the_readmes_test_command():
    assert re.search(rf"^[^#]*{re.escape(TEST)}\s*$", (ROOT / ".ci/run").read_text(), re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Outside CI, only where ./venv was set up by the installer (so the launcher won't reinstall).
needs_venv = pytest.mark.skipif(not (ROOT / "venv" / "easel-install.json").is_file() and not os.environ.get("CI"),
                                reason="needs ./venv set up by the installer")


@needs_venv
def test_start_command_serves_the_page(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([*START.split(), "--demo", "--no-browser", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--outdir", str(tmp_path / "out")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and "Easel" in page.read().decode("utf-8", "replace")
                    return
            except OSError:
                time.sleep(1)
        pytest.fail("the page did not answer within 180 s")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@needs_venv
def test_test_command_runs_pytest():
    proc = subprocess.run([*TEST.split(), "tests/test_layers.py", "-q"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b[1-9]\d* passed\b", proc.stdout) and "failed" not in proc.stdout
