"""The catalogue's recommended upscaler from the page, in a real Chromium: RealESRGAN x4plus, built
tiny in the layout xinntao ships (`{"params_ema": ..., "params": ...}`), is downloaded from the
Models tab (a fake https host stands in for GitHub's release link) and then upscales a 512x512
image to 2048x2048 on the Upscale tab, without a restart."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.catalog import CATALOG_PATH
from tests.browser_helpers import LOOPBACK, chromium, start_server_on
from tests.fake_model_host import FakeModelHost
from tests.field_files import realesrgan_x4plus

pytestmark = pytest.mark.browser

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("field-upscaler-page")
    buffer = io.BytesIO()
    realesrgan_x4plus(buffer)
    data = buffer.getvalue()
    files = FakeModelHost(tls_dir=tmp).start()
    (bundled,) = [e for e in json.loads(CATALOG_PATH.read_text())["models"] if e["name"] == "realesrgan-x4plus"]
    entry = {**bundled, "url": files.add_file(bundled["file"], data), "sha256": hashlib.sha256(data).hexdigest(),
             "size": len(data)}
    (tmp / "catalog.json").write_text(json.dumps({"models": [entry]}))
    server = start_server_on(LOOPBACK, tmp, "--models-dir", str(tmp / "models"), "--catalog", str(tmp / "catalog.json"),
                             env={"REQUESTS_CA_BUNDLE": str(files.ca_file)})
    server.models = tmp / "models"
    yield server
    server.stop()
    files.stop()


def test_realesrgan_x4plus_downloaded_from_the_page_upscales_512_to_2048(server, tmp_path):
    source = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB").save(source)
    for browser in chromium():
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(server.url)
        page.get_by_role("tab", name="Models").click()
        page.locator("#models-downloads-choice input").fill("realesrgan-x4plus")
        page.locator("#models-downloads-choice input").press("Enter")
        page.click("#models-downloads-download")
        page.wait_for_selector("#models-downloads-progress [data-state=done]", state="attached")
        assert (server.models / "RealESRGAN" / "RealESRGAN_x4plus.pth").is_file()

        page.get_by_role("tab", name="Upscale").click()
        page.set_input_files("#upscale-image input[type=file]", str(source))
        page.wait_for_selector("#upscale-image img")
        page.locator("#upscale-upscaler input").click()
        page.get_by_role("option", name="RealESRGAN_x4plus").click()
        page.locator("#upscale-scale").get_by_label("4").check()
        page.click("#upscale-run")
        page.wait_for_selector("#upscale-progress [data-state=done]")
        assert page.inner_text("#upscale-progress") == "Done: 2048x2048"
        (saved,) = (server.outdir / "upscale").rglob("*.png")
        with Image.open(saved) as result:
            assert result.size == (2048, 2048)
            assert "Postprocess upscaler: RealESRGAN_x4plus" in result.info["parameters"]
        page.close()
