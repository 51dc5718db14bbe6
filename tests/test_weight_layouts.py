"""Weight files in the layouts the field ships (tests/field_files.py), read through the one safe
reader (engine/safe_files.py) and then used: BasicSR's `params_ema`/`params` wrappers, an old-arch
ESRGAN `model.N` file, SwinIR's `params`, DataParallel's `module.` prefix, `{"model": ...}`, and
Lightning's `state_dict` nesting; a wrapper holding anything but tensors is refused by name."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import app
from engine.errors import UnknownCheckpointError
from engine.families import Family
from engine.safe_files import inspect_weights, read_nested_tensors, read_tensors
from tests.field_files import (data_parallel, lightning, realesrgan_x4plus, rrdb_state_dict, swinir_release,
                               swinir_state_dict, ultrasharp)
from tests.ldm_export import export_single_file, ldm_config, pipeline_to_ldm, write_yaml

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 7, "cfg_scale": 5.0}


def noise(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the reader ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [
    lambda sd: {"params_ema": sd, "params": {k: v + 1 for k, v in sd.items()}},
    lambda sd: {"params": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: lightning(sd),
    lambda sd: {"model": sd},
    lambda sd: {"module": sd},
    lambda sd: data_parallel(sd),
    lambda sd: {"state_dict": data_parallel(sd), "global_step": 1},
    lambda sd: lightning({"state_dict": sd}),
], ids=["params_ema-over-params", "params", "state_dict", "lightning", "model", "deepspeed-module",
        "dataparallel-prefix", "prefix-inside-state_dict", "twice-nested"])
def test_every_wrapper_gives_the_same_tensors_as_the_flat_file(tmp_path, layout):
    flat = rrdb_state_dict(3)
    torch.save(layout(flat), tmp_path / "wrapped.pth")
    assert same(read_tensors(tmp_path / "wrapped.pth"), flat)
    assert same(read_nested_tensors(tmp_path / "wrapped.pth"), flat)
    info = inspect_weights(tmp_path / "wrapped.pth")
    assert info.ok and info.shapes == {k: tuple(v.shape) for k, v in flat.items()}


def test_a_dataparallel_safetensors_file_loses_its_prefix_too(tmp_path):
    flat = rrdb_state_dict(4)
    save_file(data_parallel(flat), str(tmp_path / "dp.safetensors"))
    assert same(read_tensors(tmp_path / "dp.safetensors"), flat)
    assert inspect_weights(tmp_path / "dp.safetensors").shapes == {k: tuple(v.shape) for k, v in flat.items()}


@pytest.mark.parametrize("wrapper, bad, kind", [
    ("params_ema", "note", "str"), ("params", "version", "int"), ("state_dict", "optim", "list")])
def test_a_wrapper_holding_something_else_is_refused_by_name(tmp_path, wrapper, bad, kind):
    inner = {**rrdb_state_dict(0), bad: {"str": "hello", "int": 3, "list": [1, 2]}[kind]}
    torch.save({wrapper: inner}, tmp_path / "odd.pth")
    with pytest.raises(UnknownCheckpointError) as error:
        read_tensors(tmp_path / "odd.pth")
    message = str(error.value)
    assert message.startswith("odd.pth: ") and repr(wrapper) in message and repr(bad) in message and kind in message
    assert "\n" not in message
    assert inspect_weights(tmp_path / "odd.pth").reason == message  # the listing says the same


def test_an_a1111_embedding_keeps_its_own_layout(tmp_path):
    vector = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vector}, "name": "ink", "step": 500},
               tmp_path / "ink.pt")
    assert same(read_nested_tensors(tmp_path / "ink.pt"), {"string_to_param.*": vector})


# --- upscalers, end to end -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def field_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("field-models")
    for folder in ("ESRGAN", "RealESRGAN", "SwinIR"):
        (root / folder).mkdir()
    realesrgan_x4plus(root / "RealESRGAN" / "RealESRGAN_x4plus.pth", seed=0)
    save_file(rrdb_state_dict(0), str(root / "ESRGAN" / "flat-ema.safetensors"))
    save_file(rrdb_state_dict(100), str(root / "ESRGAN" / "flat-params.safetensors"))
    ultrasharp(root / "ESRGAN" / "4x-UltraSharp.pth", seed=5)
    save_file(rrdb_state_dict(5), str(root / "ESRGAN" / "flat-ultrasharp.safetensors"))
    swinir_release(root / "SwinIR" / "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth", seed=6)
    save_file(swinir_state_dict(6), str(root / "SwinIR" / "flat-swinir.safetensors"))
    torch.save(data_parallel(rrdb_state_dict(7)), root / "ESRGAN" / "dataparallel.pth")
    save_file(rrdb_state_dict(7), str(root / "ESRGAN" / "flat-dataparallel.safetensors"))
    return root


@pytest.fixture(scope="module")
def field_engine(field_models, tmp_path_factory, plain_cpu):
    from engine.engine import Engine, EngineConfig

    root = tmp_path_factory.mktemp("field-engine")
    return Engine(EngineConfig(field_models, root / "outputs", root / "data"), plain_cpu)


def upscaled(engine, name: str, image: Image.Image) -> np.ndarray:
    return np.asarray(engine.upscalers.upscale_image(image, name, 4, tile=0)[0])


@pytest.mark.parametrize("shipped, flat, architecture", [
    ("RealESRGAN_x4plus", "flat-ema", "ESRGAN"),
    ("4x-UltraSharp", "flat-ultrasharp", "ESRGAN"),
    ("003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN", "flat-swinir", "SwinIR"),
    ("dataparallel", "flat-dataparallel", "ESRGAN"),
])
def test_a_release_in_its_shipped_layout_upscales_as_its_weights_do(field_engine, field_models, shipped, flat,
                                                                    architecture):
    from engine.upscalers import load_model

    path = next(field_models.rglob(f"{shipped}.pth"))
    assert load_model(path).architecture.id == architecture
    image = noise((24, 20), seed=1)
    out = upscaled(field_engine, shipped, image)
    assert out.shape == (80, 96, 3) and out.std() > 2
    assert np.array_equal(out, upscaled(field_engine, flat, image))


def test_realesrgan_uses_params_ema_not_params(field_engine):
    image = noise((24, 20), seed=2)
    assert not np.array_equal(upscaled(field_engine, "RealESRGAN_x4plus", image),
                              upscaled(field_engine, "flat-params", image))


def test_realesrgan_x4plus_upscales_512_to_2048_from_the_cli(field_models, tmp_path, capsys):
    source = tmp_path / "photo.png"
    noise((512, 512), seed=3).save(source)
    code = app.main(["upscale", "--models-dir", str(field_models), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--input", str(source),
                     "--upscaler", "RealESRGAN_x4plus", "--scale", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (line,) = out.splitlines()
    with Image.open(line) as result:
        assert result.size == (2048, 2048)
        assert "Postprocess upscaler: RealESRGAN_x4plus" in result.info["parameters"]


# --- a checkpoint in a wrapped pickle ---------------------------------------------------

@pytest.fixture(scope="module")
def wrapped_checkpoints(tiny_models_dir, tmp_path_factory, plain_cpu):
    """The session's tiny SD 1.x model as the flat single file and as a Lightning .ckpt with
    DataParallel names inside, and an engine on both."""
    from tests.conftest import loaded_engine

    root = tmp_path_factory.mktemp("wrapped")
    models = root / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.symlink(tiny_models_dir / "Stable-diffusion" / "tiny-sd1", models / "tiny-sd1")
    engine = loaded_engine(models.parent, root, plain_cpu)
    pipe = engine.manager.current.pipe
    export_single_file(pipe, Family.SD1, models / "flat.safetensors")
    torch.save(lightning(data_parallel(pipeline_to_ldm(pipe, Family.SD1))), models / "trained.ckpt")
    write_yaml(ldm_config(pipe, Family.SD1), models / "trained.yaml")
    engine.refresh_models()
    return engine


def test_a_lightning_checkpoint_generates_what_its_flat_file_does(wrapped_checkpoints):
    engine = wrapped_checkpoints
    images = {}
    for name in ("flat.safetensors", "trained.ckpt"):
        engine.load_model(name)
        images[name] = np.asarray(engine.generate(engine.make_request({"prompt": "a red barn", **SMALL})).images[0])
    assert np.array_equal(images["flat.safetensors"], images["trained.ckpt"])
