"""The page in a real Chromium on a server whose CPU has OpenVINO: the first job on a model says,
in its progress line, that the model is being prepared for the CPU (it takes a minute at full size).

The server is a process of its own, so the tests' patch that hides OpenVINO (tests/conftest.py)
does not reach it: its plan picks OpenVINO the way a user's would.
"""
from __future__ import annotations

import pytest
from PIL import Image

from tests.browser_helpers import chromium, start_server
from tests.test_browser import generate, open_page, record_progress, saved_pngs, wait_for_state

pytest.importorskip("openvino")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("openvino-server"), "--demo")  # a data folder with no cache
    yield server
    server.stop()


def test_the_first_job_shows_the_model_being_prepared_then_runs_on_openvino(browser, server):
    from engine.openvino_backend import PREPARING

    page = open_page(browser, server)
    record_progress(page, "txt2img")
    generate(page, "txt2img", "a lighthouse at dusk")
    assert wait_for_state(page, "txt2img", "done").startswith("Done: 1 image")
    assert PREPARING in page.evaluate("window.progressSeen")
    parameters = Image.open(saved_pngs(server, "txt2img")[-1]).info["parameters"]
    assert "Backend: openvino" in parameters
    page.close()
