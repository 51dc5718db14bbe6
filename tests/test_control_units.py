"""A ControlNet unit's fields as sd-webui-controlnet's API sends them (engine/networks/control_units.py)
and the preprocessors that need no weights (engine/networks/preprocessors.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.errors import RequestError
from engine.networks.control_units import parse_infotext, units_from
from engine.networks.preprocessors import preprocess


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def square(size: int = 128) -> Image.Image:
    """A black square on white: its edges are the only edges."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="black")
    return image


def unit(**fields):
    return {"enabled": True, "image": png(square()), "module": "canny", "model": "control_canny", **fields}


def test_an_older_clients_unit_reads_as_the_new_one():
    old = units_from([{"input_image": png(square()), "module": "canny", "model": "control_canny",
                       "guidance": 0.6, "lowvram": True, "resize_mode": "Inner Fit (Scale to Fit)",
                       "control_mode": 2}])
    new = units_from([unit(guidance_end=0.6, low_vram=True, resize_mode="Crop and Resize",
                           control_mode="ControlNet is more important")])
    assert len(old) == len(new) == 1
    a, b = old[0], new[0]
    assert (a.guidance_end, a.resize_mode, a.control_mode) == (b.guidance_end, b.resize_mode, b.control_mode)
    assert a.image.tobytes() == b.image.tobytes()


def test_the_extensions_args_wrapper_is_taken():
    assert len(units_from({"args": [unit(), unit(enabled=False)]})) == 1


def test_defaults_fill_in_as_the_extension_does():
    u = units_from([{"image": png(square()), "model": "m"}])[0]  # no `enabled`: on, as before v1.1.448
    assert (u.module, u.weight, u.guidance_start, u.guidance_end, u.control_mode, u.resize_mode, u.processor_res,
            u.pixel_perfect) == ("none", 1.0, 0.0, 1.0, "Balanced", "Crop and Resize", 512, False)


@pytest.mark.parametrize("field, value, message", [
    ("weight", 3, r"^controlnet\[0\]\.weight: must be between 0 and 2, got 3$"),
    ("guidance_start", -0.1, r"^controlnet\[0\]\.guidance_start: must be between 0 and 1"),
    ("processor_res", 10, r"^controlnet\[0\]\.processor_res: must be between 64 and 2048"),
    ("threshold_a", 300, r"^controlnet\[0\]\.threshold_a: must be between 1 and 255"),
    ("control_mode", "Strong", r"^controlnet\[0\]\.control_mode: must be one of Balanced, "),
    ("resize_mode", 7, r"^controlnet\[0\]\.resize_mode: must be one of Just Resize, "),
    ("module", "bogus", r"^controlnet\[0\]\.module: 'bogus' is not a preprocessor here; available: none, "),
    ("module", "openpose", r"openpose' is not a preprocessor here \(it needs annotator weights"),
    ("model", "", r"^controlnet\[0\]\.model: must name a ControlNet"),
    ("image", None, r"^controlnet\[0\]\.image: the unit needs an image"),
    ("image", "/etc/passwd", r"^controlnet\[0\]\.image: "),
    ("colour", 1, r"^controlnet\[0\]\.colour: unknown unit field"),
])
def test_a_bad_unit_field_is_refused_naming_it(field, value, message):
    with pytest.raises(RequestError, match=message):
        units_from([unit(**{field: value})])


def test_guidance_end_before_start_is_refused():
    with pytest.raises(RequestError, match=r"^controlnet\[0\]\.guidance_end: must be at least guidance_start"):
        units_from([unit(guidance_start=0.6, guidance_end=0.4)])


def test_more_than_three_enabled_units_are_refused():
    with pytest.raises(RequestError, match=r"^controlnet: at most 3 enabled units"):
        units_from([unit()] * 4)


def test_an_image_over_the_pixel_budget_is_refused_before_it_is_decoded():
    from engine.images import MAX_INPUT_PIXELS

    side = int(MAX_INPUT_PIXELS ** 0.5) + 64
    big = io.BytesIO()
    Image.new("L", (side, side)).save(big, format="PNG")
    with pytest.raises(RequestError, match=r"^controlnet\[0\]\.image: "):
        units_from([unit(image=big.getvalue())])


def test_an_infotext_value_reads_back_into_its_pairs():
    u = units_from([unit(threshold_a=50)])[0]
    back = parse_infotext(u.infotext("control_canny [0123abcd]"))
    assert back == {"Module": "canny", "Model": "control_canny [0123abcd]", "Weight": "1.0",
                    "Resize Mode": "Crop and Resize", "Processor Res": "512", "Threshold A": "50.0",
                    "Threshold B": "200", "Guidance Start": "0.0", "Guidance End": "1.0", "Pixel Perfect": "False",
                    "Control Mode": "Balanced"}


# --- preprocessors -------------------------------------------------------------------------

def test_canny_finds_the_squares_outline_and_nothing_else():
    edges = np.asarray(preprocess("canny", square(128), 128, 100, 200).convert("L"))
    assert edges.shape == (128, 128)
    ring = np.zeros_like(edges, dtype=bool)
    ring[28:101, 28:101] = True
    ring[36:93, 36:93] = False  # a band around the square's border at 32..96
    assert edges[ring].max() == 255
    assert edges[~ring].max() == 0


def test_canny_works_at_the_processor_resolution():
    assert preprocess("canny", square(128), 256, 100, 200).size == (256, 256)
    assert preprocess("canny", square(128).resize((200, 100)), 64, 100, 200).size == (128, 64)


def test_invert_turns_a_drawing_white_on_black():
    inverted = np.asarray(preprocess("invert", square(64), 512, None, None))
    assert inverted[0, 0].tolist() == [0, 0, 0] and inverted[32, 32].tolist() == [255, 255, 255]


def test_threshold_whitens_what_is_brighter_than_the_level():
    grey = Image.new("RGB", (64, 64), (100, 100, 100))
    grey.paste((200, 200, 200), (0, 0, 32, 64))
    mask = np.asarray(preprocess("threshold", grey, 64, 150, None).convert("L"))
    assert mask[:, :30].min() == 255 and mask[:, 34:].max() == 0


def test_tile_resample_shrinks_by_the_rate():
    assert preprocess("tile_resample", square(128), 512, 4.0, None).size == (32, 32)
    assert preprocess("tile_resample", square(128), 512, 1.0, None).size == (128, 128)


def test_scribble_xdog_draws_the_squares_outline():
    lines = np.asarray(preprocess("scribble_xdog", square(128), 128, 32, None).convert("L"))
    assert lines.shape == (128, 128) and set(np.unique(lines)) == {0, 255}
    assert lines[28:36, 40:88].max() == 255  # along the top edge at y=32
    assert lines[0:16, 0:16].max() == 0 and lines[56:72, 56:72].max() == 0  # flat white, flat black
