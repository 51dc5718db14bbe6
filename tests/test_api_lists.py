"""A1111's list endpoints (ui/api_lists.py): sd-vae, loras, embeddings, realesrgan-models, latent
upscale modes, face restorers, prompt styles, hypernetworks, cmd-flags, memory and /internal/ping,
against the real app as `app.py serve` builds it (build_app: the guard around the API), on a
models folder of tiny files. No model is loaded: every list is read from files' headers."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from tests.tiny_models import models_linking_tiny_sd1

OWN = "http://127.0.0.1:7860"
EVIL_ORIGIN = "http://evil.example:7860"
GETS = ("sd-vae", "loras", "embeddings", "realesrgan-models", "latent-upscale-modes", "face-restorers",
        "prompt-styles", "hypernetworks", "cmd-flags", "memory")
POSTS = ("refresh-vae", "refresh-loras", "refresh-embeddings")


def weights(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lists_app(tiny_models_dir, tmp_path_factory, plain_cpu):
    import gradio as gr

    from engine.engine import Engine, EngineConfig
    from ui.server import build_app

    root = tmp_path_factory.mktemp("api-lists")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    weights(models / "VAE" / "soft-vae.safetensors", {"decoder.conv_in.weight": (2, 2)})
    weights(models / "Lora" / "ink.safetensors", {"lora_unet_x.lora_down.weight": (2, 2)},
            {"ss_output_name": "inkstyle", "ss_network_dim": "4"})
    weights(models / "LyCORIS" / "plain.safetensors", {"lora_unet_x.lora_down.weight": (2, 2)})
    weights(models / "embeddings" / "fits.safetensors", {"emb_params": (2, 768)})   # SD 1.x's CLIP-L width
    weights(models / "embeddings" / "wide.safetensors", {"emb_params": (1, 1024)})  # SD 2.x's
    weights(models / "embeddings" / "xl.safetensors", {"clip_l": (3, 768), "clip_g": (3, 1280)})
    weights(models / "RealESRGAN" / "RealESRGAN_x2plus.safetensors", {"conv_first.weight": (2, 2)})
    weights(models / "ESRGAN" / "4x-sharp.safetensors", {"conv_first.weight": (2, 2)})
    engine = Engine(EngineConfig(models, root / "outputs", root / "data"), hardware=plain_cpu)
    (root / "data").mkdir(exist_ok=True)
    with gr.Blocks() as page:
        gr.Markdown("lists")
    app = build_app(page, logins=[], outdir=root / "outputs", max_upload_mb=1, engine=engine)
    with TestClient(app, base_url=OWN) as client:
        client.models, client.data, client.engine = models, root / "data", engine
        yield client


def get(client, path: str):
    response = client.get(f"/sdapi/v1/{path}")
    assert response.status_code == 200, response.text
    return response.json()


def test_sd_vae_lists_the_files_in_models_vae_and_refresh_shows_a_new_one(lists_app):
    assert get(lists_app, "sd-vae") == [{"model_name": "soft-vae.safetensors", "filename": "VAE/soft-vae.safetensors"}]
    weights(lists_app.models / "VAE" / "sdxl" / "new.safetensors", {"decoder.conv_in.weight": (2, 2)})
    response = lists_app.post("/sdapi/v1/refresh-vae")
    assert response.status_code == 200 and response.json() is None
    assert "sdxl/new.safetensors" in [v["model_name"] for v in get(lists_app, "sd-vae")]


def test_loras_in_the_lora_extensions_shape_with_their_metadata(lists_app):
    rows = {row["name"]: row for row in get(lists_app, "loras")}
    assert rows["ink"] == {"name": "ink", "alias": "inkstyle", "path": "Lora/ink.safetensors",
                           "metadata": {"ss_output_name": "inkstyle", "ss_network_dim": "4"}}
    assert rows["plain"] == {"name": "plain", "alias": "plain", "path": "LyCORIS/plain.safetensors", "metadata": {}}


def test_a_lora_added_is_listed_after_refresh_loras(lists_app):
    assert "later" not in [row["name"] for row in get(lists_app, "loras")]
    weights(lists_app.models / "Lora" / "later.safetensors", {"lora_unet_y.lora_down.weight": (2, 2)})
    response = lists_app.post("/sdapi/v1/refresh-loras")
    assert response.status_code == 200 and response.json() is None
    assert "later" in [row["name"] for row in get(lists_app, "loras")]


def test_embeddings_are_loaded_when_they_fit_the_models_text_encoder_and_skipped_otherwise(lists_app):
    found = get(lists_app, "embeddings")
    assert found["loaded"] == {"fits": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                        "shape": 768, "vectors": 2}}
    assert found["skipped"]["wide"]["shape"] == 1024 and found["skipped"]["wide"]["vectors"] == 1
    assert found["skipped"]["xl"]["shape"] == 768 + 1280 and found["skipped"]["xl"]["vectors"] == 3
    assert set(found["skipped"]) == {"wide", "xl"}


def test_an_embedding_added_is_listed_after_refresh_embeddings(lists_app):
    weights(lists_app.models.parent / "embeddings" / "beside.safetensors", {"emb_params": (768,)})
    assert lists_app.post("/sdapi/v1/refresh-embeddings").json() is None
    assert get(lists_app, "embeddings")["loaded"]["beside"]["vectors"] == 1


def test_realesrgan_models_are_the_files_in_models_realesrgan_with_their_scale(lists_app):
    assert get(lists_app, "realesrgan-models") == [
        {"name": "RealESRGAN_x2plus", "path": "RealESRGAN/RealESRGAN_x2plus.safetensors", "scale": 2}]


def test_latent_upscale_modes_are_those_hires_fix_runs(lists_app):
    from engine.request import HIRES_UPSCALERS

    modes = get(lists_app, "latent-upscale-modes")
    assert {"name": "Latent"} in modes
    assert all(set(m) == {"name"} and m["name"] in HIRES_UPSCALERS for m in modes)
    assert {"name": "Lanczos"} not in modes


def test_face_restorers_are_listed_only_where_their_models_are(lists_app):
    assert get(lists_app, "face-restorers") == []
    folder = lists_app.models / "GFPGAN"
    folder.mkdir()
    (folder / "GFPGANv1.4.pth").write_bytes(b"not read")
    try:
        assert get(lists_app, "face-restorers") == [{"name": "GFPGAN", "cmd_dir": str(folder)}]
    finally:
        (folder / "GFPGANv1.4.pth").unlink()


def test_prompt_styles_are_read_from_styles_csv_in_the_data_folder(lists_app):
    styles = lists_app.data / "styles.csv"
    assert get(lists_app, "prompt-styles") == []  # no file
    styles.write_text('name,prompt,negative_prompt\n"Cinematic","{prompt}, cinematic, 35mm","blurry, lowres"\n'
                      'Plain,just words,\n', encoding="utf-8")
    assert get(lists_app, "prompt-styles") == [
        {"name": "Cinematic", "prompt": "{prompt}, cinematic, 35mm", "negative_prompt": "blurry, lowres"},
        {"name": "Plain", "prompt": "just words", "negative_prompt": ""}]


@pytest.mark.parametrize("content", [b"title;text\nA;b\n", b"", b"name,prompt\n\xff\xfe bad\n",
                                     b'name,prompt\n"unclosed,\x00\n'])
def test_a_malformed_styles_csv_lists_no_styles_and_logs_why(lists_app, content, caplog):
    (lists_app.data / "styles.csv").write_bytes(content)
    try:
        assert get(lists_app, "prompt-styles") == []
    finally:
        (lists_app.data / "styles.csv").unlink()
    assert "styles.csv" in caplog.text


def test_hypernetworks_are_none_and_ping_answers(lists_app):
    assert get(lists_app, "hypernetworks") == []
    response = lists_app.get("/internal/ping")
    assert response.status_code == 200 and response.json() == {}


def test_cmd_flags_has_a1111s_flags_with_easels_values(lists_app):
    flags = get(lists_app, "cmd-flags")
    assert {"listen", "port", "api", "ckpt_dir", "vae_dir", "lora_dir", "embeddings_dir", "no_half", "medvram",
            "xformers", "styles_file", "api_auth", "nowebui", "data_dir"} <= set(flags)
    assert flags["api"] is True and flags["listen"] is False and flags["port"] == 7860
    assert flags["ckpt_dir"] == "models/Stable-diffusion" and flags["lora_dir"] == "models/Lora"
    assert flags["vae_dir"] == "models/VAE" and flags["api_auth"] is None and flags["gradio_auth"] is None


def test_memory_in_a1111s_shape(lists_app):
    memory = get(lists_app, "memory")
    ram = memory["ram"]
    assert set(ram) == {"free", "used", "total"} and 0 < ram["used"] < ram["total"]
    assert ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"}  # plain_cpu: no CUDA device


def test_every_list_route_is_in_the_openapi_document(lists_app):
    paths = lists_app.get("/openapi.json").json()["paths"]
    for path in GETS:
        assert "get" in paths[f"/sdapi/v1/{path}"], path
    for path in POSTS:
        assert "post" in paths[f"/sdapi/v1/{path}"], path
    assert "get" in paths["/internal/ping"]


def test_every_list_route_refuses_another_sites_page(lists_app):
    requests = [("GET", f"/sdapi/v1/{p}") for p in GETS] + [("POST", f"/sdapi/v1/{p}") for p in POSTS] \
        + [("GET", "/internal/ping")]
    for method, path in requests:
        assert lists_app.request(method, path).status_code == 200, path  # served to its own page / a script
        refused = lists_app.request(method, path, headers={"Origin": EVIL_ORIGIN})
        assert refused.status_code == 403, path
        assert refused.json()["detail"].startswith("Origin:"), path


def test_every_list_route_asks_for_the_apis_credentials(lists_app):
    from fastapi import FastAPI

    from ui.api import Api

    app = FastAPI()
    app.include_router(Api(lists_app.engine, logins=[("user", "secret")]).router)
    client = TestClient(app)
    for path in [f"/sdapi/v1/{p}" for p in GETS] + ["/internal/ping"]:
        assert client.get(path).status_code == 401, path
        assert client.get(path, auth=("user", "secret")).status_code == 200, path
    for path in [f"/sdapi/v1/{p}" for p in POSTS]:
        assert client.post(path).status_code == 401, path


def test_interrogate_is_a_one_line_501_that_says_why(lists_app):
    response = lists_app.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert response.status_code == 501
    detail = response.json()["detail"]
    assert detail.startswith("interrogate: ") and "png-info" in detail and "\n" not in detail


@pytest.mark.parametrize("header", ["Basic ", "Basic", "Basic Og==", "Bearer x", "Basic %%%"])
def test_an_empty_or_odd_authorization_header_is_ignored_when_no_login_is_asked(lists_app, header):
    """Open WebUI and SillyTavern send `Authorization: Basic ` by default; A1111 without
    --api-auth ignores it."""
    response = lists_app.get("/sdapi/v1/options", headers={"Authorization": header})
    assert response.status_code == 200, response.text


def test_options_always_name_the_checkpoint_a_job_would_use(lists_app):
    assert lists_app.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-sd1")


def test_basic_credentials_reads_user_and_password_and_nothing_else():
    from ui.api import basic_credentials

    assert basic_credentials("Basic " + base64.b64encode(b"ann:pa:ss").decode()) == ("ann", "pa:ss")
    assert basic_credentials("basic " + base64.b64encode(b"ann:").decode()) == ("ann", "")
    for header in (None, "", "Basic ", "Basic bm9jb2xvbg==", "Bearer abc", "Basic ***"):
        assert basic_credentials(header) is None, header
