"""Inpainting (img2img with a mask) through the whole engine, on the tiny SD 1.x model (masked
img2img with a 4-channel UNet) and a tiny 9-channel inpainting checkpoint."""
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from conftest import loaded_engine
from engine.errors import RequestError
from engine.infotext import parse_infotext, read_infotext, values_from_params
from tiny_models import save_folder, tiny_pipeline

SIZE = (64, 64)
BOX = (16, 20, 40, 44)  # the white rectangle of the mask: (left, top, right, bottom)
BASE = {"mode": "img2img", "prompt": "a red door", "steps": 3, "seed": 21, "denoising_strength": 0.9,
        "mask_blur": 0, "save_images": False}


def init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def box_mask(box=BOX) -> Image.Image:
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, box)
    return mask


def outside(box=BOX, margin=0) -> np.ndarray:
    """Where the mask (grown by `margin` pixels) is black."""
    keep = np.ones((SIZE[1], SIZE[0]), bool)
    keep[max(0, box[1] - margin):box[3] + margin, max(0, box[0] - margin):box[2] + margin] = False
    return keep


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    models = tmp_path_factory.mktemp("inpaint-models")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", models / "Stable-diffusion")
    save_folder(tiny_pipeline("sd1-inpaint"), models / "Stable-diffusion" / "tiny-inpaint")
    eng = loaded_engine(models, tmp_path_factory.mktemp("inpaint-engine"), plain_cpu)
    eng.set_outputs(watermark=False)  # exactness with the watermark: see test_the_watermark_...
    return eng


def inpaint(engine, model="tiny-sd1", **fields):
    fields = {**BASE, "init_image": init_image(), "mask": box_mask(), **fields}
    return engine.generate(engine.make_request(fields, model=model), model=model)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-inpaint"])
def test_unmasked_pixels_are_kept_exactly_and_the_masked_area_is_redrawn(engine, model):
    result = rgb(inpaint(engine, model).images[0])
    original = rgb(init_image())
    assert np.array_equal(result[outside()], original[outside()])
    assert np.abs(result[~outside()] - original[~outside()]).mean() > 5


def test_mask_blur_softens_the_edge_and_keeps_pixels_beyond_it_exactly(engine):
    sharp, soft = rgb(inpaint(engine).images[0]), rgb(inpaint(engine, mask_blur=4).images[0])
    original = rgb(init_image())
    far = outside(margin=16)  # a Gaussian of radius 4 has faded to 0 well within 16 pixels
    assert np.array_equal(soft[far], original[far])
    ring = outside() & ~outside(margin=2)  # just outside the mask: kept when sharp, blended when blurred
    assert np.array_equal(sharp[ring], original[ring]) and not np.array_equal(soft[ring], original[ring])


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-inpaint"])
def test_each_masked_content_gives_its_own_result_and_keeps_the_rest(engine, model):
    results = {fill: rgb(inpaint(engine, model, inpainting_fill=fill).images[0])
               for fill in ("original", "fill", "latent noise", "latent nothing")}
    original = rgb(init_image())
    for fill, image in results.items():
        assert np.array_equal(image[outside()], original[outside()]), fill
    inside = [image[~outside()] for image in results.values()]
    assert all(not np.array_equal(a, b) for i, a in enumerate(inside) for b in inside[i + 1:])


def test_api_numbers_for_masked_content_mean_a1111s_choices(engine):
    by_number = inpaint(engine, inpainting_fill=2)
    assert np.array_equal(rgb(by_number.images[0]), rgb(inpaint(engine, inpainting_fill="latent noise").images[0]))


def test_only_masked_works_on_the_cut_out_and_keeps_the_rest(engine):
    small = (28, 28, 36, 36)
    whole = rgb(inpaint(engine, mask=box_mask(small)).images[0])
    only = inpaint(engine, mask=box_mask(small), inpaint_full_res=True, inpaint_full_res_padding=8)
    original = rgb(init_image())
    assert np.array_equal(rgb(only.images[0])[outside(small)], original[outside(small)])
    assert not np.array_equal(rgb(only.images[0]), whole)
    parsed = parse_infotext(only.infotexts[0])
    assert parsed["Inpaint area"] == "Only masked" and parsed["Masked area padding"] == "8"


def test_inverted_mask_redraws_the_black_part(engine):
    result = rgb(inpaint(engine, inpainting_mask_invert=True).images[0])
    original = rgb(init_image())
    assert np.array_equal(result[~outside()], original[~outside()])
    assert not np.array_equal(result[outside()], original[outside()])


def test_a_mask_painted_on_a_transparent_layer_is_its_alpha(engine):
    painted = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    painted.paste((20, 20, 20, 255), BOX)  # dark strokes: their brightness would say "keep"
    a = inpaint(engine, mask=painted)
    assert np.array_equal(rgb(a.images[0]), rgb(inpaint(engine).images[0]))


def test_infotext_has_a1111s_inpainting_keys_and_reads_them_back(engine):
    result = inpaint(engine, mask_blur=3, inpainting_fill="fill")
    parsed = parse_infotext(result.infotexts[0])
    assert (parsed["Mask blur"], parsed["Masked content"], parsed["Inpaint area"]) == ("3", "fill", "Whole picture")
    values = values_from_params(parsed)
    assert (values["mask_blur"], values["inpainting_fill"], values["inpaint_full_res"]) == (3, "fill", False)
    assert "Mask blur" not in parse_infotext(inpaint(engine, mask=None).infotexts[0])


def test_the_watermark_is_applied_over_the_finished_composite(engine):
    plain = inpaint(engine).images[0]
    engine.set_outputs(watermark=True)
    try:
        marked = inpaint(engine).images[0]
    finally:
        engine.set_outputs(watermark=False)
    assert np.array_equal(rgb(marked), rgb(engine.watermarker.embed(plain)))


@pytest.mark.parametrize("fields, words", [
    ({"mask": Image.new("L", (32, 32), 255)}, "is 32x32 but the init image is 64x64"),
    ({"mask": b"not an image at all"}, "is not an image"),
    ({"mask": Image.new("L", SIZE, 0)}, "marks nothing to redraw"),
    ({"mask": Image.new("L", SIZE, 255), "inpainting_mask_invert": True}, "once inverted"),
    ({"mask": "/etc/passwd"}, "must be an image"),
    ({"mask_blur": 65}, "between 0 and 64"),
    ({"inpainting_fill": "blur"}, "must be one of fill, original, latent noise, latent nothing"),
])
def test_a_bad_mask_or_option_is_one_error_naming_its_field(engine, fields, words):
    with pytest.raises(RequestError) as caught:
        engine.make_request({**BASE, "init_image": init_image(), "mask": box_mask(), **fields})
    field = next(iter(fields))
    assert caught.value.field == field and words in str(caught.value)


def test_txt2img_takes_no_mask(engine):
    with pytest.raises(RequestError) as caught:
        engine.make_request({"prompt": "x", "mask": box_mask()})
    assert caught.value.field == "mask"


def test_cli_mask_inpaints_and_keeps_the_rest(capsys, engine, tmp_path):
    models = engine.config.models_dir
    dirs = ["--models-dir", str(models), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    init_image().save(tmp_path / "init.png")
    box_mask().save(tmp_path / "mask.png")
    code = app.main(["img2img", *dirs, "--prompt", "a red door", "--init-img", str(tmp_path / "init.png"),
                     "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--steps", "3", "--no-watermark",
                     "--model", "tiny-sd1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    saved = Path(out.splitlines()[0])
    assert np.array_equal(rgb(Image.open(saved))[outside()], rgb(init_image())[outside()])
    assert "Mask blur: 0" in read_infotext(saved)
    (tmp_path / "bad.png").write_bytes(b"GIF89a broken")
    code = app.main(["img2img", *dirs, "--prompt", "x", "--init-img", str(tmp_path / "init.png"),
                     "--mask", str(tmp_path / "bad.png"), "--model", "tiny-sd1"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: mask: bad.png") and len(err.splitlines()) == 1


@pytest.mark.browser
def test_browser_paints_a_mask_over_the_init_image_and_inpaints(tmp_path):
    from tests.browser_helpers import chromium, start_server
    from tests.test_browser import generate, saved_pngs, set_number, wait_for_state

    browser_gen = chromium()
    browser = next(browser_gen)
    server = start_server(tmp_path, "--demo", "--no-watermark")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(90_000)
        page.goto(server.url)
        page.get_by_role("tab", name="Image to image").click()
        init = Image.new("RGB", SIZE, (30, 140, 200))
        init.save(tmp_path / "init.png")
        page.set_input_files("#img2img-init-image input[type=file]", str(tmp_path / "init.png"))
        page.wait_for_selector("#img2img-init-image img")
        page.click("#img2img-inpaint")  # open the accordion
        canvas = page.locator("#img2img-mask canvas").first
        canvas.wait_for()
        page.wait_for_timeout(1500)  # the editor takes the init image as its background
        page.locator("#img2img-mask button[aria-label*='brush' i], #img2img-mask button[aria-label*='draw' i]").first.click()
        box = canvas.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 15, cy)
        page.mouse.down()
        page.mouse.move(cx + 15, cy, steps=8)
        page.mouse.up()
        set_number(page, "img2img-mask-blur", 0)
        generate(page, "img2img", "a red door", size=SIZE)
        wait_for_state(page, "img2img", "done")
        saved = saved_pngs(server, "img2img")[-1]
        parameters = Image.open(saved).info["parameters"]
        assert "Mask blur: 0" in parameters and "Masked content: original" in parameters
        result, original = rgb(Image.open(saved)), rgb(init)
        same = (result == original).all(axis=-1)
        assert 0.2 < same.mean() < 1.0  # the stroke was redrawn, the rest kept exactly
        assert same[0, 0] and same[-1, -1] and not same[SIZE[1] // 2, SIZE[0] // 2]
    finally:
        server.stop()
        browser_gen.close()
