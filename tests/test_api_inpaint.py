"""The HTTP API's inpainting (img2img with a `mask`), hires fix by hr_resize_x / hr_resize_y and
`skip`, over real HTTP against a real `app.py serve` (tests/test_api.py's server and helpers)."""
from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
from PIL import Image

from engine.watermark import MIN_SIZE
from tests.test_api import SMALL, assert_refused, b64, long_job, png, poll_progress, post, server  # noqa: F401

SIZE = (64, 64)  # under the watermark's MIN_SIZE: the answer's pixels are the composite's own
BOX = (16, 20, 40, 44)  # the mask's white rectangle (left, top, right, bottom)
INPAINT = {**SMALL, "steps": 3, "seed": 21, "denoising_strength": 0.9, "mask_blur": 0, "inpainting_fill": 1,
           "inpaint_full_res": False}
FIELDS = ("mask", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
          "inpainting_mask_invert")


def init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def box_mask() -> Image.Image:
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, BOX)
    return mask


def outside() -> np.ndarray:
    keep = np.ones((SIZE[1], SIZE[0]), bool)
    keep[BOX[1]:BOX[3], BOX[0]:BOX[2]] = False
    return keep


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def inpaint(server, **fields):
    body = {**INPAINT, "init_images": [b64(init_image())], "mask": b64(box_mask()), **fields}
    response = post(server, "img2img", body)
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    return png(answer["images"][0]), json.loads(answer["info"])


def test_a_mask_redraws_its_white_part_and_keeps_the_rest_exactly(server):
    assert min(SIZE) < MIN_SIZE  # no watermark on so small a picture: exact comparison holds
    image, info = inpaint(server, mask="data:image/png;base64," + b64(box_mask()))
    result, original = rgb(image), rgb(init_image())
    assert np.array_equal(result[outside()], original[outside()])
    assert np.abs(result[~outside()] - original[~outside()]).mean() > 5
    assert "Mask blur: 0" in info["infotexts"][0] and "Masked content: original" in info["infotexts"][0]


def test_inpainting_fields_are_used_not_reported_as_ignored(server):
    _, info = inpaint(server, mask_blur=2, inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=8,
                      inpainting_mask_invert=0)
    assert not set(FIELDS) & set(info["ignored"]), info["ignored"]
    text = info["infotexts"][0]
    for words in ("Mask blur: 2", "Masked content: latent noise", "Inpaint area: Only masked",
                  "Masked area padding: 8"):
        assert words in text, (words, text)


def test_a1111s_defaults_apply_when_only_a_mask_is_sent(server):
    body = {**SMALL, "steps": 2, "init_images": [b64(init_image())], "mask": b64(box_mask())}
    text = json.loads(post(server, "img2img", body).json()["info"])["infotexts"][0]
    # A1111's API: mask_blur_x/y 4, inpainting_fill 0 (fill), inpaint_full_res true, padding 0
    for words in ("Mask blur: 4", "Masked content: fill", "Inpaint area: Only masked", "Masked area padding: 0"):
        assert words in text, (words, text)


def test_inpainting_mask_invert_1_keeps_the_white_part(server):
    result, original = rgb(inpaint(server, inpainting_mask_invert=1)[0]), rgb(init_image())
    assert np.array_equal(result[~outside()], original[~outside()])
    assert not np.array_equal(result[outside()], original[outside()])


def test_a_mask_painted_on_a_transparent_layer_is_its_alpha(server):
    painted = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    painted.paste((20, 20, 20, 255), BOX)  # dark strokes: by brightness they would mark nothing
    assert np.array_equal(rgb(inpaint(server, mask=b64(painted))[0]), rgb(inpaint(server)[0]))


@pytest.mark.parametrize("fields, field, words", [
    ({"mask": "not base64!!"}, "mask", "not valid base64"),
    ({"mask": base64.b64encode(b"not an image at all").decode()}, "mask", "not an image"),
    ({"mask": b64(Image.new("L", (32, 32), 255))}, "mask", "is 32x32 but the init image is 64x64"),
    ({"mask": b64(Image.new("L", SIZE, 0))}, "mask", "marks nothing to redraw"),
    ({"mask": 5}, "mask", "must be base64 text"),
    ({"inpainting_fill": 4}, "inpainting_fill", "must be one of fill, original"),
    ({"mask_blur": 65}, "mask_blur", "between 0 and 64"),
    ({"mask_blur": None, "mask_blur_x": 65, "mask_blur_y": 65}, "mask_blur_x", "between 0 and 64"),
    ({"mask_blur": None, "mask_blur_x": 2, "mask_blur_y": 6}, "mask_blur_y", "equal to mask_blur_x"),
    ({"inpaint_full_res": "sometimes"}, "inpaint_full_res", "true or false"),
    ({"inpaint_full_res_padding": -1}, "inpaint_full_res_padding", "between 0 and 256"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "true or false"),
])
def test_a_bad_mask_or_inpainting_field_is_422_naming_it(server, fields, field, words):
    body = {**INPAINT, "init_images": [b64(init_image())], "mask": b64(box_mask()), **fields}
    assert words in assert_refused(post(server, "img2img", body), field)


def hires(server, **fields) -> tuple[Image.Image, dict]:
    body = {**SMALL, "enable_hr": True, "hr_upscaler": "Latent", "hr_second_pass_steps": 1,
            "denoising_strength": 0.5, **fields}
    response = post(server, "txt2img", body)
    assert response.status_code == 200, response.text[:500]
    return png(response.json()["images"][0]), json.loads(response.json()["info"])


@pytest.mark.parametrize("fields, size", [
    ({"width": 64, "height": 32, "hr_resize_x": 96}, (96, 48)),  # the other side keeps the aspect ratio
    ({"width": 64, "height": 32, "hr_resize_y": 64}, (128, 64)),
    ({"hr_resize_x": 100, "hr_resize_y": 100}, (96, 96)),  # snapped down to the model's size step
])
def test_hr_resize_sets_the_final_size_instead_of_hr_scale(server, fields, size):
    image, info = hires(server, hr_scale=3, **fields)
    assert image.size == size
    assert not {"hr_resize_x", "hr_resize_y"} & set(info["ignored"])


@pytest.mark.parametrize("fields, field", [
    ({"hr_resize_x": 128, "hr_resize_y": 96}, "hr_resize_y"),  # A1111 would crop; Easel does not
    ({"hr_resize_x": 32}, "hr_resize_x"),  # smaller than the first pass
    ({"hr_resize_x": 64 * 5}, "hr_resize_x"),  # over hires fix's 4x
    ({"hr_resize_y": -8}, "hr_resize_y"),
    ({"hr_resize_x": "wide"}, "hr_resize_x"),
])
def test_a_bad_hr_resize_is_422_naming_it(server, fields, field):
    assert_refused(post(server, "txt2img", {**SMALL, "enable_hr": True, "denoising_strength": 0.5, **fields}), field)


def test_skip_stops_the_running_api_job_as_interrupt_does(server):
    results: list = []
    thread: threading.Thread = long_job(server, results)
    poll_progress(server, lambda s: s["state"]["sampling_step"] >= 1)
    assert post(server, "skip").status_code == 200
    thread.join(300)
    assert not thread.is_alive()
    assert results[0].status_code == 200 and json.loads(results[0].json()["info"])["interrupted"] is True


# --- A1111's leniency that clients rely on ---------------------------------------------------------
def test_hires_denoising_0_is_taken_and_gives_the_enlarged_first_pass(server):
    image, info = hires(server, hr_scale=2, denoising_strength=0)
    assert image.size == (128, 128) and info["denoising_strength"] == 0


def test_a_fractional_step_count_is_cut_toward_zero_as_a1111_does(server):
    image, info = hires(server, steps=2.9, hr_second_pass_steps=1.5)
    assert info["steps"] == 2 and "Hires steps: 1" in info["infotexts"][0]


def test_a_fractional_batch_size_is_still_422_naming_it(server):
    assert_refused(post(server, "txt2img", {**SMALL, "batch_size": 1.5}), "batch_size")


def test_numbers_sent_as_text_are_read_as_a1111_reads_them(server):
    response = post(server, "txt2img", {**SMALL, "steps": "2", "cfg_scale": "6.5", "seed": "11", "width": "64"})
    assert response.status_code == 200, response.text[:300]
    info = json.loads(response.json()["info"])
    assert (info["steps"], info["cfg_scale"], info["seed"], info["width"]) == (2, 6.5, 11, 64)


def test_tiling_is_taken_and_recorded(server):
    response = post(server, "txt2img", {**SMALL, "tiling": True})
    assert response.status_code == 200, response.text[:300]
    info = json.loads(response.json()["info"])
    assert "Tiling: True" in info["infotexts"][0] and "tiling" not in info["ignored"]
