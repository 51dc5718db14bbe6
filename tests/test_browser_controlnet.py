"""The ControlNet accordion in a real Chromium (ui/controlnet_panel.py): a unit's picture dropped,
its preprocessor's map previewed, and the guided picture's infotext naming the unit. The server
runs on the tests' tiny model with a tiny ControlNet in lllyasviel's layout in models/ControlNet.

Uses the helpers of tests/test_browser.py; without Chromium these tests skip, except under CI.
"""
from __future__ import annotations

import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.browser_helpers import chromium, start_server
from tests.ldm_export import controlnet_to_ldm
from tests.test_api import models_folder
from tests.test_browser import generate, open_page, saved_pngs, send_a1111_png_to_txt2img, wait_for_state
from tests.test_controlnet import house, tiny_controlnet

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def server(browser, tiny_models_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("cn-browser")
    models = models_folder(tiny_models_dir, root, "tiny-a")
    unet = UNet2DConditionModel.from_pretrained(tiny_models_dir / "Stable-diffusion" / "tiny-sd1" / "unet")
    (models / "ControlNet").mkdir()
    save_file(controlnet_to_ldm(tiny_controlnet(unet, 1)), str(models / "ControlNet" / "control_v11p_sd15_canny.safetensors"))
    house(128).save(root / "house.png")
    server = start_server(root, "--models-dir", str(models))
    server.picture, server.models = root / "house.png", models
    yield server
    server.stop()


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_a_unit_made_on_the_page_guides_the_picture_and_is_in_its_infotext(page, server):
    page.click("#txt2img-controlnet button.label-wrap, #txt2img-controlnet > button")
    page.check("#txt2img-cn0-enabled input")
    page.set_input_files("#txt2img-cn0-image input[type=file]", str(server.picture))
    page.wait_for_selector("#txt2img-cn0-image img")
    choose(page, "txt2img-cn0-module", "canny")
    page.wait_for_selector("#txt2img-cn0-a", state="visible")  # canny's thresholds appear with it
    page.click("#txt2img-cn0-preview")
    page.wait_for_selector("#txt2img-cn0-map img")
    generate(page, "txt2img", "a house")
    assert wait_for_state(page, "txt2img", "done").startswith("Done: 1 image")
    parameters = Image.open(saved_pngs(server, "txt2img")[-1]).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in parameters
    assert "Threshold A: 100" in parameters and "Processor Res: 512" in parameters


def test_an_enabled_unit_without_a_picture_is_refused_naming_it(page):
    page.click("#txt2img-controlnet button.label-wrap, #txt2img-controlnet > button")
    page.check("#txt2img-cn0-enabled input")
    generate(page, "txt2img", "a house")
    page.wait_for_selector("text=controlnet[0].image: ControlNet Unit 0 is enabled but has no picture")


def test_png_info_sends_the_units_settings_to_txt2img(page, server, tmp_path):
    from engine.networks.controlnet import ControlNets

    title = ControlNets(server.models).titles()[0]
    parameters = ("a house\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, "
                  f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.65, Resize Mode: Just Resize, '
                  "Processor Res: 256, Threshold A: 80.0, Threshold B: 160.0, Guidance Start: 0.1, Guidance End: 0.9, "
                  'Pixel Perfect: False, Control Mode: ControlNet is more important", Version: v1.10.1')
    send_a1111_png_to_txt2img(page, tmp_path / "a1111.png", parameters, "a house")
    page.click("#txt2img-controlnet button.label-wrap, #txt2img-controlnet > button")
    page.wait_for_selector("#txt2img-cn0-enabled input")
    page.wait_for_function("() => document.querySelector('#txt2img-cn0-enabled input').checked")
    assert page.input_value("#txt2img-cn0-module input") == "canny"
    assert page.input_value("#txt2img-cn0-model input") == title
    assert page.input_value("#txt2img-cn0-weight input[type=number]") == "0.65"
    assert page.locator("#txt2img-cn0-control-mode input[value='ControlNet is more important']").is_checked()
