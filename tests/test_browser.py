"""The page in a real Chromium: `app.py serve --demo` on loopback, driven with Playwright.

Debian's chromium is used (`playwright install` cannot download here). Without it these tests
skip, except under CI, where they fail. A failing test leaves a screenshot in test-artifacts/.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from tests.browser_helpers import REPO, chromium, start_server

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
WAIT_MS = 90_000  # generous: two shared CPU cores; nothing here asserts on time


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("browser-server"), "--demo")
    yield server
    server.stop()


def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url)
    page.wait_for_selector("#txt2img-prompt textarea")
    return page


@pytest.fixture
def page(browser, server, request):
    page = open_page(browser, server)
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # the call phase is reported before teardown
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}.png"),
                        full_page=True)
    page.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's number box (Gradio commits it on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def record_progress(page, mode: str) -> None:
    """Keep every text the progress line shows, so a test can check progress appeared mid-run."""
    page.evaluate("""mode => {
        window.progressSeen = [];
        const node = document.querySelector(`#${mode}-progress`);
        new MutationObserver(() => window.progressSeen.push(node.innerText))
            .observe(node, {subtree: true, childList: true, characterData: true});
    }""", mode)


def wait_for_state(page, mode: str, state: str) -> str:
    page.wait_for_selector(f"#{mode}-progress [data-state={state}]")
    return page.inner_text(f"#{mode}-progress")


def saved_pngs(server, mode: str) -> list[Path]:
    return sorted((server.outdir / mode).rglob("*.png"), key=lambda p: p.stat().st_mtime)


def generate(page, mode: str, prompt: str, negative: str = "", steps: int = 2, size=(64, 64)) -> None:
    """64x64 by default: the demo model's cost grows fast with size, and the CPU is shared."""
    page.fill(f"#{mode}-prompt textarea", prompt)
    page.fill(f"#{mode}-negative-prompt textarea", negative)
    set_number(page, f"{mode}-steps", steps)
    set_number(page, f"{mode}-width", size[0])
    set_number(page, f"{mode}-height", size[1])
    page.click(f"#{mode}-generate")


def send_a1111_png_to_txt2img(page, path: Path, parameters: str, prompt: str) -> None:
    """An A1111-made PNG (its infotext `parameters`, prompt first) dropped on PNG info and sent to
    txt2img: waits until the prompt box holds `prompt`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (64, 64), (90, 90, 200)).save(path, pnginfo=info)
    page.get_by_role("tab", name="PNG info").click()
    page.set_input_files("#pnginfo-image input[type=file]", str(path))
    page.wait_for_function(f"() => document.querySelector('#pnginfo-parameters textarea').value.includes({prompt!r})")
    page.click("#pnginfo-send-txt2img")
    page.wait_for_function(f"() => document.querySelector('#txt2img-prompt textarea').value === {prompt!r}")


def test_txt2img_shows_progress_and_saves_the_parameters(page, server):
    record_progress(page, "txt2img")
    generate(page, "txt2img", "a lighthouse at dusk", "blurry, text", steps=12)
    assert wait_for_state(page, "txt2img", "done").startswith("Done: 1 image")
    page.wait_for_selector("#txt2img-gallery img")
    assert any(re.search(r"Step \d+/12", text) for text in page.evaluate("window.progressSeen"))

    parameters = Image.open(saved_pngs(server, "txt2img")[-1]).info["parameters"]
    assert parameters.startswith("a lighthouse at dusk\nNegative prompt: blurry, text\nSteps: 12,")
    assert page.input_value("#txt2img-infotext textarea") == parameters


def test_speed_fast_is_chosen_on_the_page_and_recorded(page, server):
    page.locator("#txt2img-speed").get_by_label("fast").check()
    generate(page, "txt2img", "a quick sketch", steps=10)
    wait_for_state(page, "txt2img", "done")
    page.wait_for_selector("#txt2img-gallery img")
    parameters = Image.open(saved_pngs(server, "txt2img")[-1]).info["parameters"]
    assert parameters.startswith("a quick sketch\nSteps: 10,") and "Speed: fast" in parameters


def test_tiling_is_chosen_on_the_page_and_recorded(page, server):
    page.locator("#txt2img-tiling input[type=checkbox]").check()
    generate(page, "txt2img", "a tiled floor")
    wait_for_state(page, "txt2img", "done")
    page.wait_for_selector("#txt2img-gallery img")
    with Image.open(saved_pngs(server, "txt2img")[-1]) as image:
        assert image.info["parameters"].startswith("a tiled floor\n") and "Tiling: True" in image.info["parameters"]
    page.locator("#txt2img-tiling input[type=checkbox]").uncheck()


def test_hires_fix_is_chosen_on_the_page_and_recorded(page, server):
    page.locator("#txt2img-hires").get_by_text("Hires. fix", exact=True).first.click()  # open the accordion
    page.locator("#txt2img-enable-hr input[type=checkbox]").check()
    set_number(page, "txt2img-hr-scale", 1.5)
    generate(page, "txt2img", "a tall lighthouse", steps=2, size=(64, 64))
    wait_for_state(page, "txt2img", "done")
    page.wait_for_selector("#txt2img-gallery img")
    saved = Image.open(saved_pngs(server, "txt2img")[-1])
    assert saved.size == (96, 96)
    assert "Hires upscale: 1.5" in saved.info["parameters"] and "Hires upscaler: Latent" in saved.info["parameters"]


def test_upscale_tab_upscales_an_uploaded_image(page, server, tmp_path):
    Image.new("RGB", (48, 32), (200, 40, 40)).save(tmp_path / "small.png")
    page.get_by_role("tab", name="Upscale 4x").click()
    page.set_input_files("#upscale-image input[type=file]", str(tmp_path / "small.png"))
    page.wait_for_selector("#upscale-image img")
    page.locator("#upscale-upscaler input").fill("Lanczos")
    page.locator("#upscale-upscaler input").press("Enter")
    page.locator("#upscale-scale").get_by_label("2").check()
    page.click("#upscale-run")
    assert wait_for_state(page, "upscale", "done") == "Done: 96x64"
    page.wait_for_selector("#upscale-result img")
    assert "Postprocess upscaler: Lanczos" in page.locator("#upscale-infotext textarea").input_value()
    saved = saved_pngs(server, "upscale")[-1]
    assert Image.open(saved).size == (96, 64)


def test_a_txt2img_result_is_sent_to_upscale_and_shown_before_and_after(page, server):
    generate(page, "txt2img", "a small boat", steps=2, size=(96, 64))
    wait_for_state(page, "txt2img", "done")
    page.wait_for_selector("#txt2img-gallery img")
    made = saved_pngs(server, "txt2img")[-1]
    page.click("#txt2img-send-upscale")
    page.wait_for_selector("#upscale-image img")  # the Upscale tab is shown, holding the result
    page.locator("#upscale-upscaler input").fill("Lanczos")
    page.locator("#upscale-upscaler input").press("Enter")
    page.locator("#upscale-scale").get_by_label("2").check()
    page.click("#upscale-run")
    assert wait_for_state(page, "upscale", "done") == "Done: 192x128"
    page.wait_for_function("document.querySelectorAll('#upscale-result img').length == 2")  # before and after
    saved = Image.open(saved_pngs(server, "upscale")[-1])
    assert saved.size == (192, 128)
    # The source's own parameters travelled with it: its prompt and seed, then the upscaler's keys.
    source = Image.open(made).info["parameters"]
    assert saved.info["parameters"].startswith(source.splitlines()[0] + "\n")
    assert "Postprocess upscale by: 2, Postprocess upscaler: Lanczos" in saved.info["parameters"]


def test_img2img_uses_the_uploaded_image(page, server, tmp_path):
    Image.new("RGB", (96, 64), (20, 120, 220)).save(tmp_path / "init.png")
    page.get_by_role("tab", name="Image to image").click()
    page.set_input_files("#img2img-init-image input[type=file]", str(tmp_path / "init.png"))
    page.wait_for_selector("#img2img-init-image img")
    generate(page, "img2img", "a blue wall", size=(96, 64))
    wait_for_state(page, "img2img", "done")
    page.wait_for_selector("#img2img-gallery img")

    saved = saved_pngs(server, "img2img")[-1]
    assert Image.open(saved).size == (96, 64)
    assert "Denoising strength: 0.75" in Image.open(saved).info["parameters"]


def test_engine_error_shows_as_a_readable_message_and_the_page_still_works(page):
    page.get_by_role("tab", name="Image to image").click()
    generate(page, "img2img", "no init image given")
    toast = page.locator(".toast-body", has_text="init_image: img2img needs an init image")
    toast.wait_for()
    assert "Traceback" not in page.inner_text("body")
    assert "Failed: init_image" in wait_for_state(page, "img2img", "failed")

    page.get_by_role("tab", name="Text to image").click()
    generate(page, "txt2img", "still works")
    wait_for_state(page, "txt2img", "done")


def step_of(page, mode: str) -> int:
    match = re.search(r"Step (\d+)/", page.inner_text(f"#{mode}-progress"))
    return int(match.group(1)) if match else 0


def test_cancel_stops_only_this_pages_job_and_works_while_queued(browser, server, page):
    before = len(saved_pngs(server, "txt2img"))
    generate(page, "txt2img", "a very long job", steps=150)  # far longer than it takes to click Cancel
    page.wait_for_function("() => /Step \\d+\\/150/.test(document.querySelector('#txt2img-progress').innerText)")
    other = open_page(browser, server)
    try:
        generate(other, "txt2img", "waits behind it")
        other.locator("#txt2img-gallery", has_text=re.compile(r"queue: 1/\d")).wait_for()  # Gradio's queue position
        assert other.inner_text("#txt2img-progress").startswith("Waiting for its turn")
        other.click("#txt2img-cancel")

        step = step_of(page, "txt2img")
        page.wait_for_function(f"() => (/Step (\\d+)\\//.exec(document.querySelector('#txt2img-progress').innerText) "
                               f"|| [0, 0])[1] > {step}")  # the other page's Cancel did not stop this job
        page.wait_for_selector("#txt2img-preview img")  # the live preview, a few steps in
        page.click("#txt2img-cancel")
        assert re.fullmatch(r"Cancelled at step \d+/150", wait_for_state(page, "txt2img", "cancelled").strip())
        page.locator(".toast-body", has_text="Cancelled at step").first.wait_for()
        assert wait_for_state(other, "txt2img", "cancelled").strip() == "Cancelled before it started"
    finally:
        other.close()
    assert len(saved_pngs(server, "txt2img")) == before


def test_png_info_reads_a_saved_image_and_sends_it_to_both_tabs(page, server):
    generate(page, "txt2img", "a (green:1.1) teapot", "dust", steps=3)
    wait_for_state(page, "txt2img", "done")
    saved = saved_pngs(server, "txt2img")[-1]
    page.fill("#txt2img-prompt textarea", "")

    page.get_by_role("tab", name="PNG info").click()
    page.set_input_files("#pnginfo-image input[type=file]", str(saved))
    page.wait_for_function("() => document.querySelector('#pnginfo-parameters textarea').value.includes('teapot')")
    assert page.input_value("#pnginfo-parameters textarea") == Image.open(saved).info["parameters"]
    assert page.input_value("#pnginfo-watermark textarea") != ""

    page.click("#pnginfo-send-txt2img")
    page.wait_for_selector("#txt2img-prompt textarea:visible")
    assert page.input_value("#txt2img-prompt textarea") == "a (green:1.1) teapot"
    assert page.input_value("#txt2img-negative-prompt textarea") == "dust"
    assert page.input_value("#txt2img-steps input[type=number]") == "3"

    page.get_by_role("tab", name="PNG info").click()
    page.click("#pnginfo-send-img2img")
    page.wait_for_selector("#img2img-init-image img")
    assert page.input_value("#img2img-prompt textarea") == "a (green:1.1) teapot"


def test_png_info_sends_the_vae_an_image_was_made_with_to_the_vae_picker(page, server, tmp_path):
    vae = server.outdir.parent / "data" / "demo-models" / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors"
    vae.parent.mkdir(parents=True, exist_ok=True)
    vae.write_bytes(b"{}")  # named after the page was built: the picker's choices must follow
    try:
        assert page.input_value("#vae-select input") == "Automatic"
        send_a1111_png_to_txt2img(page, tmp_path / "a1111.png", "a lighthouse\nNegative prompt: fog\nSteps: 5, "
                                  "Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, VAE hash: 735e4c3a44, "
                                  "VAE: vae-ft-mse-840000-ema-pruned.safetensors", "a lighthouse")
        page.wait_for_function("() => document.querySelector('#vae-select input').value.startsWith('vae-ft-mse')")
        assert page.input_value("#vae-select input") == vae.name
    finally:
        vae.unlink()


def test_two_pages_at_once_each_get_their_own_result(browser, server, page):
    other = open_page(browser, server)
    try:
        generate(page, "txt2img", "first page prompt", steps=3)
        generate(other, "txt2img", "second page prompt", steps=3)
        for p in (page, other):
            wait_for_state(p, "txt2img", "done")
        assert page.input_value("#txt2img-infotext textarea").startswith("first page prompt\n")
        assert other.input_value("#txt2img-infotext textarea").startswith("second page prompt\n")
    finally:
        other.close()


def test_png_info_sends_its_image_to_upscale(page, server, tmp_path):
    Image.new("RGB", (40, 30), (30, 160, 90)).save(tmp_path / "dropped.png")
    page.get_by_role("tab", name="PNG info").click()
    page.set_input_files("#pnginfo-image input[type=file]", str(tmp_path / "dropped.png"))
    page.wait_for_selector("#pnginfo-image img")
    page.click("#pnginfo-send-upscale")
    page.wait_for_selector("#upscale-image img")
    page.locator("#upscale-upscaler input").fill("Lanczos")
    page.locator("#upscale-upscaler input").press("Enter")
    page.locator("#upscale-scale").get_by_label("3").check()
    page.click("#upscale-run")
    assert wait_for_state(page, "upscale", "done") == "Done: 120x90"
    saved = Image.open(saved_pngs(server, "upscale")[-1])
    assert saved.getpixel((60, 45)) != (0, 0, 0) and saved.size == (120, 90)


def test_the_api_page_renders_with_no_internet(browser, tmp_path):
    """Swagger UI's files come from Easel, not a CDN: this Chromium reaches nothing outside."""
    api = start_server(tmp_path, "--demo", "--api")
    page = browser.new_page()
    try:
        page.set_default_timeout(WAIT_MS)
        page.goto(api.url + "/docs")
        page.locator(".opblock-summary-path", has_text="/sdapi/v1/txt2img").first.wait_for()
        assert "Easel API" in page.title()
    finally:
        page.close()
        api.stop()
