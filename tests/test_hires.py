"""Hires fix (txt2img): first pass at the request's size, enlarged (Latent or Lanczos), then an
img2img pass; A1111's infotext keys; validation of its fields."""
from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_at_denoising_0_is_the_first_pass_enlarged_with_no_second_pass(sd_engine, upscaler):
    """A1111 takes hires denoising 0: the UNet runs the first pass only; the picture is enlarged."""
    model = sd_engine.load_model().pipe
    unet_calls, unet_hook = count_calls(model.unet)
    decodes, decoder_hook = count_calls(model.vae.decoder)
    try:
        result = sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_scale": 2,
                                                            "hr_upscaler": upscaler, "denoising_strength": 0}))
    finally:
        unet_hook.remove()
        decoder_hook.remove()
    assert result.images[0].size == (128, 96)
    assert unet_calls == [(24, 32)] * 4
    assert decodes == [(48, 64) if upscaler == "Latent" else (24, 32)]  # the enlarged latents, or the first pass


def test_hires_lanczos_at_denoising_0_matches_the_plain_image_resized(sd_engine):
    plain = sd_engine.generate(sd_engine.make_request(BASE)).images[0].resize((128, 96), Image.LANCZOS)
    hires = sd_engine.generate(sd_engine.make_request({**BASE, "enable_hr": True, "hr_upscaler": "Lanczos",
                                                       "denoising_strength": 0})).images[0]
    difference = np.abs(np.asarray(plain, np.int16) - np.asarray(hires, np.int16))
    assert difference.mean() < 2  # the same picture; only the invisible watermark differs


@pytest.mark.parametrize("fields, field", [
    ({"enable_hr": True, "mode": "img2img"}, "enable_hr"),
    ({"enable_hr": True, "hr_scale": 5}, "hr_scale"),
    ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale"),
    ({"enable_hr": True, "width": 1024, "height": 1024, "hr_scale": 3}, "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": "Nearest"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ({"enable_hr": "sometimes"}, "enable_hr"),
])
def test_bad_hires_fields_are_refused_naming_the_field(sd_engine, fields, field):
    request_fields = {**BASE, **fields}
    if request_fields.get("mode") == "img2img":
        request_fields["init_image"] = Image.new("RGB", (64, 48))
    with pytest.raises(RequestError) as refused:
        sd_engine.make_request(request_fields)
    assert refused.value.field == field and "\n" not in str(refused.value)


def cli_hires(models_dir, tmp_path, capsys, scale: str, upscaler: str) -> str:
    """`app.py txt2img --hires` at 64x64; the saved file's path (the command must succeed)."""
    code = app.main(["txt2img", "--models-dir", str(models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "a cat", "--width", "64", "--height", "64",
                     "--steps", "2", "--hires", "--hr-scale", scale, "--hr-upscaler", upscaler, "--strength", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()[0]


def test_cli_hires_saves_the_scaled_image_with_its_parameters(tiny_models_dir, tmp_path, capsys):
    path = cli_hires(tiny_models_dir, tmp_path, capsys, "1.5", "Lanczos")
    with Image.open(path) as image:
        assert image.size == (96, 96)
    assert "Hires upscale: 1.5" in read_infotext(path)


# --- an ESRGAN-family model as hires fix's upscaler ----------------------------------------------

@pytest.fixture(scope="module")
def esrgan_engine(tmp_path_factory, plain_cpu):
    """A tiny SD 1.x and a tiny 4x ESRGAN file in models/ESRGAN, as a user's folder would hold them."""
    from safetensors.torch import save_file

    from engine.tiny import save_sd1_folder
    from tests.conftest import loaded_engine
    from tests.field_files import rrdb_state_dict

    models = tmp_path_factory.mktemp("hires-esrgan-models")
    save_sd1_folder(models / "Stable-diffusion" / "tiny-sd1")
    (models / "ESRGAN").mkdir()
    save_file(rrdb_state_dict(0), str(models / "ESRGAN" / "tiny4x.safetensors"))
    return loaded_engine(models, tmp_path_factory.mktemp("hires-esrgan"), plain_cpu)


def test_upscaler_models_are_offered_to_hires_fix(esrgan_engine):
    assert esrgan_engine.hires_upscaler_names() == ("Latent", "Lanczos", "tiny4x")


def test_an_esrgan_model_enlarges_the_first_pass(esrgan_engine):
    """The model runs on the decoded first pass (a 64x48 picture: one tile, 256x192 out), is
    brought down to the hires size, and the second pass starts from that picture."""
    descriptor = esrgan_engine.upscalers._model(esrgan_engine.library.models_dir / "ESRGAN" / "tiny4x.safetensors")
    calls, handle = count_calls(descriptor.model)
    try:
        result = esrgan_engine.generate(esrgan_engine.make_request(
            {**BASE, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "tiny4x"}))
    finally:
        handle.remove()
    assert calls == [(48, 64)]
    assert result.images[0].size == (128, 96)
    assert parse_infotext(result.infotexts[0])["Hires upscaler"] == "tiny4x"


def test_the_esrgan_first_pass_differs_from_lanczos(esrgan_engine):
    fields = {**BASE, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.3}
    by_model = esrgan_engine.generate(esrgan_engine.make_request({**fields, "hr_upscaler": "tiny4x"})).images[0]
    by_lanczos = esrgan_engine.generate(esrgan_engine.make_request({**fields, "hr_upscaler": "Lanczos"})).images[0]
    assert list(by_model.getdata()) != list(by_lanczos.getdata())


@pytest.mark.parametrize("name", ["tiny5x", "ESRGAN/../tiny4x", "SD x4: tiny-sd1"])
def test_an_unknown_hires_upscaler_is_refused_with_the_choices(esrgan_engine, name):
    with pytest.raises(RequestError) as refused:
        esrgan_engine.make_request({**BASE, "enable_hr": True, "hr_upscaler": name})
    assert refused.value.field == "hr_upscaler" and "tiny4x" in str(refused.value)


def test_cli_hires_takes_an_esrgan_model(esrgan_engine, tmp_path, capsys):
    path = cli_hires(esrgan_engine.library.models_dir, tmp_path, capsys, "2", "tiny4x")
    with Image.open(path) as image:
        assert image.size == (128, 128)
    assert "Hires upscaler: tiny4x" in read_infotext(path)
