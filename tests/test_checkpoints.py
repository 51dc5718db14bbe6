"""Safe checkpoint reading and offline single-file / folder loading."""
from __future__ import annotations

import builtins
import socket

import pytest
import torch

import engine.compat  # noqa: F401 - torchvision shim first
from engine.checkpoints import (
    identify_model,
    load_pipeline,
    read_keys_and_shapes,
    read_state_dict,
    sidecar_yaml,
)
from engine.errors import UnknownCheckpointError, UnsafeCheckpointError
from engine.families import FAMILIES, Family
from tests.ldm_export import export_single_file, ldm_config, write_yaml
from tests.tiny_models import make_unet_output_constant, save_folder, save_sd1_folder, tiny_pipeline


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_pipeline(family) for family in Family}


@pytest.fixture(scope="module")
def single_files(pipes, workdir):
    return {f: export_single_file(p, f, workdir / f"{f.value}.safetensors") for f, p in pipes.items()}


class _NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        raise _NetworkUsed(f"network access attempted: {address!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


class _CreatesMarker:
    """Unpickling this would call open(marker, 'w'): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


# --- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", [read_state_dict, read_keys_and_shapes, identify_model, load_pipeline],
                         ids=lambda f: f.__name__)
def test_malicious_pickle_is_refused_and_its_code_never_runs(workdir, reader):
    marker = workdir / f"pwned-{reader.__name__}"
    path = workdir / f"evil-{reader.__name__}.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _CreatesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{path.name}.*refused.*open") as caught:
        reader(path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_plain_tensor_ckpt_loads(pipes, workdir):
    pipe = pipes[Family.SD1]
    path = export_single_file(pipe, Family.SD1, workdir / "plain.ckpt")  # {"state_dict": {...}} via torch.save
    loaded = load_pipeline(path)
    assert identify_model(path) is Family.SD1
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_header_shapes_match_the_tensors(single_files):
    path = single_files[Family.SDXL]
    assert read_keys_and_shapes(path) == {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def test_sidecar_yaml_is_the_same_name_with_yaml_suffix(single_files, workdir):
    with_sidecar = single_files[Family.SD1]
    without = export_single_file(tiny_pipeline(Family.SD1), Family.SD1, workdir / "bare.safetensors", sidecar=False)
    assert (sidecar_yaml(with_sidecar), sidecar_yaml(without)) == (with_sidecar.with_suffix(".yaml"), None)


def test_unsupported_file_type_is_refused_by_name(workdir):
    path = workdir / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(UnknownCheckpointError, match=r"model\.gguf.*'\.gguf'"):
        read_state_dict(path)


# --- loading -------------------------------------------------------------------------------------

def test_the_network_guard_works(no_network):
    with pytest.raises(_NetworkUsed):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL], ids=lambda f: f.value)
def test_single_file_loads_with_network_blocked(single_files, no_network, family):
    pipe = load_pipeline(single_files[family])
    assert type(pipe).__name__ == FAMILIES[family].pipeline


def test_diffusers_folder_loads_with_network_blocked(pipes, workdir, no_network):
    folder = save_folder(pipes[Family.SDXL], workdir / "sdxl-folder")
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


@torch.no_grad()
def test_sd1_single_file_unet_matches_the_folder_it_was_exported_from(workdir):
    folder = save_sd1_folder(workdir / "sd1-folder")
    from_folder = load_pipeline(folder)
    single = export_single_file(from_folder, Family.SD1, workdir / "sd1-export.safetensors")
    from_file = load_pipeline(single)
    torch.manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    a = from_folder.unet(x, 500, encoder_hidden_states=context).sample
    b = from_file.unet(x, 500, encoder_hidden_states=context).sample
    assert torch.equal(a, b)


def _unet_inputs(pipe, family: Family) -> dict:
    cfg = pipe.unet.config
    torch.manual_seed(2)
    inputs = {"sample": torch.randn(1, cfg.in_channels, 8, 8), "timestep": 700,
              "encoder_hidden_states": torch.randn(1, 77, cfg.cross_attention_dim)}
    if family is Family.SDXL:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    if family is Family.SD_X4_UPSCALER:
        inputs["class_labels"] = torch.tensor([20])
    return inputs


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
@torch.no_grad()
def test_single_file_round_trips_every_component_exactly(pipes, single_files, family):
    # Same outputs, not just same tensors: heads, activations and block layout must match too.
    original, loaded = pipes[family], load_pipeline(single_files[family])
    assert type(loaded).__name__ == FAMILIES[family].pipeline
    assert loaded.scheduler.config.prediction_type == FAMILIES[family].prediction_type
    inputs = _unet_inputs(original, family)
    assert torch.equal(original.unet(**inputs).sample, loaded.unet(**inputs).sample)
    latent = torch.randn(1, 4, 4, 4)
    assert torch.equal(original.vae.decode(latent).sample, loaded.vae.decode(latent).sample)
    ids = loaded.tokenizer("a photo of a cat", padding="max_length", return_tensors="pt").input_ids
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(original, name, None) is not None:
            a, b = getattr(original, name)(ids), getattr(loaded, name)(ids)
            assert torch.equal(a[0], b[0]), name


def test_sd2_without_sidecar_loads_with_the_measured_prediction_type(workdir):
    pipe = tiny_pipeline(Family.SD2)
    make_unet_output_constant(pipe.unet, -2.0)  # A1111's probe will measure mean(out - x) = -2.5: v
    configs = workdir / "sd2-configs"
    configs.mkdir()
    write_yaml(ldm_config(pipe, Family.SD2), configs / FAMILIES[Family.SD2].ldm_config)
    path = export_single_file(pipe, Family.SD2, workdir / "measured-v.safetensors", sidecar=False)
    loaded = load_pipeline(path, config_dir=configs)
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_loading_as_the_wrong_family_is_refused(single_files):
    path = single_files[Family.SD1]
    with pytest.raises(UnknownCheckpointError, match=f"{path.name}.*SD 1.x, not SDXL"):
        load_pipeline(path, Family.SDXL)
