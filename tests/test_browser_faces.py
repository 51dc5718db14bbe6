"""Restore faces on the page, in a real Chromium: the img2img tab's Restore faces checkbox and
restorer picker redraw the face of an uploaded portrait and record it; without the detector the
page shows the one-line refusal naming the download, and keeps working.

The server runs on a models folder holding the tiny SD 1.x model and the face files
tests/face_fixtures.py builds (a YuNet-layout detector, GFPGAN v1.4's architecture with random weights)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.browser_helpers import chromium, start_server
from tests.face_fixtures import draw_face, write_gfpgan, write_yunet_onnx
from tests.test_browser import generate, saved_pngs, set_number, wait_for_state
from tests.tiny_models import models_linking_tiny_sd1

pytestmark = pytest.mark.browser

FACE = (40, 30, 124, 126)


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def server(browser, tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-faces")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    write_gfpgan(models / "GFPGAN" / "GFPGANv1.4.pth", half=True)
    write_yunet_onnx(root / "face_detection_yunet_2023mar.onnx")
    os.symlink(root / "face_detection_yunet_2023mar.onnx", models / "GFPGAN" / "face_detection_yunet_2023mar.onnx")
    server = start_server(root, "--models-dir", str(models))
    server.detector = models / "GFPGAN" / "face_detection_yunet_2023mar.onnx"
    yield server
    server.stop()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(120_000)
    page.goto(server.url)
    page.wait_for_selector("#txt2img-prompt textarea")
    yield page
    page.close()


def portrait(path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 90, (192, 256, 3), dtype=np.uint8), "RGB")
    draw_face(image, FACE)
    image.save(path)
    return image


def img2img_with_restore_faces(page, init_path) -> None:
    page.get_by_role("tab", name="Image to image").click()
    page.set_input_files("#img2img-init-image input[type=file]", str(init_path))
    page.wait_for_selector("#img2img-init-image img")
    set_number(page, "img2img-denoising-strength", 0)  # the init image itself, then its face restored
    page.locator("#img2img-restore-faces input[type=checkbox]").check()
    page.locator("#img2img-face-restorer input").click()
    page.get_by_role("option", name="GFPGAN").click()
    generate(page, "img2img", "a portrait", size=(256, 192))


def test_restore_faces_on_the_page_redraws_the_face_and_records_it(page, server, tmp_path):
    before = portrait(tmp_path / "portrait.png")
    img2img_with_restore_faces(page, tmp_path / "portrait.png")
    wait_for_state(page, "img2img", "done")
    page.wait_for_selector("#img2img-gallery img")
    with Image.open(saved_pngs(server, "img2img")[-1]) as saved:
        assert "Face restoration: GFPGAN" in saved.info["parameters"]
        moved = np.any(np.asarray(saved.convert("RGB")) != np.asarray(before), axis=-1)
    assert moved[50:100, 60:100].mean() > 0.9 and not moved[:, 240:].any()


def test_without_the_detector_the_page_names_the_download_and_keeps_working(page, server, tmp_path):
    portrait(tmp_path / "portrait.png")
    server.detector.rename(server.detector.with_suffix(".away"))
    try:
        img2img_with_restore_faces(page, tmp_path / "portrait.png")
        page.locator(".toast-body", has_text="app.py download yunet-face-detector").wait_for()
        assert "Failed: restore_faces" in wait_for_state(page, "img2img", "failed")
    finally:
        server.detector.with_suffix(".away").rename(server.detector)
    page.locator("#img2img-restore-faces input[type=checkbox]").uncheck()
    page.click("#img2img-generate")
    wait_for_state(page, "img2img", "done")
