"""Prompt styles and the header's Clip skip slider in a real Chromium (`app.py serve --demo`).

Uses the helpers of tests/test_browser.py; without Chromium these tests skip, except under CI.
"""
from __future__ import annotations

import pytest
from PIL import Image

from tests.browser_helpers import chromium, start_server
from tests.test_browser import generate, open_page, saved_pngs, send_a1111_png_to_txt2img, set_number, wait_for_state

pytestmark = pytest.mark.browser

STYLES = ("name,prompt,negative_prompt\r\n"
          'Cinematic,"cinematic still of {prompt}, film grain",cartoon\r\n'
          "Sharp,sharp focus,\r\n")


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("styles-server")
    (tmp / "data").mkdir()
    (tmp / "data" / "styles.csv").write_text(STYLES, encoding="utf-8")
    server = start_server(tmp, "--demo")
    server.data = tmp / "data"
    yield server
    server.stop()


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def pick_style(page, mode: str, name: str) -> None:
    box = page.locator(f"#{mode}-styles input")
    box.fill(name)
    box.press("Enter")
    page.locator(f"#{mode}-styles .token", has_text=name).wait_for()
    box.blur()


def style_options(page, mode: str) -> list[str]:
    page.locator(f"#{mode}-styles input").click()
    options = page.get_by_role("option").all_inner_texts()
    page.locator(f"#{mode}-styles input").press("Escape")
    return [o.strip() for o in options]


def parameters_of_last(server, mode: str) -> str:
    return Image.open(saved_pngs(server, mode)[-1]).info["parameters"]


def test_a_chosen_style_is_applied_to_the_prompts_on_generate(page, server):
    pick_style(page, "txt2img", "Cinematic")
    pick_style(page, "txt2img", "Sharp")
    generate(page, "txt2img", "a lighthouse", "blurry")
    assert wait_for_state(page, "txt2img", "done").startswith("Done: 1 image")
    page.wait_for_selector("#txt2img-gallery img")
    assert parameters_of_last(server, "txt2img").startswith(
        "cinematic still of a lighthouse, film grain, sharp focus\nNegative prompt: blurry, cartoon\nSteps: 2,")
    assert page.input_value("#txt2img-prompt textarea") == "a lighthouse"  # the box keeps what was typed


def test_apply_styles_puts_them_into_the_boxes(page):
    page.fill("#txt2img-prompt textarea", "a fox")
    page.fill("#txt2img-negative-prompt textarea", "")
    pick_style(page, "txt2img", "Cinematic")
    page.click("#txt2img-apply-styles")
    page.wait_for_function("() => document.querySelector('#txt2img-prompt textarea').value.startsWith('cinematic')")
    assert page.input_value("#txt2img-prompt textarea") == "cinematic still of a fox, film grain"
    assert page.input_value("#txt2img-negative-prompt textarea") == "cartoon"


def test_a_style_saved_from_the_page_is_offered_on_both_tabs_and_deleted(page, server):
    page.fill("#txt2img-prompt textarea", "watercolor of {prompt}")
    page.fill("#txt2img-negative-prompt textarea", "photo")
    page.locator("#txt2img-edit-styles").get_by_text("Edit styles", exact=True).first.click()
    page.fill("#txt2img-style-name input", "Watercolor")
    page.click("#txt2img-save-style")
    page.wait_for_selector("#txt2img-style-note :text('Watercolor')")
    assert "Watercolor" in style_options(page, "txt2img")
    page.get_by_role("tab", name="Image to image").click()
    assert "Watercolor" in style_options(page, "img2img")
    saved = (server.data / "styles.csv").read_bytes().decode("utf-8")
    assert saved.startswith("name,prompt,negative_prompt\r\nCinematic,") and "Watercolor,watercolor of {prompt},photo" in saved
    page.get_by_role("tab", name="Text to image").click()
    page.click("#txt2img-delete-style")
    page.wait_for_selector("#txt2img-style-note :text('deleted')")
    assert "Watercolor" not in style_options(page, "txt2img")
    assert "Watercolor" not in (server.data / "styles.csv").read_text(encoding="utf-8")


def test_a_bad_style_name_is_a_one_line_error(page):
    page.locator("#txt2img-edit-styles").get_by_text("Edit styles", exact=True).first.click()
    page.fill("#txt2img-style-name input", "   ")
    page.click("#txt2img-save-style")
    toast = page.locator(".toast-body", has_text="style:")
    toast.first.wait_for()
    assert "give the style a name" in toast.first.inner_text()


def test_clip_skip_is_remembered_used_and_shown_after_a_reload(page, server, browser):
    set_number(page, "clip-skip", 2)
    page.wait_for_selector("#easel-banner :text('Clip skip for')")
    generate(page, "txt2img", "a quiet harbour")
    wait_for_state(page, "txt2img", "done")
    page.wait_for_selector("#txt2img-gallery img")
    assert "Clip skip: 2" in parameters_of_last(server, "txt2img")
    again = open_page(browser, server)
    try:
        again.wait_for_function("() => document.querySelector('#clip-skip input[type=number]').value === '2'")
        set_number(again, "clip-skip", 1)  # back as it was, and 1 is left out of the infotext, as A1111 does
        again.wait_for_selector("#easel-banner :text('Clip skip for')")
        generate(again, "txt2img", "a quiet harbour")
        wait_for_state(again, "txt2img", "done")
        again.wait_for_selector("#txt2img-gallery img")
        assert "Clip skip" not in parameters_of_last(server, "txt2img")
    finally:
        again.close()


def test_png_info_sends_clip_skip_to_the_slider_and_remembers_it(page, server, tmp_path):
    assert page.input_value("#clip-skip input[type=number]") == "1"
    send_a1111_png_to_txt2img(page, tmp_path / "a1111.png",
                              "a mill\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Clip skip: 3", "a mill")
    page.wait_for_function("() => document.querySelector('#clip-skip input[type=number]').value === '3'")
    settings = (server.data / "model-settings.json").read_text(encoding="utf-8")
    assert '"clip_skip": 3' in settings
    set_number(page, "clip-skip", 1)
    page.wait_for_selector("#easel-banner :text('Clip skip for')")
