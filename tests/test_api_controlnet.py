"""sd-webui-controlnet's API on a real `app.py serve --api` (ui/api_controlnet.py): units in
`alwayson_scripts.controlnet.args` as the Photoshop and Krita plugins send them, and the
/controlnet/* routes, against tiny ControlNet files in lllyasviel's layout."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image
from safetensors.torch import save_file

from tests.browser_helpers import start_server
from tests.ldm_export import controlnet_to_ldm
from tests.test_api import SMALL, get, models_folder, png, post
from tests.test_controlnet import house, sdxl_shaped_controlnet, tiny_controlnet


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("api-controlnet")
    models = models_folder(tiny_models_dir, root, "tiny-a")
    unet = UNet2DConditionModel.from_pretrained(tiny_models_dir / "Stable-diffusion" / "tiny-sd1" / "unet")
    (models / "ControlNet").mkdir()
    save_file(controlnet_to_ldm(tiny_controlnet(unet, 1)), str(models / "ControlNet" / "control_v11p_sd15_canny.safetensors"))
    save_file(controlnet_to_ldm(sdxl_shaped_controlnet(unet, 2)),
              str(models / "ControlNet" / "controlnet_sdxl_canny.safetensors"))
    server = start_server(root, "--models-dir", str(models), "--api")
    yield server
    server.stop()


def plugin_unit(**fields):
    """A unit as Auto-Photoshop-StableDiffusion-Plugin and auto-sd-paint-ext (Krita) send it: the
    older field names (input_image, lowvram, guessmode) beside the newer ones."""
    return {"enabled": True, "input_image": b64(house()), "mask": "", "module": "canny",
            "model": "control_v11p_sd15_canny", "weight": 1.0, "resize_mode": "Crop and Resize", "lowvram": False,
            "processor_res": 512, "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0, "guidance_end": 1.0,
            "guessmode": False, "control_mode": 0, "pixel_perfect": False, **fields}


def txt2img(server, *units, key="controlnet"):
    body = {**SMALL, "alwayson_scripts": {key: {"args": list(units)}} if units else {}}
    return post(server, "txt2img", body)


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(png(response.json()["images"][0]).convert("RGB"), dtype=np.int16)


def test_a_plugins_unit_guides_the_picture_and_is_in_its_infotext(server):
    guided = txt2img(server, plugin_unit())
    assert np.abs(pixels(guided) - pixels(txt2img(server))).mean() > 1.0
    info = json.loads(guided.json()["info"])
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in info["infotexts"][0]
    assert info["ignored"] == []


def test_a_unit_at_weight_0_gives_the_plain_pixels(server):
    assert np.array_equal(pixels(txt2img(server, plugin_unit(weight=0), key="ControlNet")), pixels(txt2img(server)))


def test_a_bad_unit_is_422_naming_its_field(server):
    response = txt2img(server, plugin_unit(weight=5))
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["msg"] == "alwayson_scripts.controlnet.args[0].weight: must be between 0 and 2, got 5"


def test_a_controlnet_of_another_family_is_422_naming_both(server):
    response = txt2img(server, plugin_unit(model="controlnet_sdxl_canny"))
    assert response.status_code == 422, response.text
    msg = response.json()["detail"][0]["msg"]
    assert msg.startswith("alwayson_scripts.controlnet.args[0].model: controlnet_sdxl_canny is a SDXL ControlNet")


def test_the_model_list_names_files_as_the_extension_does(server):
    names = requests.get(server.url + "/controlnet/model_list", timeout=30).json()["model_list"]
    assert sorted(n.split(" [")[0] for n in names) == ["control_v11p_sd15_canny", "controlnet_sdxl_canny"]
    assert all(len(n.split(" [")[1]) == 9 for n in names)  # 8 hex digits and "]"


def test_the_module_list_and_version(server):
    modules = requests.get(server.url + "/controlnet/module_list", timeout=30).json()
    assert modules["module_list"][0] == "none" and "canny" in modules["module_list"]
    canny = modules["module_detail"]["canny"]["sliders"]
    assert [s["name"] for s in canny] == ["Resolution", "Canny Low Threshold", "Canny High Threshold"]
    assert requests.get(server.url + "/controlnet/version", timeout=30).json() == {"version": 3}


def test_detect_gives_the_preprocessed_map(server):
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(house(128))], "controlnet_processor_res": 128}
    answer = requests.post(server.url + "/controlnet/detect", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    edges = np.asarray(png(answer.json()["images"][0]).convert("L"))
    assert edges.shape == (128, 128) and set(np.unique(edges)) == {0, 255}


def test_detect_refuses_an_unknown_module_naming_the_field(server):
    body = {"controlnet_module": "openpose", "controlnet_input_images": [b64(house())]}
    answer = requests.post(server.url + "/controlnet/detect", json=body, timeout=60)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["msg"].startswith("controlnet_module: 'openpose' is not a preprocessor here")
