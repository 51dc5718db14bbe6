"""ControlNet units on the OpenVINO backend (engine/networks/controlnet_openvino.py): the ControlNet
and the UNet with residual inputs converted once and cached, agreeing with torch's ControlNet
within the backend's tolerance (tests/test_openvino.py's: f32 graphs, another order of operations);
weight 0 stays the plain graph's pixels exactly; a LoRA with a unit runs on torch and says so."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("openvino")

from safetensors.torch import save_file  # noqa: E402

from tests.conftest import loaded_engine  # noqa: E402
from tests.test_controlnet import house, png, tiny_controlnet  # noqa: E402
from tests.ldm_export import controlnet_to_ldm  # noqa: E402
from tests.test_lora import kohya_lora  # noqa: E402
from tests.test_openvino import assert_close, pixels  # noqa: E402
from tests.tiny_models import models_linking_tiny_sd1  # noqa: E402

BASE = {"prompt": "a house", "steps": 3, "width": 64, "height": 48, "seed": 11, "cfg_scale": 5.0, "save_images": False}
CONVERTED_UNET = "ControlNet: converted this model's UNet with residual inputs for OpenVINO"
ON_TORCH = "ControlNet: "


@pytest.fixture(scope="module")
def models(tiny_models_dir, tmp_path_factory, plain_cpu):
    root = tmp_path_factory.mktemp("ov-cn-models")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    pipe = loaded_engine(models, root / "probe", plain_cpu).manager.current.pipe
    (models / "ControlNet").mkdir()
    save_file(controlnet_to_ldm(tiny_controlnet(pipe.unet, 5)), str(models / "ControlNet" / "control_v11p_sd15_canny.safetensors"))
    (models / "Lora").mkdir()
    save_file(kohya_lora(pipe, 1), str(models / "Lora" / "style.safetensors"))
    return models


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cn")


@pytest.fixture(scope="module")
def ov(models, data_root, plain_cpu):
    return loaded_engine(models, data_root, replace(plain_cpu, openvino=True))


@pytest.fixture(scope="module")
def on_torch(models, tmp_path_factory, plain_cpu):
    return loaded_engine(models, tmp_path_factory.mktemp("torch-cn"), plain_cpu)


def unit(**fields):
    return {"image": png(house()), "module": "canny", "model": "control_v11p_sd15_canny", "pixel_perfect": True,
            **fields}


def run(engine, units=(), **fields):
    return engine.generate(engine.make_request({**BASE, **fields, "controlnet": list(units)}))


@pytest.fixture(scope="module")
def first(ov):
    """The OpenVINO engine's first ControlNet job: it converts the UNet and the ControlNet."""
    return run(ov, [unit()])


def test_a_unit_runs_on_openvino_and_agrees_with_torch(first, on_torch):
    assert "Backend: openvino" in first.infotexts[0]
    assert not any(n.startswith(ON_TORCH) and "torch" in n for n in first.notes), first.notes
    assert any(n.startswith(CONVERTED_UNET) for n in first.notes), first.notes
    assert_close(first.images[0], run(on_torch, [unit()]).images[0])


def test_the_converted_graphs_are_read_from_the_cache_by_the_next_process(first, models, data_root, plain_cpu):
    again = loaded_engine(models, data_root, replace(plain_cpu, openvino=True))  # same data folder: same cache
    result = run(again, [unit()])
    assert not any("converted" in n for n in result.notes), result.notes
    assert np.array_equal(pixels(result.images[0]), pixels(first.images[0]))


def test_the_control_modes_and_two_units_agree_with_torch(first, ov, on_torch):
    units = [unit(control_mode="ControlNet is more important"), unit(module="invert", weight=0.5,
                                                                     control_mode="My prompt is more important")]
    assert_close(run(ov, units).images[0], run(on_torch, units).images[0])


def test_weight_0_and_a_plain_job_after_a_unit_give_the_plain_graphs_pixels(first, ov):
    plain = pixels(run(ov).images[0])
    assert np.array_equal(pixels(run(ov, [unit(weight=0)]).images[0]), plain)
    run(ov, [unit()])
    assert np.array_equal(pixels(run(ov).images[0]), plain)
    assert not ov.manager.current.openvino.control.loaded  # the plain job dropped the ControlNet graph


def test_a_lora_with_a_unit_runs_on_torch_and_says_why(first, ov, on_torch):
    result = run(ov, [unit()], prompt="a house <lora:style:0.8>")
    assert any(n.startswith("ControlNet: with LoRAs, the UNet's steps ran on torch") for n in result.notes)
    reference = run(on_torch, [unit()], prompt="a house <lora:style:0.8>")
    assert_close(result.images[0], reference.images[0])
