"""A1111 infotext: quoting, building, parsing, and carrying it in PNG/JPEG files."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from engine.infotext import build_infotext, parse_infotext, quote, read_infotext, write_png_with_infotext

PARAMS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5,
    "Seed": 1234, "Size": "512x768", "Model hash": "0123456789", "Model": "my-model",
    "Version": "easel-0.1",
}

# Shape of a real A1111 1.x infotext (the docstring example of its parser, plus later keys).
A1111_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish:1.2)\n"
    "Negative prompt: ugly, (((deformed))), [blurry], bad anatomy\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, '
    'Model: v1-5-pruned, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", Version: v1.10.1'
)


def test_quote_leaves_plain_text_alone():
    assert quote("Euler a") == "Euler a"
    assert quote(7.5) == "7.5"


@pytest.mark.parametrize("text", ["a, b", "k: v", "two\nlines"])
def test_quote_json_quotes_commas_colons_and_newlines(text):
    assert quote(text) == '"' + text.replace("\n", "\\n") + '"'


def test_quote_keeps_unicode_unescaped():
    assert quote("café, 東京") == '"café, 東京"'


def test_build_matches_a1111_layout():
    text = build_infotext("a cat", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"


def test_build_omits_empty_negative_prompt_and_none_values():
    text = build_infotext("a cat", "", {"Steps": 20, "Denoising strength": None, "Seed": 1, "Size": "64x64"})
    assert text == "a cat\nSteps: 20, Seed: 1, Size: 64x64"


def test_build_rejects_a_key_that_would_break_the_line():
    with pytest.raises(ValueError, match="infotext key"):
        build_infotext("a cat", "", {"Bad, key": 1})


@pytest.mark.parametrize("prompt, negative", [
    ("a hamster, holding a brush, (oil painting:1.2)", "blurry, bad anatomy"),
    ("first line\nsecond: line, with comma\nthird", "neg line one\nneg: two"),
    ('she said "hi", then left', ""),
    ("東京の夜景, café au lait, emoji 🎨", "ぼやけた"),
])
def test_build_parse_round_trip(prompt, negative):
    params = dict(PARAMS, Model='model "v2", final: yes', Note="multi\nline")
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Model"] == 'model "v2", final: yes'
    assert parsed["Note"] == "multi\nline"
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Seed"]) == ("20", "7.5", "1234")
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")


def test_parse_a1111_example_field_by_field():
    parsed = parse_infotext(A1111_EXAMPLE)
    assert parsed == {
        "Prompt": "girl with an artist's beret, determined, blue eyes, desert scene, ((eyeshadow)), (coquettish:1.2)",
        "Negative prompt": "ugly, (((deformed))), [blurry], bad anatomy",
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
        "Size-1": "512", "Size-2": "768", "Model hash": "45dee52b", "Model": "v1-5-pruned",
        "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", "Version": "v1.10.1",
    }


def test_parse_splits_old_style_sampler_name():
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_parse_keeps_sampler_when_schedule_type_is_given():
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Exponential, Seed: 1")
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M SDE", "Exponential")


def test_parse_leaves_plain_sampler_without_schedule():
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    assert parsed["Sampler"] == "Euler a"
    assert "Schedule type" not in parsed


def test_last_line_with_fewer_than_three_pairs_is_prompt():
    parsed = parse_infotext("a cat\nstyle: ink, mood: calm")
    assert parsed == {"Prompt": "a cat\nstyle: ink, mood: calm", "Negative prompt": ""}


def test_parse_skips_bare_flags_between_pairs():
    parsed = parse_infotext("a cat\nSteps: 20, Tiling, Seed: 1, CFG scale: 7")
    assert (parsed["Steps"], parsed["Seed"], parsed["CFG scale"]) == ("20", "1", "7")
    assert "Tiling" not in parsed


def test_png_round_trip_keeps_infotext_and_pixels():
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    text = build_infotext("a cat, 東京", "blurry", PARAMS)
    data = write_png_with_infotext(image, text)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(io.BytesIO(data))
    assert read_infotext(decoded) == text
    assert decoded.convert("RGB").tobytes() == image.tobytes()


@pytest.mark.parametrize("text, chunk", [("plain latin-1 café", b"tEXt"), ("東京", b"iTXt")])
def test_png_uses_text_chunk_type_like_pillow(text, chunk):
    data = write_png_with_infotext(Image.new("RGB", (4, 4)), text)
    assert chunk + b"parameters" in data


def test_png_without_infotext_has_no_parameters(tmp_path):
    path = tmp_path / "plain.png"
    path.write_bytes(write_png_with_infotext(Image.new("RGB", (4, 4)), None))
    assert read_infotext(path) is None


def test_read_infotext_from_path(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(write_png_with_infotext(Image.new("RGBA", (4, 4)), "a cat\nSteps: 1, Seed: 2, CFG scale: 3"))
    assert read_infotext(str(path)) == "a cat\nSteps: 1, Seed: 2, CFG scale: 3"


def _jpeg_with_user_comment(path, comment: bytes, fmt="JPEG"):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # Exif IFD -> UserComment, as A1111 (piexif) writes it
    Image.new("RGB", (16, 16), (200, 100, 50)).save(path, fmt, exif=exif.tobytes())


def test_read_jpeg_exif_user_comment_unicode(tmp_path):
    text = "a cat, 東京\nSteps: 20, Sampler: Euler a, Seed: 5"
    path = tmp_path / "a.jpg"
    _jpeg_with_user_comment(path, b"UNICODE\x00" + text.encode("utf-16-be"))
    assert read_infotext(path) == text


def test_read_webp_exif_user_comment_ascii(tmp_path):
    text = "a cat\nSteps: 20, Sampler: Euler a, Seed: 5"
    path = tmp_path / "a.webp"
    _jpeg_with_user_comment(path, b"ASCII\x00\x00\x00" + text.encode("ascii"), fmt="WEBP")
    assert read_infotext(path) == text


def test_read_jpeg_without_exif_is_none(tmp_path):
    path = tmp_path / "b.jpg"
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    assert read_infotext(path) is None


# --- bounded, linear parsing (issue 20): a crafted parameters chunk cannot stall PNG info -----------
class CountingStr(str):
    """A line that counts the characters every slice of it copies (the work a scan does besides
    its forward regex and JSON steps, which never go back)."""
    copied = 0

    def __getitem__(self, key):
        part = super().__getitem__(key)
        CountingStr.copied += len(part)
        return part


def test_scanning_a_long_parameter_line_copies_only_its_values():
    from engine.infotext import MAX_PARSED_CHARS, _scan_pairs

    line = ", ".join(f'Key {i % 7}: "v, {i}"' for i in range(3600))  # quoted pairs, as in the probe
    assert MAX_PARSED_CHARS // 2 < len(line) <= MAX_PARSED_CHARS
    CountingStr.copied = 0
    pairs = _scan_pairs(CountingStr(line))
    assert len(pairs) == 3600 and pairs[-1] == ("Key 1", "v, 3599")
    # Linear: at most the line once over. Copying the rest of the line after each quoted value
    # (what made a 5 MB chunk take 51 s) is ~3600 * len(line) / 2 characters here.
    assert CountingStr.copied <= len(line)


def test_text_over_the_parsing_bound_gets_no_fields():
    from engine.infotext import MAX_PARSED_CHARS

    params = "Steps: 20, Sampler: Euler a, Seed: 1234, Size: 512x512"
    at_bound = "x" * (MAX_PARSED_CHARS - len(params) - 1) + "\n" + params
    assert len(at_bound) == MAX_PARSED_CHARS and parse_infotext(at_bound)["Seed"] == "1234"
    assert parse_infotext("x" + at_bound) == {}
    # The probe's shape: quoted pairs far past the bound (4 x 64 KiB), the real keys at the end.
    flood = ", ".join(f'k{i}: "v,{i}"' for i in range(20000)) + ", " + params
    assert len(flood) > 4 * MAX_PARSED_CHARS
    assert parse_infotext(flood) == {}


def test_png_info_on_a_flooded_parameters_chunk_shows_the_text_without_fields():
    from engine.engine import read_png_info

    flood = ", ".join(f'k{i}: "v,{i}"' for i in range(20000)) + ", Steps: 20, Seed: 7, Size: 8x8"
    info = read_png_info(write_png_with_infotext(Image.new("RGB", (8, 8)), flood))
    assert info.parameters == flood and info.fields == {}
