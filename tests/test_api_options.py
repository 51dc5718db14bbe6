"""GET/POST /sdapi/v1/options and a job's override_settings as A1111 has them (ui/api_options.py):
every A1111 key with its default, Easel's own values for the keys it acts on (checkpoint, VAE and
CLIP skip per checkpoint, samples_save/format, output folders), the rest stored across restarts;
on the tiny SD 1.x model with a VAE file of other weights, through the API's router."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi import FastAPI
from safetensors.torch import save_file
from starlette.testclient import TestClient

from engine.infotext import parse_infotext
from ldm_export import vae_to_ldm
from tiny_models import models_linking_tiny_sd1, tiny_vae

SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 7}
VAE_FILE = "other-vae.safetensors"


@pytest.fixture(scope="module")
def root(tiny_models_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-options")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    (models / "VAE").mkdir()
    state = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(tiny_vae(5)).items()}
    save_file(state, str(models / "VAE" / VAE_FILE))
    return root


def client_on(root: Path, hardware) -> TestClient:
    """A fresh engine and API on `root`'s models and data dir: what a restart gives."""
    from engine.engine import Engine, EngineConfig
    from ui.api import create_api

    engine = Engine(EngineConfig(root / "models", root / "outputs", root / "data"), hardware)
    app = FastAPI()
    app.include_router(create_api(engine))
    client = TestClient(app)
    client.engine = engine
    return client


@pytest.fixture(scope="module")
def client(root, plain_cpu):
    client = client_on(root, plain_cpu)
    client.engine.load_model("tiny-sd1")
    yield client
    client.engine.set_model_clip_skip("tiny-sd1", 1)


def options(client) -> dict:
    response = client.get("/sdapi/v1/options")
    assert response.status_code == 200, response.text
    return response.json()


def set_options(client, body) -> None:
    response = client.post("/sdapi/v1/options", json=body)
    assert response.status_code == 200, response.text
    assert response.json() is None  # A1111's POST /options answers null


def txt2img(client, **body) -> dict:
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, **body})
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])


def infotext(info: dict) -> dict:
    return parse_infotext(info["infotexts"][0])


def assert_refused(response, field: str) -> str:
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", *field.split(".")], detail
    assert detail["msg"].startswith(f"{field}: "), detail
    return detail["msg"]


def test_get_returns_every_a1111_key_with_its_default(client):
    from ui.api_options import DEFAULTS

    got = options(client)
    assert set(DEFAULTS) <= set(got) and len(DEFAULTS) > 200
    assert got["send_seed"] is True and got["samples_format"] == "png" and got["eta_noise_seed_delta"] == 0
    assert got["img2img_color_correction"] is False and got["jpeg_quality"] == 80 and got["eta_ancestral"] == 1.0
    assert got["sd_model_checkpoint"].startswith("tiny-sd1") and got["sd_vae"] == "Automatic"
    assert got["CLIP_stop_at_last_layers"] == 1
    assert got["outdir_txt2img_samples"] == str(Path(client.engine.outputs.outdir) / "txt2img")


def test_a1111_options_test_sequence(client):
    """stable-diffusion-webui's test/test_api.py test_options_write: GET, POST the flipped send_seed, GET."""
    before = options(client)["send_seed"]
    set_options(client, {"send_seed": not before})
    assert options(client)["send_seed"] is (not before)
    set_options(client, {"send_seed": before})
    assert options(client)["send_seed"] is before


def test_a_stored_key_survives_a_restart(client, root, plain_cpu):
    set_options(client, {"img2img_color_correction": True, "eta_noise_seed_delta": 31337})
    again = options(client_on(root, plain_cpu))
    assert again["img2img_color_correction"] is True and again["eta_noise_seed_delta"] == 31337
    assert json.loads((root / "data" / "api-options.json").read_text())["eta_noise_seed_delta"] == 31337
    set_options(client, {"img2img_color_correction": False, "eta_noise_seed_delta": 0})


def test_clip_skip_set_by_options_reaches_the_next_job(client):
    assert "Clip skip" not in infotext(txt2img(client))
    set_options(client, {"CLIP_stop_at_last_layers": 2})
    try:
        assert options(client)["CLIP_stop_at_last_layers"] == 2 and client.engine.model_clip_skip("tiny-sd1") == 2
        assert infotext(txt2img(client))["Clip skip"] == "2"
    finally:
        set_options(client, {"CLIP_stop_at_last_layers": 1})


def test_override_clip_skip_is_for_one_job_unless_kept(client):
    override = {"override_settings": {"CLIP_stop_at_last_layers": 2}}
    first = txt2img(client, **override)
    assert infotext(first)["Clip skip"] == "2" and first["ignored"] == []
    assert "Clip skip" not in infotext(txt2img(client)) and options(client)["CLIP_stop_at_last_layers"] == 1
    try:
        txt2img(client, **override, override_settings_restore_afterwards=False)
        assert options(client)["CLIP_stop_at_last_layers"] == 2
        assert infotext(txt2img(client))["Clip skip"] == "2"
    finally:
        set_options(client, {"CLIP_stop_at_last_layers": 1})


def test_override_vae_names_the_file_in_the_infotext(client):
    info = txt2img(client, override_settings={"sd_vae": VAE_FILE})
    assert infotext(info)["VAE"] == VAE_FILE
    assert "VAE" not in infotext(txt2img(client)) and options(client)["sd_vae"] == "Automatic"


def test_sd_vae_set_by_options_is_remembered_for_the_checkpoint(client):
    set_options(client, {"sd_vae": VAE_FILE})
    try:
        assert options(client)["sd_vae"] == VAE_FILE == client.engine.model_vae("tiny-sd1")
        assert infotext(txt2img(client))["VAE"] == VAE_FILE
    finally:
        set_options(client, {"sd_vae": "None"})  # A1111's None: the checkpoint's own
    assert options(client)["sd_vae"] == "Automatic"


def test_other_override_keys_are_reported_as_ignored(client):
    info = txt2img(client, override_settings={"eta_noise_seed_delta": 31337, "some_extension_key": 1})
    assert info["ignored"] == ["override_settings.eta_noise_seed_delta", "override_settings.some_extension_key"]


def test_samples_save_false_keeps_api_jobs_from_saving(client):
    outdir = Path(client.engine.outputs.outdir)
    shutil.rmtree(outdir, ignore_errors=True)
    txt2img(client, save_images=True, override_settings={"samples_save": False})
    assert not list(outdir.rglob("*.png"))
    txt2img(client, save_images=True)
    assert len(list(outdir.rglob("*.png"))) == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"send_seed": "yes"}, "send_seed"),
    ({"jpeg_quality": 500}, "jpeg_quality"),
    ({"CLIP_stop_at_last_layers": 13}, "CLIP_stop_at_last_layers"),
    ({"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers"),
    ({"sd_vae": "../../etc/passwd"}, "sd_vae"),
    ({"samples_format": "jpg"}, "samples_format"),
    ({"not_an_option": 1}, "not_an_option"),
    ({"sd_model_checkpoint": "no-such-model"}, "sd_model_checkpoint"),
])
def test_bad_values_are_422_naming_the_key(client, body, field):
    before = options(client)
    assert_refused(client.post("/sdapi/v1/options", json={"send_size": False, **body}), field)
    assert options(client) == before  # nothing was applied, send_size included


def test_a1111_tolerance_an_int_for_a_float_and_none(client):
    set_options(client, {"eta_ddim": 1, "upscaler_for_img2img": None})
    assert options(client)["eta_ddim"] == 1
    set_options(client, {"eta_ddim": 0.0})


def test_a_bad_override_is_422_naming_it(client):
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 0}})
    assert_refused(response, "override_settings.CLIP_stop_at_last_layers")
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_vae": "missing.pt"}})
    assert_refused(response, "override_settings.sd_vae")


def test_an_outdir_is_shown_but_not_moved(client, tmp_path):
    current = options(client)["outdir_samples"]
    message = assert_refused(client.post("/sdapi/v1/options", json={"outdir_samples": str(tmp_path)}), "outdir_samples")
    assert current in message and options(client)["outdir_samples"] == current
    set_options(client, {"outdir_samples": current})  # its own value: accepted, as a client echoing GET sends it
