"""The page as a newcomer sees it, in a real Chromium (Debian's, which has no emoji font): the seed
buttons are words, the results galleries are not upload targets, and each Cancel button is idle
(grey, unclickable) until there is a job to cancel, the red stop button while there is one, and
idle again after. Same setup as tests/test_browser.py: `app.py serve --demo` on loopback."""
from __future__ import annotations

import os
import re

import pytest
from PIL import Image

from tests.browser_helpers import LOOPBACK, start_server_on
from tests.fake_model_host import FakeModelHost, tiny_turbo_catalog
# The module's fixtures: one Chromium, one --demo server.
from tests.test_browser import WAIT_MS, browser, generate, open_page, server, wait_for_state  # noqa: F401

pytestmark = pytest.mark.browser

# Pictographs, dingbats and the emoji presentation selector: without an emoji font, an empty box.
EMOJI = re.compile("[\u2190-\u21ff\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\ufe0e\ufe0f\U0001f000-\U0001faff]")


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def text_box(page, selector: str) -> dict:
    """The element's visible text and the size its rendered text takes."""
    return page.eval_on_selector(selector, """el => {
        const range = document.createRange();
        range.selectNodeContents(el);
        const box = range.getBoundingClientRect();
        return {text: el.innerText.trim(), width: box.width, height: box.height};
    }""")


def cancel_state(page, elem_id: str) -> tuple[bool, bool]:
    """(clickable, stop-styled) of a Cancel button."""
    button = page.locator(f"#{elem_id}")
    return button.is_enabled(), "stop" in (button.get_attribute("class") or "").split()


def wait_idle(page, elem_id: str) -> None:
    page.wait_for_function(f"() => document.getElementById('{elem_id}').disabled")
    assert cancel_state(page, elem_id) == (False, False)


def record_cancel_states(page, elem_id: str) -> None:
    """Keep each (clickable, stop-styled) the button shows, for jobs too quick to catch running."""
    page.evaluate("""id => {
        window.cancelSeen = [];
        const note = () => {
            const b = document.getElementById(id);
            if (b) window.cancelSeen.push([!b.disabled, b.classList.contains('stop')]);
        };
        new MutationObserver(note).observe(document.getElementById(id).parentElement,
                                           {subtree: true, childList: true, attributes: true});
    }""", elem_id)


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_the_seed_buttons_are_words_that_render_and_still_work(page, mode):
    if mode == "img2img":
        page.get_by_role("tab", name="Image to image").click()
    for button in ("random-seed", "reuse-seed"):
        shown = text_box(page, f"#{mode}-{button}")
        assert shown["text"] and not EMOJI.search(shown["text"]), shown
        assert shown["text"].isascii() and shown["width"] > 10 and shown["height"] > 5, shown
    row = page.locator(f"#{mode}-random-seed").locator("xpath=..")
    assert row.get_by_role("button", name="Random", exact=True).count() == 1  # its accessible name: the word
    seed = page.locator(f"#{mode}-seed input")
    seed.fill("1234")
    seed.blur()
    page.click(f"#{mode}-random-seed")
    page.wait_for_function(f"() => document.querySelector('#{mode}-seed input').value === '-1'")
    seed.fill("1234")
    seed.blur()
    page.click(f"#{mode}-reuse-seed")  # no image made yet on this page: back to random
    page.wait_for_function(f"() => document.querySelector('#{mode}-seed input').value === '-1'")


@pytest.mark.parametrize("mode, tab", [("txt2img", "Text to image"), ("img2img", "Image to image")])
def test_the_results_gallery_is_not_an_upload_target(page, mode, tab):
    page.get_by_role("tab", name=tab).click()
    gallery = page.locator(f"#{mode}-gallery")
    gallery.wait_for()
    text = gallery.inner_text()
    assert "Drop" not in text and "Upload" not in text and "Click to" not in text, text
    assert gallery.locator("input[type=file]").count() == 0
    assert gallery.locator("button[aria-label*='pload' i], [data-testid*='upload' i]").count() == 0


def test_txt2img_cancel_is_idle_until_a_job_runs_and_idle_again_after(page, server):
    assert cancel_state(page, "txt2img-cancel") == (False, False)
    generate(page, "txt2img", "a very long job", steps=150)
    page.wait_for_function("() => /Step \\d+\\/150/.test(document.querySelector('#txt2img-progress').innerText)")
    assert cancel_state(page, "txt2img-cancel") == (True, True)
    page.click("#txt2img-cancel")
    assert wait_for_state(page, "txt2img", "cancelled").startswith("Cancelled at step")
    wait_idle(page, "txt2img-cancel")

    generate(page, "txt2img", "a short one", steps=2)  # and after a job that ends by itself
    wait_for_state(page, "txt2img", "done")
    wait_idle(page, "txt2img-cancel")


def test_upscale_cancel_is_idle_until_a_job_runs_and_idle_again_after(page, tmp_path):
    Image.new("RGB", (48, 32), (200, 40, 40)).save(tmp_path / "small.png")
    page.get_by_role("tab", name="Upscale 4x").click()
    assert cancel_state(page, "upscale-cancel") == (False, False)
    page.set_input_files("#upscale-image input[type=file]", str(tmp_path / "small.png"))
    page.wait_for_selector("#upscale-image img")
    page.locator("#upscale-upscaler input").fill("Lanczos")
    page.locator("#upscale-upscaler input").press("Enter")
    record_cancel_states(page, "upscale-cancel")
    page.click("#upscale-run")
    wait_for_state(page, "upscale", "done")
    wait_idle(page, "upscale-cancel")
    assert [True, True] in page.evaluate("window.cancelSeen")  # armed while the job ran


PAYLOAD = os.urandom(2 * (1 << 20) + 7)


@pytest.fixture(scope="module")
def hub():
    hub = FakeModelHost().start()
    hub.add_hub_file("test/tiny", "tiny-turbo.safetensors", PAYLOAD)
    hub.pause_after = 1 << 20  # the download waits halfway, so Cancel is seen while it runs
    hub.finish_after_pause = True
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def download_server(hub, browser, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("look-downloads")
    catalog = tiny_turbo_catalog(tmp / "catalog.json", PAYLOAD)
    server = start_server_on(LOOPBACK, tmp, "--models-dir", str(tmp / "models"), "--catalog", str(catalog),
                             env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    yield server
    server.stop()


def test_the_download_panels_cancel_is_idle_until_a_download_runs(browser, download_server, hub):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.set_default_timeout(WAIT_MS)
        page.goto(download_server.url)
        page.wait_for_selector("#first-run-download")
        assert cancel_state(page, "first-run-cancel") == (False, False)
        page.click("#first-run-download")
        page.wait_for_function("() => /MB of 2\\.1 MB/.test(document.querySelector('#first-run-progress').innerText)")
        assert cancel_state(page, "first-run-cancel") == (True, True)
        with page.expect_response(lambda response: "/run/predict" in response.url):  # Cancel's unqueued event
            page.click("#first-run-cancel")
        hub.release.set()  # the rest comes; the download stops at its next piece
        page.wait_for_selector("#first-run-progress [data-state=cancelled]", state="attached")
        wait_idle(page, "first-run-cancel")
    finally:
        page.close()
