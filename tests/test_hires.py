"""Hires fix (txt2img): first pass at the request's size, enlarged (Latent or Lanczos), then an
img2img pass; A1111's infotext keys; validation of its fields."""
from __future__ import annotations

import pytest
from PIL import Image

import app
from engine.errors import RequestError
from engine.infotext import parse_infotext, read_infotext

BASE = {"prompt": "a lighthouse", "width": 64, "height": 48, "steps": 4, "seed": 9, "save_images": False}


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[-2:])))
    return calls, handle


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_ends_at_the_scaled_size(sd_engine, upscaler):
    request = sd_engine.make_request({**BASE, "enable_hr": True, "hr_scale": 2, "hr_upscaler": upscaler})
    result = sd_engine.generate(request)
    assert result.images[0].size == (128, 96)


def test_the_second_pass_runs_on_the_enlarged_latents(sd_engine):
    """UNet calls: the first pass at 64x48 (latents 32x24 on the tiny model's factor 2), then
    int(hr_steps * strength) at 128x96 (latents 64x48); each call is one CFG batch of two."""
    unet = sd_engine.load_model().pipe.unet
    calls, handle = count_calls(unet)
    try:
        sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 6,
                                                   "denoising_strength": 0.5}))
    finally:
        handle.remove()
    assert calls == [(24, 32)] * 4 + [(48, 64)] * 3


def test_lanczos_decodes_the_first_pass_and_the_result(sd_engine):
    decoder = sd_engine.load_model().pipe.vae.decoder
    calls, handle = count_calls(decoder)
    try:
        sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_upscaler": "Lanczos"}))
    finally:
        handle.remove()
    assert calls == [(24, 32), (48, 64)]  # the first pass's picture, then the final one


def test_hires_changes_the_picture_beyond_a_plain_resize(sd_engine):
    plain = sd_engine.generate(sd_engine.make_request(BASE)).images[0].resize((128, 96), Image.LANCZOS)
    hires = sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_upscaler": "Lanczos",
                                                       "denoising_strength": 0.9})).images[0]
    assert list(plain.getdata()) != list(hires.getdata())


def test_the_infotext_records_hires_with_a1111s_keys(sd_engine):
    result = sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_scale": 1.5,
                                                        "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3,
                                                        "denoising_strength": 0.6}))
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Hires steps"], fields["Denoising strength"]) == \
        ("1.5", "Lanczos", "3", "0.6")
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "48")  # A1111 records the first pass's size


@pytest.mark.parametrize("fields, field", [
    ({"enable_hr": True, "mode": "img2img"}, "enable_hr"),
    ({"enable_hr": True, "hr_scale": 5}, "hr_scale"),
    ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale"),
    ({"enable_hr": True, "width": 1024, "height": 1024, "hr_scale": 3}, "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": "Nearest"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ({"enable_hr": True, "denoising_strength": 0}, "denoising_strength"),
    ({"enable_hr": "sometimes"}, "enable_hr"),
])
def test_bad_hires_fields_are_refused_naming_the_field(sd_engine, fields, field):
    request_fields = {**BASE, **fields}
    if request_fields.get("mode") == "img2img":
        request_fields["init_image"] = Image.new("RGB", (64, 48))
    with pytest.raises(RequestError) as refused:
        sd_engine.make_request(request_fields)
    assert refused.value.field == field and "\n" not in str(refused.value)


def test_cli_hires_saves_the_scaled_image_with_its_parameters(tiny_models_dir, tmp_path, capsys):
    code = app.main(["txt2img", "--models-dir", str(tiny_models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "a cat", "--width", "64", "--height", "64",
                     "--steps", "2", "--hires", "--hr-scale", "1.5", "--hr-upscaler", "Lanczos", "--strength", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    path = out.strip().splitlines()[0]
    with Image.open(path) as image:
        assert image.size == (96, 96)
    assert "Hires upscale: 1.5" in read_infotext(path)
