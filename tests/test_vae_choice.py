"""VAE choice: files from models/VAE (original LDM layout as users download them, diffusers layout)
through the real loading path, on the tiny SD 1.x model."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import app
from conftest import loaded_engine
from engine.errors import RequestError
from engine.infotext import parse_infotext, read_infotext, values_from_params
from ldm_export import vae_to_ldm
from tiny_models import tiny_upscaler_vae, tiny_vae

BASE = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 11, "save_images": False}
OTHER_SEED = 5  # the VAE files' weights: not the checkpoint's (seed 0)


def ldm_state(vae) -> dict:
    """A standalone VAE file's keys, as vae-ft-mse-840000-ema-pruned has them (no first_stage_model.)."""
    return {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(vae).items()}


@pytest.fixture(scope="module")
def vae_models(tiny_models_dir, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("vae-models")
    shutil.copytree(tiny_models_dir / "Stable-diffusion", models / "Stable-diffusion")
    folder = models / "VAE"
    folder.mkdir()
    other = tiny_vae(OTHER_SEED)
    save_file(ldm_state(other), str(folder / "tiny-ft-mse.safetensors"))
    torch.save({"state_dict": ldm_state(other)}, folder / "tiny-ft-mse-pickled.pt")
    other.save_pretrained(str(folder / "tiny-diffusers"), safe_serialization=True)
    xl = tiny_vae(OTHER_SEED)
    save_file(ldm_state(xl), str(folder / "sdxl_vae.safetensors"))  # an SDXL VAE: same shapes, told by its name
    xl.save_pretrained(str(folder / "xl-config"), safe_serialization=True)
    config = json.loads((folder / "xl-config" / "config.json").read_text())
    (folder / "xl-config" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    save_file(ldm_state(tiny_upscaler_vae(OTHER_SEED)), str(folder / "x4-vae.safetensors"))
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(folder / "not-a-vae.safetensors"))
    return models


@pytest.fixture(scope="module")
def engine(vae_models, tmp_path_factory, plain_cpu):
    return loaded_engine(vae_models, tmp_path_factory.mktemp("vae-engine"), plain_cpu)


def generate(engine, **fields):
    return engine.generate(engine.make_request({**BASE, **fields}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_the_picker_lists_automatic_then_the_vae_files(engine):
    names = engine.vae_names()
    assert names[0] == "Automatic"
    assert {"tiny-ft-mse.safetensors", "tiny-ft-mse-pickled.pt",
            "tiny-diffusers/diffusion_pytorch_model.safetensors"} <= set(names)


def test_an_ldm_layout_file_is_converted_to_exactly_its_weights(engine):
    generate(engine, vae="tiny-ft-mse.safetensors")
    loaded = engine.manager.current.pipe.vae.state_dict()
    for key, value in tiny_vae(OTHER_SEED).state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_picking_a_vae_changes_the_image_and_automatic_restores_the_checkpoints_own(engine):
    own = generate(engine, vae="Automatic")
    other = generate(engine, vae="tiny-ft-mse.safetensors")
    back = generate(engine, vae="Automatic")
    assert not np.array_equal(pixels(own), pixels(other))
    assert np.array_equal(pixels(own), pixels(back))
    assert engine.manager.current.pipe.vae is engine.manager.current.own_vae


@pytest.mark.parametrize("name", ["tiny-ft-mse-pickled.pt", "tiny-diffusers/diffusion_pytorch_model.safetensors"])
def test_pickled_and_diffusers_layout_files_give_the_same_image_as_the_safetensors_one(engine, name):
    reference = generate(engine, vae="tiny-ft-mse.safetensors")
    assert np.array_equal(pixels(generate(engine, vae=name)), pixels(reference))


def test_the_swapped_vae_follows_the_models_plan(engine):
    generate(engine, vae="tiny-ft-mse.safetensors")
    loaded = engine.manager.current
    assert loaded.pipe.vae.dtype == loaded.plan.vae_dtype
    assert loaded.pipe.vae.device.type == loaded.plan.device
    assert loaded.own_vae.device.type == "cpu"


@pytest.mark.parametrize("name, words", [
    ("sdxl_vae.safetensors", "SDXL VAE (its file name"),
    ("xl-config/diffusion_pytorch_model.safetensors", "scaling_factor 0.13025"),
    ("x4-vae.safetensors", "does not fit this checkpoint's VAE"),
    ("not-a-vae.safetensors", "holds no VAE weights"),
])
def test_a_vae_of_another_family_is_refused_and_the_current_one_stays(engine, name, words):
    before = generate(engine, vae="Automatic")
    with pytest.raises(RequestError) as caught:
        generate(engine, vae=name)
    assert caught.value.field == "vae" and words in str(caught.value)
    assert np.array_equal(pixels(generate(engine)), pixels(before))


def test_a_name_outside_models_vae_is_refused_before_anything_runs(engine):
    with pytest.raises(RequestError) as caught:
        engine.make_request({**BASE, "vae": "../Stable-diffusion/tiny-sd1"})
    assert caught.value.field == "vae" and "Automatic" in str(caught.value)


def test_the_chosen_vae_is_remembered_per_checkpoint(vae_models, tmp_path, plain_cpu):
    first = loaded_engine(vae_models, tmp_path, plain_cpu)
    assert first.model_vae("tiny-sd1") == "Automatic"
    first.set_model_vae("tiny-sd1", "tiny-ft-mse")  # a name without extension resolves inside models/VAE
    chosen = generate(first)
    again = loaded_engine(vae_models, tmp_path, plain_cpu)  # a new engine on the same data folder
    assert again.model_vae("tiny-sd1") == "tiny-ft-mse.safetensors"
    assert np.array_equal(pixels(generate(again)), pixels(chosen))
    assert "VAE: tiny-ft-mse.safetensors" in chosen.infotexts[0]


def test_infotext_records_vae_name_and_hash_and_reads_them_back(engine, vae_models):
    result = generate(engine, vae="tiny-ft-mse.safetensors")
    digest = hashlib.sha256((vae_models / "VAE" / "tiny-ft-mse.safetensors").read_bytes()).hexdigest()[:10]
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["VAE hash"] == digest and parsed["VAE"] == "tiny-ft-mse.safetensors"
    assert values_from_params(parsed)["vae"] == "tiny-ft-mse.safetensors"
    assert "VAE" not in parse_infotext(generate(engine, vae="Automatic").infotexts[0])


def test_cli_vae_option_is_used_and_saved_in_the_image(capsys, vae_models, tmp_path):
    dirs = ["--models-dir", str(vae_models), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    code = app.main(["txt2img", *dirs, "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64",
                     "--vae", "tiny-ft-mse.safetensors", "--no-watermark"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "VAE: tiny-ft-mse.safetensors" in read_infotext(Path(out.splitlines()[0]))
    code = app.main(["txt2img", *dirs, "--prompt", "a cat", "--steps", "2", "--vae", "sdxl_vae.safetensors"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: vae: sdxl_vae.safetensors is an SDXL VAE") and len(err.splitlines()) == 1
