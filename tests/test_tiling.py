"""Seamless tiling (A1111's "Tiling"): circular padding in every convolution of the UNet and the VAE
for one job, so the picture wraps around; recorded as `Tiling: True`; the CLI's --tiling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import app
from engine.generator import _circular_padding
from engine.infotext import parse_infotext
from engine.samplers import make_scheduler

BASE = {"prompt": "a brick wall", "width": 64, "height": 64, "steps": 3, "seed": 3, "save_images": False}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def unet_out(unet, latents, text):
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def test_with_tiling_the_unet_commutes_with_a_wrap_around_shift(sd_engine):
    """Circular padding makes every layer see the picture as a torus: shifting the input around the
    edge shifts the output the same way. With zero padding the edges differ."""
    loaded = sd_engine.load_model()
    unet = loaded.pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    shift = 8  # a multiple of the UNet's downsampling, so the grid lines up
    plain_gap = (unet_out(unet, latents.roll(shift, -1), text) - unet_out(unet, latents, text).roll(shift, -1)).abs().max()
    run = type("R", (), {"model": loaded})()
    with _circular_padding(run):
        tiled_gap = (unet_out(unet, latents.roll(shift, -1), text) - unet_out(unet, latents, text).roll(shift, -1)).abs().max()
    assert tiled_gap < 1e-4 < plain_gap


def test_tiling_changes_the_picture_is_recorded_and_leaves_the_model_as_it_was(sd_engine):
    plain = sd_engine.generate(sd_engine.make_request(BASE))
    tiled = sd_engine.generate(sd_engine.make_request({**BASE, "tiling": True}))
    assert np.abs(pixels(plain) - pixels(tiled)).mean() > 0.5
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]
    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True"
    pipe = sd_engine.load_model().pipe
    assert {m.padding_mode for part in (pipe.unet, pipe.vae) for m in part.modules()
            if isinstance(m, torch.nn.Conv2d)} == {"zeros"}
    assert np.array_equal(pixels(sd_engine.generate(sd_engine.make_request(BASE))), pixels(plain))


def test_a_tiled_picture_wraps_around_from_noise_to_pixels(sd_engine):
    """The whole pipeline under tiling, UNet steps and VAE decode: starting noise shifted around the
    edge gives the same picture shifted by as much (times the VAE's factor). That is what makes a
    tile seamless; with zero padding it does not hold."""
    loaded = sd_engine.load_model()
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler("Euler", "Automatic", loaded.scheduler_config)  # no noise of its own
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    shift, factor = 8, loaded.vae_scale_factor

    def picture(latents):
        with torch.no_grad():
            return pipe(prompt="a brick wall", latents=latents.clone(), num_inference_steps=2, output_type="np").images[0]

    def gap():
        return np.abs(picture(noise.roll(shift, -1)) - np.roll(picture(noise), shift * factor, axis=1)).max()

    plain = gap()
    run = type("R", (), {"model": loaded})()
    with _circular_padding(run):
        tiled = gap()
    assert tiled < 1e-4 < 0.1 < plain


@pytest.mark.parametrize("value", ["sometimes", 2])
def test_a_bad_tiling_value_is_refused_naming_the_field(sd_engine, value):
    from engine.errors import RequestError

    with pytest.raises(RequestError, match="tiling: must be true or false"):
        sd_engine.make_request({**BASE, "tiling": value})


def test_the_cli_takes_tiling(tiny_models_dir, tmp_path, capsys):
    code = app.main(["txt2img", "--models-dir", str(tiny_models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "tiles", "--width", "64", "--height", "64",
                     "--steps", "2", "--tiling", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    (saved,) = (tmp_path / "out").rglob("*.png")
    with Image.open(saved) as image:
        assert "Tiling: True" in image.info["parameters"]
