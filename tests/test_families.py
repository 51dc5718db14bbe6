"""Family detection: single files (keys, sidecar yaml, the SD 2.x UNet probe) and diffusers folders."""
from __future__ import annotations

import pytest
import torch
import yaml

import engine.compat  # noqa: F401 - torchvision shim first
from engine.checkpoints import identify_model, read_keys_and_shapes
from engine.errors import UnknownCheckpointError
from engine.families import FAMILIES, UNET_IN_KEY, Family, detect_family, needs_prediction_test
from tests.ldm_export import export_single_file, ldm_config, write_yaml
from tests.tiny_models import make_unet_output_constant, save_folder, tiny_pipeline

# SD 2.x eps and v have the same keys; everything else is told apart by its weights alone.
KEY_DETECTABLE = [f for f in Family if f not in (Family.SD2, Family.SD2_V)]


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_pipeline(family) for family in Family}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def sd2_config_dir(pipes, workdir):
    """Stands in for engine/configs when a tiny SD 2.x file has no sidecar: same layout, tiny sizes."""
    folder = workdir / "configs"
    folder.mkdir()
    write_yaml(ldm_config(pipes[Family.SD2], Family.SD2), folder / FAMILIES[Family.SD2].ldm_config)
    return folder


@pytest.mark.parametrize("family", KEY_DETECTABLE, ids=lambda f: f.value)
def test_single_file_family_is_detected_from_keys_alone(pipes, workdir, family):
    path = export_single_file(pipes[family], family, workdir / f"keys-{family.value}.safetensors", sidecar=False)
    assert identify_model(path) is family


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
def test_diffusers_folder_family_is_detected(pipes, workdir, family):
    folder = save_folder(pipes[family], workdir / f"folder-{family.value}")
    assert identify_model(folder) is family


def test_sidecar_yaml_decides_sd2_prediction_type(pipes, workdir):
    # The same SD 2.x weights, once with an eps sidecar and once with `parameterization: "v"`.
    pipe = pipes[Family.SD2]
    eps = export_single_file(pipe, Family.SD2, workdir / "same-eps.safetensors")
    v = export_single_file(pipe, Family.SD2, workdir / "same-v.safetensors")
    config = ldm_config(pipe, Family.SD2)
    config["model"]["params"]["parameterization"] = "v"
    write_yaml(config, v.with_suffix(".yaml"))
    assert (identify_model(eps), identify_model(v)) == (Family.SD2, Family.SD2_V)


def test_sd2_keys_alone_are_not_a_final_answer(pipes, workdir):
    path = export_single_file(pipes[Family.SD2], Family.SD2, workdir / "provisional.safetensors", sidecar=False)
    family = detect_family(read_keys_and_shapes(path), path)
    assert family is Family.SD2 and needs_prediction_test(family, None)


@pytest.mark.parametrize(("output", "expected"), [(-2.0, Family.SD2_V), (0.0, Family.SD2)])
def test_sd2_without_sidecar_is_settled_by_running_the_unet(pipes, workdir, sd2_config_dir, output, expected):
    # A1111's probe: x = 0.5, t = 999; v-prediction when mean(out - x) < -1. A UNet that outputs
    # -2 everywhere measures -2.5 (v); one that outputs 0 measures -0.5 (eps).
    pipe = tiny_pipeline(Family.SD2)
    make_unet_output_constant(pipe.unet, output)
    path = export_single_file(pipe, Family.SD2, workdir / f"probe{output}.safetensors", sidecar=False)
    assert identify_model(path, config_dir=sd2_config_dir) is expected


def test_unidentifiable_checkpoint_names_the_file(workdir):
    from safetensors.torch import save_file

    path = workdir / "mystery-model.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, str(path))
    with pytest.raises(UnknownCheckpointError, match="mystery-model.safetensors"):
        identify_model(path)


def test_unsupported_unet_input_width_is_not_guessed(pipes, workdir):
    # An instruct-pix2pix-like UNet (8 input channels) with SD 1.x parts is none of our families.
    path = export_single_file(pipes[Family.SD1], Family.SD1, workdir / "pix2pix.safetensors", sidecar=False)
    keys = read_keys_and_shapes(path)
    out_ch, _, kh, kw = keys[UNET_IN_KEY]
    keys[UNET_IN_KEY] = (out_ch, 8, kh, kw)
    with pytest.raises(UnknownCheckpointError, match="pix2pix.safetensors.*8 input channels"):
        detect_family(keys, path)


def test_sidecar_contradicting_the_weights_is_refused(pipes, workdir):
    path = export_single_file(pipes[Family.SD1], Family.SD1, workdir / "liar.safetensors")
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    write_yaml(config, path.with_suffix(".yaml"))
    with pytest.raises(UnknownCheckpointError, match="liar.safetensors.*in_channels 9"):
        identify_model(path)


def test_v_prediction_sidecar_on_sd1_weights_is_refused(pipes, workdir):
    # SD 1.x v-prediction fine-tunes exist, but no family here serves them: refuse, don't guess.
    path = export_single_file(pipes[Family.SD1], Family.SD1, workdir / "sd1-v.safetensors")
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    config["model"]["params"]["parameterization"] = "v"
    write_yaml(config, path.with_suffix(".yaml"))
    with pytest.raises(UnknownCheckpointError, match="sd1-v.safetensors"):
        identify_model(path)


def test_families_table_is_read_only():
    with pytest.raises(TypeError):
        FAMILIES[Family.SD1] = FAMILIES[Family.SDXL]  # type: ignore[index]


# --- the shipped LDM yamls against the released architectures -----------------------------------
# Released diffusers configs (stable-diffusion-v1-5, stable-diffusion-2-1, sdxl-base-1.0,
# stable-diffusion-x4-upscaler), built on the meta device: full size, no memory, no weights.

_SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
_SD_UNET = {"block_out_channels": (320, 640, 1280, 1280), "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
_SD2_UNET = {**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
             "upcast_attention": True}
RELEASED = {  # family: (unet config, vae config, text encoders as (hidden, layers, act, projection))
    Family.SD1: ({**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8}, _SD_VAE, [(768, 12, "quick_gelu", None)]),
    Family.SD2_V: (_SD2_UNET, _SD_VAE, [(1024, 23, "gelu", None)]),
    Family.SDXL: ({"block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
                   "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
                   "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                   "projection_class_embeddings_input_dim": 2816},
                  {**_SD_VAE, "scaling_factor": 0.13025}, [(768, 12, "quick_gelu", None), (1280, 32, "gelu", 1280)]),
    Family.SD_X4_UPSCALER: ({"block_out_channels": (256, 512, 512, 1024), "in_channels": 7, "cross_attention_dim": 1024,
                             "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                             "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), "attention_head_dim": 8,
                             "use_linear_projection": True, "num_class_embeds": 1000,
                             "only_cross_attention": (True, True, True, False)},
                            {"block_out_channels": (128, 256, 512), "layers_per_block": 2, "scaling_factor": 0.08333,
                             "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3},
                            [(1024, 23, "gelu", None)]),
}


def _released_on_meta(family: Family):
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config, vae_config, encoders = RELEASED[family]
    names = ["text_encoder", "text_encoder_2"]
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(**vae_config)}
        for name, (hidden, layers, act, projection) in zip(names, encoders):
            config = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden,
                                    num_attention_heads=hidden // 64, hidden_act=act, projection_dim=projection or hidden)
            parts[name] = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return SimpleNamespace(**parts)


def _differences(expected, built) -> dict:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: (v, built.get(k)) for k, v in expected.items()
            if not k.startswith("_") and k != "sample_size" and norm(v) != norm(built.get(k))}


@pytest.mark.parametrize("family", list(RELEASED), ids=lambda f: f.value)
def test_shipped_config_builds_the_released_architecture(family):
    # Heads, activations and attention settings do not show in tensor shapes, so a wrong number
    # in engine/configs would load silently and draw noise: compare the configs too.
    from pathlib import Path

    from engine import checkpoints
    from tests.ldm_export import pipeline_to_ldm

    released = _released_on_meta(family)
    state = pipeline_to_ldm(released, family)
    path, info = Path(f"released-{family.value}.safetensors"), FAMILIES[family]
    original = checkpoints.read_ldm_yaml(checkpoints.shipped_config(family))
    unet = checkpoints.build_unet(state, original, info, torch.float32, path)
    vae = checkpoints.build_vae(state, original, info, torch.float32, path)
    encoders = checkpoints.build_text_encoders(state, family, torch.float32, path)
    assert _differences(released.unet.config, unet.config) == {}
    assert _differences(released.vae.config, vae.config) == {}
    for name in ("text_encoder", "text_encoder_2"):
        if hasattr(released, name):
            assert _differences(getattr(released, name).config.to_dict(), encoders[name].config.to_dict()) == {}, name


# --- SD 2.x in generative-models' layout (SD-Turbo's own file) -------------------------------------

def _sgm(state: dict) -> dict:
    from engine.families import OPEN_CLIP_PREFIX, SDXL_REFINER_PREFIX

    return {SDXL_REFINER_PREFIX + k[len(OPEN_CLIP_PREFIX):] if k.startswith(OPEN_CLIP_PREFIX) else k: v
            for k, v in state.items()}


def test_sd2_with_its_text_encoder_under_the_sgm_prefix_is_sd2_not_a_refiner(pipes, workdir):
    from safetensors.torch import save_file

    from tests.ldm_export import pipeline_to_ldm

    path = workdir / "sgm-sd2.safetensors"
    save_file(_sgm(pipeline_to_ldm(pipes[Family.SD2], Family.SD2)), str(path))
    keys = read_keys_and_shapes(path)
    assert detect_family(keys, path, None) in (Family.SD2, Family.SD2_V)
    assert not any(k.startswith("conditioner.") for k in keys)


def test_a_refiner_shaped_file_is_still_refused_as_a_refiner(pipes, workdir):
    """The same prefix with SDXL's size-conditioning MLP in the UNet: the SDXL refiner."""
    from safetensors.torch import save_file

    from engine.families import SDXL_ADM_KEY
    from tests.ldm_export import pipeline_to_ldm

    path = workdir / "refiner-like.safetensors"
    save_file({**_sgm(pipeline_to_ldm(pipes[Family.SD2], Family.SD2)), SDXL_ADM_KEY: torch.zeros(4, 8)}, str(path))
    with pytest.raises(UnknownCheckpointError, match="an SDXL refiner"):
        detect_family(read_keys_and_shapes(path), path, None)
