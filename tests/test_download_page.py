"""Getting a model from the page, in a real Chromium: a server with no model shows the catalogue
under the "No model found" banner; Download shows a progress bar, and when the file is in place the
new model is selected. The catalogue (`--catalog`) points at a fake hub on loopback (HF_ENDPOINT);
the link box at a fake https host whose certificate the test made (REQUESTS_CA_BUNDLE)."""
from __future__ import annotations

import json
import os

import pytest

from tests.browser_helpers import LOOPBACK, chromium, start_server_on
from tests.fake_model_host import FakeModelHost, tiny_turbo_catalog

pytestmark = pytest.mark.browser

WAIT_MS = 90_000
PAYLOAD = os.urandom(3 * (1 << 20) + 99)
LINKED = (lambda header: len(header).to_bytes(8, "little") + header + os.urandom(1 << 20))(
    json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode())


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    hub = FakeModelHost().start()
    hub.add_hub_file("test/tiny", "tiny-turbo.safetensors", PAYLOAD)
    hub.pause_after = 1 << 20  # the first download waits halfway, so the page's bar is seen mid-way
    hub.finish_after_pause = True
    files = FakeModelHost(tls_dir=tmp_path_factory.mktemp("tls")).start()
    yield hub, files
    hub.stop()
    files.stop()


@pytest.fixture(scope="module")
def server(hosts, tmp_path_factory):
    hub, files = hosts
    tmp = tmp_path_factory.mktemp("download-page")
    catalog = tiny_turbo_catalog(tmp / "catalog.json", PAYLOAD)
    server = start_server_on(LOOPBACK, tmp, "--models-dir", str(tmp / "models"), "--catalog", str(catalog),
                             env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                                  "REQUESTS_CA_BUNDLE": str(files.ca_file)})
    server.models = tmp / "models"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    for browser in chromium():
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(server.url)
        yield page
        page.close()


def test_the_first_run_page_downloads_the_recommended_model_with_progress_and_selects_it(page, server, hosts):
    hub, _ = hosts
    page.wait_for_selector("#easel-banner", state="attached")
    assert "No model found" in page.inner_text("#easel-banner")
    catalogue = page.inner_text("#first-run-catalog")
    assert "Tiny turbo" in catalogue and "recommended" in catalogue and "needs the internet" in catalogue
    assert page.input_value("#first-run-choice input") == "tiny-turbo"

    page.click("#first-run-download")
    page.wait_for_function("() => /MB of 3\\.1 MB/.test(document.querySelector('#first-run-progress').innerText)")
    assert page.locator("#first-run-progress [data-state=running]").count() == 1  # the bar, mid-way
    hub.release.set()

    page.locator(".toast-body", has_text="Downloaded tiny-turbo.safetensors and selected it").first.wait_for()
    page.wait_for_function("() => document.querySelector('#model-select input').value === 'tiny-turbo.safetensors'")
    page.wait_for_selector("#first-run", state="hidden")  # a model exists now: the first-run panel goes
    assert "No model found" not in page.inner_text("#easel-banner")
    assert (server.models / "Stable-diffusion" / "tiny-turbo.safetensors").read_bytes() == PAYLOAD
    assert f"bytes={1 << 20}-" not in hub.ranges_seen()  # one unbroken download


def test_a_pasted_https_link_is_downloaded_and_selected(page, server, hosts):
    _, files = hosts
    url = files.add_file("linked-model.safetensors", LINKED)
    page.get_by_role("tab", name="Models").click()
    page.fill("#models-downloads-link textarea, #models-downloads-link input", url)
    page.click("#models-downloads-download-link")
    page.wait_for_selector("#models-downloads-progress [data-state=done]", state="attached")
    page.wait_for_function("() => document.querySelector('#model-select input').value === 'linked-model.safetensors'")
    assert (server.models / "Stable-diffusion" / "linked-model.safetensors").read_bytes() == LINKED


def test_a_pasted_http_link_is_refused_in_one_line(page, server):
    page.get_by_role("tab", name="Models").click()
    page.fill("#models-downloads-link textarea, #models-downloads-link input", f"http://{LOOPBACK}:9/m.safetensors")
    page.click("#models-downloads-download-link")
    page.locator(".toast-body", has_text="url: must be an https:// link").first.wait_for()
    assert "failed" == page.get_attribute("#models-downloads-progress [data-state]", "data-state")
