"""The A1111-compatible HTTP API (ui/api.py), endpoint by endpoint, against a real `app.py serve`
on loopback with two tiny random-weight models, over plain HTTP."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.browser_helpers import start_server

DATA = Path(__file__).resolve().parent / "data"
SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 7}
PLUGIN = "https://plugin.example"


def models_folder(tiny_models_dir: Path, root: Path, *names: str) -> Path:
    """A models folder whose checkpoints are the session's tiny model under other names (links)."""
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.symlink(tiny_models_dir / "Stable-diffusion" / "tiny-sd1", folder / name, target_is_directory=True)
    return root / "models"


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-server")
    models = models_folder(tiny_models_dir, root, "tiny-a", "tiny-b")
    server = start_server(root, "--models-dir", str(models), "--api", "--cors-allow-origins", PLUGIN)
    server.models = models
    yield server
    server.stop()


def api(server, path: str) -> str:
    return f"{server.url}/sdapi/v1/{path}"


def post(server, path: str, body=None, **kw) -> requests.Response:
    return requests.post(api(server, path), json=body, timeout=300, **kw)


def get(server, path: str, **kw) -> requests.Response:
    return requests.get(api(server, path), timeout=60, **kw)


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_refused(response: requests.Response, field: str) -> str:
    """HTTP 422 in FastAPI's validation shape, naming `field` in loc and message (one line)."""
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", *field.split(".")], detail
    message = detail[0]["msg"]
    assert message.startswith(f"{field}: ") and "\n" not in message, message
    return message


# --- txt2img ---------------------------------------------------------------------------------------
def test_txt2img_answers_images_with_their_parameters_and_info(server):
    response = post(server, "txt2img", {**SMALL, "batch_size": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and len(info["infotexts"]) == 2
    images = [png(i) for i in body["images"]]
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    assert [i.info["parameters"] for i in images] == info["infotexts"]
    assert "Seed: 8" in info["infotexts"][1] and info["sd_model_name"] in ("tiny-a", "tiny-b")
    assert body["parameters"]["batch_size"] == 2 and body["parameters"]["steps"] == 2


def test_txt2img_takes_a1111_defaults_for_fields_left_out(server):
    body = post(server, "txt2img", {"prompt": "a cat", "width": 64, "height": 64, "seed": 1}).json()
    info = json.loads(body["info"])
    assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (50, 7.0, "Euler")  # A1111's API defaults
    assert body["parameters"]["n_iter"] == 1 and body["parameters"]["save_images"] is False


def test_a_recorded_a1111_body_is_understood_field_for_field(server):
    recorded = json.loads((DATA / "a1111_txt2img.json").read_text())
    response = post(server, "txt2img", recorded)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body["parameters"][k] for k in recorded} == recorded  # echoed field for field
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1234, 1235] and len(body["images"]) == 2  # n_iter 2
    first = info["infotexts"][0]
    assert first.startswith(recorded["prompt"] + "\nNegative prompt: " + recorded["negative_prompt"] + "\n")
    for words in ("Steps: 3", "Sampler: DPM++ 2M", "Schedule type: Karras", "CFG scale: 7", "Seed: 1234", "Size: 64x64"):
        assert words in first, (words, first)
    assert info["ignored"] == ["s_noise"]
    assert "Clip skip: 2," in first and info["clip_skip"] == 2  # override_settings.CLIP_stop_at_last_layers


def test_unsupported_fields_are_accepted_and_reported_as_ignored(server):
    extra = {"script_name": "x/y/z plot", "script_args": [1, 2], "some_extension_field": 3}
    scripts = {"ADetailer": {"args": [True]}, "ControlNet": {"args": [{"enabled": False}]}}  # a unit that is off
    response = post(server, "txt2img", {**SMALL, **extra, "alwayson_scripts": scripts})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["ignored"] == [*sorted(extra), "alwayson_scripts.ADetailer"]


def test_scheduler_is_taken_by_a1111_name_or_label(server):
    for scheduler in ("karras", "Karras"):
        info = json.loads(post(server, "txt2img", {**SMALL, "sampler_name": "Euler", "scheduler": scheduler}).json()["info"])
        assert "Schedule type: Karras" in info["infotexts"][0]


def test_hires_fields_drive_the_hires_fix(server):
    body = post(server, "txt2img", {**SMALL, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
                                    "hr_second_pass_steps": 1, "denoising_strength": 0.5}).json()
    info = json.loads(body["info"])
    assert png(body["images"][0]).size == (128, 128)
    assert "Hires upscale: 2" in info["infotexts"][0] and "Denoising strength: 0.5" in info["infotexts"][0]


def test_send_images_false_answers_no_images(server):
    body = post(server, "txt2img", {**SMALL, "send_images": False}).json()
    assert body["images"] == [] and json.loads(body["info"])["all_seeds"] == [7]


def test_save_images_saves_in_the_outputs_folder(server):
    before = set(server.outdir.rglob("*.png"))
    post(server, "txt2img", {**SMALL, "seed": 4242, "save_images": True})
    assert [p.name.endswith("-4242.png") for p in set(server.outdir.rglob("*.png")) - before] == [True]


@pytest.mark.parametrize("fields, field", [
    ({"steps": 0}, "steps"),
    ({"n_iter": "x"}, "n_iter"),
    ({"sampler_name": "Euler z"}, "sampler_name"),
    ({"sampler_name": "Euler a", "scheduler": "sideways"}, "scheduler"),
    ({"width": 65}, "width"),
    ({"enable_hr": True, "hr_upscaler": "Nearest-Exact-ish"}, "hr_upscaler"),
    ({"override_settings": {"sd_model_checkpoint": "no-such-model"}}, "override_settings.sd_model_checkpoint"),
])
def test_a_bad_field_is_422_naming_it(server, fields, field):
    assert_refused(post(server, "txt2img", {**SMALL, **fields}), field)


def test_a_body_that_is_not_an_object_is_422(server):
    response = requests.post(api(server, "txt2img"), data="[1, 2", headers={"Content-Type": "application/json"},
                             timeout=60)
    assert response.status_code == 422 and "detail" in response.json()


def test_override_settings_picks_the_model_for_that_request_only(server):
    current = get(server, "options").json()["sd_model_checkpoint"]
    other = "tiny-b" if current.startswith("tiny-a") else "tiny-a"
    info = json.loads(post(server, "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": other}}).json()["info"])
    assert info["sd_model_name"] == other
    assert get(server, "options").json()["sd_model_checkpoint"].split(" [")[0] == current.split(" [")[0]
    info = json.loads(post(server, "txt2img", SMALL).json()["info"])
    assert info["sd_model_name"] == current.split(" [")[0]  # restored afterwards, as A1111 does


# --- img2img ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_img2img_takes_base64_with_or_without_a_data_prefix(server, prefix):
    init = Image.new("RGB", (96, 64), (200, 30, 30))
    body = post(server, "img2img", {**SMALL, "init_images": [prefix + b64(init)], "denoising_strength": 0.5,
                                    "resize_mode": 1}).json()
    info = json.loads(body["info"])
    assert png(body["images"][0]).size == (64, 64)
    assert "Denoising strength: 0.5" in info["infotexts"][0] and info["denoising_strength"] == 0.5
    assert body["parameters"]["init_images"] is None  # include_init_images false: not echoed back


@pytest.mark.parametrize("fields, field", [
    ({"init_images": None}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"init_images": ["not base64!!"]}, "init_images"),
    ({"init_images": "a string, not a list"}, "init_images"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"denoising_strength": 1.5}, "denoising_strength"),
])
def test_img2img_bad_field_is_422_naming_it(server, fields, field):
    good = {"init_images": [b64(Image.new("RGB", (64, 64)))]}
    assert_refused(post(server, "img2img", {**SMALL, **good, **fields}), field)


# --- extras, PNG info ------------------------------------------------------------------------------
def test_extra_single_image_upscales(server):
    body = post(server, "extra-single-image", {"image": b64(Image.new("RGB", (32, 24), "blue")),
                                               "upscaling_resize": 2, "upscaler_1": "Lanczos"}).json()
    assert png(body["image"]).size == (64, 48) and "Postprocess upscaler: Lanczos" in body["html_info"]


def test_extra_batch_images_upscales_each(server):
    images = [{"data": b64(Image.new("RGB", (16, 16), c)), "name": c} for c in ("red", "green")]
    body = post(server, "extra-batch-images", {"imageList": images, "upscaling_resize": 3, "upscaler_1": "None"}).json()
    assert [png(i).size for i in body["images"]] == [(48, 48), (48, 48)]


def test_extras_bad_scale_is_422_naming_upscaling_resize(server):
    response = post(server, "extra-single-image", {"image": b64(Image.new("RGB", (16, 16))), "upscaling_resize": 7})
    assert_refused(response, "upscaling_resize")


def test_png_info_reads_back_the_parameters(server):
    made = post(server, "txt2img", SMALL).json()
    body = post(server, "png-info", {"image": made["images"][0]}).json()
    assert body["info"] == json.loads(made["info"])["infotexts"][0]
    assert body["parameters"]["Seed"] == "7" and body["parameters"]["Prompt"] == "a cat"


def test_png_info_of_a_bad_image_is_422_naming_image(server):
    assert_refused(post(server, "png-info", {"image": base64.b64encode(b"not an image").decode()}), "image")


# --- progress and interrupt -------------------------------------------------------------------------
def long_job(server, results: list) -> threading.Thread:
    """A job that runs until interrupted (150 steps x 100 batches on the tiny model)."""
    def run():
        results.append(post(server, "txt2img", {**SMALL, "steps": 150, "n_iter": 100}))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def poll_progress(server, condition) -> dict:
    event = threading.Event()
    for _ in range(1200):
        state = get(server, "progress").json()
        if condition(state):
            return state
        event.wait(0.05)
    pytest.fail(f"progress never showed it; last: {state}")


def test_progress_reports_the_running_job_with_a_preview(server):
    results: list = []
    thread = long_job(server, results)
    try:
        state = poll_progress(server, lambda s: s["current_image"] is not None)
        assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 100
        assert state["state"]["sampling_steps"] == 150 and state["state"]["sampling_step"] >= 1
        assert png(state["current_image"]).size[0] > 0
    finally:
        post(server, "interrupt")
        thread.join(300)
    assert get(server, "progress").json()["state"]["job_count"] == 0  # idle again


def test_interrupt_stops_the_running_api_job(server):
    results: list = []
    thread = long_job(server, results)
    poll_progress(server, lambda s: s["state"]["sampling_step"] >= 1)
    assert post(server, "interrupt").status_code == 200
    thread.join(300)
    assert not thread.is_alive()
    body = results[0].json()
    assert results[0].status_code == 200 and json.loads(body["info"])["interrupted"] is True
    # As A1111 answers: the picture as far as its steps got, not an empty list.
    assert len(body["images"]) == 1 and png(body["images"][0]).size == (64, 64)


# --- models, options, lists ------------------------------------------------------------------------
def test_sd_models_lists_the_checkpoints_as_a1111_does(server):
    rows = get(server, "sd-models").json()
    assert sorted(r["model_name"] for r in rows) == ["tiny-a", "tiny-b"]
    assert set(rows[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}


def test_options_sd_model_checkpoint_switches_the_model(server):
    for name in ("tiny-b", "tiny-a"):
        assert post(server, "options", {"sd_model_checkpoint": name}).status_code == 200
        assert get(server, "options").json()["sd_model_checkpoint"].startswith(f"{name} [")
        assert json.loads(post(server, "txt2img", SMALL).json()["info"])["sd_model_name"] == name


def test_options_unknown_model_is_422(server):
    assert_refused(post(server, "options", {"sd_model_checkpoint": "nope"}), "sd_model_checkpoint")


def test_refresh_checkpoints_finds_a_new_model(server, tiny_models_dir):
    models_folder(tiny_models_dir, server.models.parent, "tiny-c")
    assert "tiny-c" not in [r["model_name"] for r in get(server, "sd-models").json()]
    assert post(server, "refresh-checkpoints").status_code == 200
    assert "tiny-c" in [r["model_name"] for r in get(server, "sd-models").json()]


def test_samplers_schedulers_and_upscalers_are_listed(server):
    samplers = [s["name"] for s in get(server, "samplers").json()]
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    schedulers = get(server, "schedulers").json()
    assert [s["name"] for s in schedulers] == [
        "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
        "align_your_steps", "simple", "normal", "ddim", "beta"]  # A1111's twelve, in its order
    assert schedulers[2] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                             "need_inner_model": False}
    options = {s["name"]: s["options"]["schedule_types"].split(",") for s in get(server, "samplers").json()}
    assert "karras" in options["DPM++ 2M"] and "karras" not in options["DDIM"]  # DDIM keeps its own timesteps
    upscalers = [u["name"] for u in get(server, "upscalers").json()]
    assert upscalers[:2] == ["None", "Lanczos"]


def test_the_openapi_document_lists_the_routes(server):
    document = requests.get(server.url + "/openapi.json", timeout=60).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress"} <= set(document["paths"])
    assert "swagger" in requests.get(server.url + "/docs", timeout=60).text.lower()


def test_the_api_page_loads_swagger_ui_from_easel_not_a_cdn(server):
    """Offline, a CDN does not answer and the page stays blank: every file it loads is served here."""
    page = requests.get(server.url + "/docs", timeout=60).text
    linked = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)""", page) + re.findall(r"""url:\s*['"]([^'"]+)""", page)
    assert linked and all(link.startswith("/") for link in linked), linked
    for name, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css"), ("favicon.png", "image/png")):
        response = requests.get(f"{server.url}/docs/{name}", timeout=60)
        assert response.status_code == 200 and kind in response.headers["content-type"] and len(response.content) > 1000
    assert "SwaggerUIBundle" in requests.get(server.url + "/docs/swagger-ui-bundle.js", timeout=60).text
    refused = requests.get(server.url + "/docs/core.py", timeout=60)  # only the page's files, by name
    assert refused.status_code == 404 and "name:" in refused.text


# --- the guard still stands in front ---------------------------------------------------------------
def test_a_foreign_origin_is_refused_on_api_routes(server):
    response = post(server, "txt2img", SMALL, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and "Origin" in response.text


def test_a_listed_origin_may_call_the_api(server):
    response = get(server, "sd-models", headers={"Origin": PLUGIN})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == PLUGIN


# --- the API on the network: credentials ----------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("api-auth"), "--demo", "--listen", "127.0.0.1",
                          "--auth", "user:pass", "--api-auth", "bot:secret")
    yield server
    server.stop()


def test_listen_with_auth_refuses_the_api_without_credentials(auth_server):
    response = get(auth_server, "sd-models")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Basic"
    assert requests.get(auth_server.url + "/openapi.json", timeout=60).status_code == 401
    assert requests.get(auth_server.url + "/docs/swagger-ui.css", timeout=60).status_code == 401


def test_a_wrong_api_password_is_refused(auth_server):
    assert get(auth_server, "sd-models", auth=("bot", "wrong")).status_code == 401


@pytest.mark.parametrize("login", [("bot", "secret"), ("user", "pass")])
def test_api_auth_and_page_logins_both_open_the_api(auth_server, login):
    assert get(auth_server, "sd-models", auth=login).status_code == 200


def test_api_auth_logins_do_not_open_the_page(auth_server):
    response = requests.post(auth_server.url + "/login", data={"username": "bot", "password": "secret"}, timeout=10)
    assert response.status_code in (400, 401)


@pytest.mark.parametrize("sampler, scheduler", [("DDIM", "normal"), ("DDIM", "karras"), ("Euler a", "normal"),
                                                ("Euler a", "karras"), ("Euler", "beta"), ("DPM++ 2M", "sgm_uniform")])
def test_any_sampler_takes_any_schedule_type_as_a1111_does(server, sampler, scheduler):
    """SillyTavern's default (DDIM + normal) and Open WebUI's (Euler a + Karras) were 422 before."""
    response = post(server, "txt2img", {**SMALL, "sampler_name": sampler, "scheduler": scheduler})
    assert response.status_code == 200, response.text[:300]
    info = json.loads(response.json()["info"])
    assert info["sampler_name"] == sampler and info["scheduler"].lower().replace(" ", "_") == scheduler
