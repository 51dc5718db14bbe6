"""Invisible watermark: embed, detect, and images too small to carry it."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.infotext import write_png_with_infotext
from engine.watermark import MIN_SIZE, Watermarker


@pytest.fixture(scope="session")
def watermarker():
    return Watermarker()


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth-ish colour noise: coarse random colours upscaled 8x, closer to a generated image
    than white noise and still textured enough to hold the mark."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width + 8, height + 8), Image.BICUBIC).crop((0, 0, width, height))


@pytest.mark.parametrize("size", [(512, 512), (256, 256), (512, 320)])
def test_embedded_mark_is_detected(watermarker, size):
    assert watermarker.detect(watermarker.embed(textured(*size))) is True


def test_mark_survives_png_round_trip(watermarker):
    data = write_png_with_infotext(watermarker.embed(textured(512, 512, seed=3)), None)
    assert watermarker.detect(Image.open(io.BytesIO(data))) is True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_image_is_not_detected(watermarker, seed):
    assert watermarker.detect(textured(512, 512, seed=seed)) is False


def test_other_text_is_not_detected_as_ours(watermarker):
    other = Watermarker("Other").embed(textured(512, 512, seed=4))
    assert watermarker.detect(other) is False


def test_embed_returns_a_new_image_and_changes_pixels_only_slightly(watermarker):
    image = textured(256, 256, seed=5)
    before = np.asarray(image).copy()
    marked = watermarker.embed(image)
    assert marked is not image
    assert np.array_equal(np.asarray(image), before)
    diff = np.asarray(marked, dtype=float) - before
    psnr = 20 * np.log10(255 / np.sqrt((diff**2).mean()))
    assert 38 < psnr < 60  # changed, but invisibly (imwatermark's own encode gives ~29.5 dB here)


def test_embed_keeps_alpha(watermarker):
    image = textured(256, 256).convert("RGBA")
    image.putalpha(77)
    marked = watermarker.embed(image)
    assert marked.mode == "RGBA"
    assert np.all(np.asarray(marked.getchannel("A")) == 77)


@pytest.mark.parametrize("size", [(64, 64), (MIN_SIZE - 1, 1024), (1024, MIN_SIZE - 1)])
def test_too_small_image_is_left_unchanged(watermarker, size):
    image = textured(*size)
    marked = watermarker.embed(image)
    assert marked.size == image.size
    assert marked.tobytes() == image.tobytes()


def test_too_small_image_cannot_be_told(watermarker):
    assert watermarker.detect(textured(128, 128)) is None


def test_plain_imwatermark_decoder_reads_our_text(watermarker):
    from imwatermark import WatermarkDecoder

    bgr = np.asarray(watermarker.embed(textured(512, 512, seed=6)))[:, :, ::-1].copy()
    assert WatermarkDecoder("bytes", 40).decode(bgr, "dwtDct") == b"Easel"


@pytest.fixture()
def watermark_setting(sd_engine):
    """Set the engine's watermark output setting for one test; put it back after."""
    before = sd_engine.outputs.watermark
    yield lambda on: sd_engine.set_outputs(watermark=on)
    sd_engine.set_outputs(watermark=before)


def generated(engine, **fields):
    request = engine.make_request({"prompt": "a lighthouse", "steps": 1, "width": 256, "height": 256, "seed": 11,
                                   "save_images": True, **fields})
    return engine.generate(request)


@pytest.mark.parametrize("on", [True, False], ids=["watermark-on", "watermark-off"])
def test_generated_image_carries_the_mark_only_when_the_setting_is_on(sd_engine, watermarker, watermark_setting, on):
    watermark_setting(on)
    result = generated(sd_engine)
    assert watermarker.detect(result.images[0]) is on
    assert watermarker.detect(Image.open(result.paths[0])) is on  # the saved file, as read back


def test_watermark_off_leaves_the_generated_pixels_untouched(sd_engine, watermarker, watermark_setting):
    watermark_setting(False)
    plain = generated(sd_engine).images[0]
    watermark_setting(True)
    marked = generated(sd_engine).images[0]
    assert np.array_equal(np.asarray(watermarker.embed(plain)), np.asarray(marked))
    assert not np.array_equal(np.asarray(plain), np.asarray(marked))


def test_without_invisible_watermark_the_engine_says_what_to_install(monkeypatch):
    """`pip install .` cannot bring invisible-watermark (its opencv-python needs libGL): one clear line."""
    import engine.watermark as watermark
    from engine.errors import EaselError

    monkeypatch.setattr(watermark, "WatermarkDecoder", None)
    with pytest.raises(EaselError) as missing:
        watermark.Watermarker()
    assert "pip install --no-deps invisible-watermark==0.2.0" in str(missing.value)
