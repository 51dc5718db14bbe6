"""Request validation: every bad field gets one line naming it and the allowed range."""
import pytest
from PIL import Image

from engine.errors import RequestError
from engine.request import MAX_PIXELS, GenerationRequest


def validate(**fields):
    return GenerationRequest.validate(fields, size_multiple=8)


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, "steps: must be between 1 and 150"),
    ("steps", "many", "steps: must be a whole number between 1 and 150"),
    ("steps", 2.5, "steps: must be a whole number"),  # the page and the CLI; the API: a1111_count
    ("cfg_scale", 31, "cfg_scale: must be between 0.0 and 30.0"),
    ("cfg_scale", float("nan"), "cfg_scale: must be between"),
    ("width", 500, "width: must be a multiple of 8 between 8 and 3072"),
    ("height", 4096, "height: must be a multiple of 8 between 8 and 3072"),
    ("batch_size", 9, "batch_size: must be between 1 and 8"),
    ("batch_count", 0, "batch_count: must be between 1 and 100"),
    ("seed", -2, "seed: must be between -1 and 4294967295"),
    ("sampler", "Euler b", "sampler: unknown sampler 'Euler b'"),
    ("schedule_type", "Sideways", "schedule_type: unknown schedule type 'Sideways'"),
    ("mode", "inpaint", "mode: must be one of txt2img, img2img"),
    ("speed", "turbo", "speed: must be one of exact, fast, got 'turbo'"),
    ("prompt", 5, "prompt: must be text"),
    ("colour", "red", "colour: unknown field"),
])
def test_bad_field_is_named_with_its_range(field, value, message):
    with pytest.raises(RequestError) as err:
        validate(**{field: value})
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_size_step_comes_from_the_model():
    assert GenerationRequest.validate({"width": 66, "height": 64}, size_multiple=2).width == 66
    with pytest.raises(RequestError, match="width: must be a multiple of 8"):
        GenerationRequest.validate({"width": 66}, size_multiple=8)


def test_pixel_budget():
    with pytest.raises(RequestError, match=f"pixel budget of {MAX_PIXELS}"):
        validate(width=3072, height=2048)


def test_strings_from_cli_are_coerced():
    r = validate(steps="30", cfg_scale="6.5", seed="42", width="768")
    assert (r.steps, r.cfg_scale, r.seed, r.width) == (30, 6.5, 42, 768)


def test_defaults_are_a1111s():
    r = validate(prompt="x")
    assert (r.steps, r.cfg_scale, r.sampler, r.width, r.height, r.seed, r.denoising_strength) == \
        (20, 7.0, "Euler a", 512, 512, -1, 0.75)


def test_legacy_sampler_name_splits_into_schedule():
    r = validate(sampler="DPM++ 2M Karras")
    assert (r.sampler, r.schedule_type) == ("DPM++ 2M", "Karras")


def test_img2img_needs_an_init_image():
    with pytest.raises(RequestError, match="init_image: img2img needs an init image"):
        validate(mode="img2img")


def test_img2img_strength_range():
    with pytest.raises(RequestError, match="denoising_strength: must be between 0.0 and 1.0"):
        validate(mode="img2img", init_image=Image.new("RGB", (64, 64)), denoising_strength=1.5)


def test_img2img_size_defaults_to_init_image_snapped_to_step():
    r = validate(mode="img2img", init_image=Image.new("RGB", (517, 389)))
    assert (r.width, r.height) == (512, 384)


def test_img2img_huge_init_image_is_scaled_into_budget():
    r = validate(mode="img2img", init_image=Image.new("RGB", (6000, 4000)))
    assert r.width * r.height <= MAX_PIXELS and r.width % 8 == 0 and r.width > r.height


def test_request_is_frozen():
    r = validate(prompt="x")
    with pytest.raises(AttributeError):
        r.steps = 3


# --- text that is not valid Unicode (issue 20): a lone UTF-16 surrogate -------------------------
@pytest.mark.parametrize("field, value, where", [
    ("prompt", "a\ud800b", "U+D800 at position 2"),                 # JSON's "a\ud800b"
    ("negative_prompt", "blurry \udcff", "U+DCFF at position 8"),   # a non-UTF-8 argv byte (surrogateescape)
    ("prompt", "\udfff", "U+DFFF at position 1"),
    ("sampler", "Euler\ud800", "U+D800 at position 6"),
    ("hr_upscaler", "\ud83d", "U+D83D at position 1"),               # half of a pair, alone
    ("vae", "x\udc80.safetensors", "U+DC80 at position 2"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(field, value, where):
    with pytest.raises(RequestError) as err:
        validate(**{field: value})
    message = str(err.value)
    assert err.value.field == field
    assert message == f"{field}: contains an unpaired surrogate {where}; text must be valid Unicode"
    message.encode("utf-8")  # the refusal itself can be sent or printed


def test_a_character_outside_the_bmp_is_not_a_surrogate():
    assert validate(prompt="a cat 😀, \U0001f431").prompt == "a cat 😀, \U0001f431"


def test_an_echoed_surrogate_is_escaped_in_any_refusal():
    # Refusals that quote a value (a LoRA or model name) must stay sendable as JSON and printable.
    error = RequestError("prompt", "<lora:x\ud800>: no such LoRA; é stays")
    assert str(error) == "prompt: <lora:x\\ud800>: no such LoRA; é stays"


def test_hires_fix_takes_denoising_strength_0_as_a1111_does():
    request = GenerationRequest.validate({"enable_hr": True, "denoising_strength": 0}, size_multiple=8)
    assert request.enable_hr and request.denoising_strength == 0
