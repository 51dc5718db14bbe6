"""The `webuiapi` client (the A1111 API client on PyPI), used as its README shows, against a real
`app.py serve` on loopback: txt2img, img2img, PNG info, interrupt, model list and switch."""
from __future__ import annotations

import threading
from urllib.parse import urlsplit

import pytest
import webuiapi

from tests.browser_helpers import start_server
from tests.test_api import models_folder

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("webuiapi-server")
    server = start_server(root, "--models-dir", str(models_folder(tiny_models_dir, root, "tiny-a", "tiny-b")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server):
    address = urlsplit(server.url)
    return webuiapi.WebUIApi(host=address.hostname, port=address.port)


@pytest.fixture(scope="module")
def squirrel(api):
    return api.txt2img(prompt="cute squirrel", negative_prompt="ugly, out of frame", seed=1003, styles=["anime"],
                       cfg_scale=7, **SMALL)


def test_txt2img(squirrel):
    assert squirrel.image.size == (64, 64)
    assert squirrel.info["all_seeds"] == [1003]
    assert squirrel.image.info["parameters"] == squirrel.info["infotexts"][0]
    assert squirrel.info["infotexts"][0].startswith("cute squirrel\nNegative prompt: ugly, out of frame\n")
    assert "styles.anime" in squirrel.info["ignored"]  # not in data/styles.csv: left out, as A1111 does


def test_img2img(api, squirrel):
    result = api.img2img(images=[squirrel.image], prompt="cute cat", seed=5555, cfg_scale=6.5, denoising_strength=0.6,
                         **SMALL)
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.6" in result.info["infotexts"][0] and result.info["all_seeds"] == [5555]


def test_png_info(api, squirrel):
    result = api.png_info(squirrel.image)
    assert result.info == squirrel.info["infotexts"][0]
    assert result.json["parameters"]["Seed"] == "1003"


def test_interrupt(api):
    results: list = []
    thread = threading.Thread(target=lambda: results.append(api.txt2img(prompt="x", n_iter=100, steps=150, width=64,
                                                                        height=64)), daemon=True)
    thread.start()
    event = threading.Event()
    for _ in range(1200):
        if api.get_progress()["state"]["sampling_step"] >= 1:
            break
        event.wait(0.05)
    api.interrupt()
    thread.join(300)
    assert not thread.is_alive() and results[0].info["interrupted"] is True
    assert len(results[0].images) == 1  # as A1111: the picture as far as its steps got


def test_model_list_and_switch(api):
    titles = api.util_get_model_names()
    assert [t.split(" [")[0] for t in titles] == ["tiny-a", "tiny-b"]
    for name in ("tiny-b", "tiny-a"):
        api.util_set_model(name)
        assert api.util_get_current_model().startswith(f"{name} [")
        assert api.txt2img(prompt="x", **SMALL).info["sd_model_name"] == name
