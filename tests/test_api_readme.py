"""The README's HTTP API examples (a curl command, a webuiapi script) run as written against a
real server; only the port is the test server's instead of 7860."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.browser_helpers import start_server

ROOT = Path(__file__).resolve().parent.parent


def api_examples() -> list[str]:
    """The indented code blocks of the README's "HTTP API" section, in order."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## HTTP API\n", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines():
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
        elif current:
            blocks.append("\n".join(current).strip() + "\n")
            current = []
    return blocks + (["\n".join(current).strip() + "\n"] if current else [])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("readme-api"), "--demo")
    server.port = server.url.rsplit(":", 1)[1]
    yield server
    server.stop()


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def lighthouse(path: Path) -> Image.Image:
    image = Image.open(path)
    assert image.size == (256, 256)
    return image


def test_the_readme_has_a_curl_and_a_webuiapi_example():
    curl, script = api_examples()
    assert curl.startswith("curl ") and "/sdapi/v1/txt2img" in curl
    assert script.startswith("import webuiapi") and "api.txt2img(" in script


def test_the_curl_example_works_as_written(server, tmp_path):
    curl = api_examples()[0].replace(":7860", f":{server.port}")
    result = run(["bash", "-c", curl], tmp_path)
    assert result.returncode == 0, result.stderr
    parameters = lighthouse(tmp_path / "lighthouse.png").info["parameters"]  # the PNG as the API sent it
    assert parameters.startswith("a lighthouse at dusk\n") and "Seed: 42" in parameters


def test_the_webuiapi_example_works_as_written(server, tmp_path):
    script = api_examples()[1].replace("port=7860", f"port={server.port}")
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    lighthouse(tmp_path / "lighthouse.png")  # saved again by Pillow, which writes no parameters chunk
    assert result.stdout.startswith("a lighthouse at dusk\nNegative prompt: blurry\n") and "Seed: 42" in result.stdout
