"""Session-wide fixtures: one tiny random-weight SD 1.x model and one Engine on it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import engine.compat  # noqa: E402,F401 - the torchvision shim must precede transformers
from engine.compat import quiet_library_logs  # noqa: E402

quiet_library_logs()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    from engine.tiny import save_sd1_folder

    models = tmp_path_factory.mktemp("models")
    save_sd1_folder(models / "Stable-diffusion" / "tiny-sd1")
    return models


@pytest.fixture(scope="session")
def plain_cpu():
    """A CPU with no GPU, no native bf16 and no OpenVINO: the fp32 torch CPU plan, whatever machine
    runs the suite (the auto plan picks a bf16 UNet on CPUs that have it, and fp16 on a GPU)."""
    from dataclasses import replace

    from engine.devices import Hardware

    return replace(Hardware.detect(), cuda=False, cuda_name="", cuda_vram_gb=0.0, cuda_bf16=False, mps=False,
                   cpu_bf16=False, openvino=False)


@pytest.fixture(scope="session", autouse=True)
def torch_backend_by_default():
    """Engines the tests build without a Hardware of their own detect this machine's: keep their
    UNet on torch, so the suite means the same with or without OpenVINO installed (and does not
    convert the tiny model once per engine). tests/test_openvino.py asks for OpenVINO by name."""
    from dataclasses import replace

    from engine.devices import Hardware

    detect = Hardware.detect
    patch = pytest.MonkeyPatch()
    patch.setattr(Hardware, "detect", classmethod(lambda cls: replace(detect(), openvino=False)))
    yield
    patch.undo()


def loaded_engine(models_dir: Path, root: Path, hardware):
    """An Engine on `hardware` with outputs and data under `root`, the tiny SD 1.x model loaded."""
    from engine.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(models_dir, root / "outputs", root / "data"), hardware)
    eng.load_model("tiny-sd1")
    return eng


@pytest.fixture(scope="session")
def sd_engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    return loaded_engine(tiny_models_dir, tmp_path_factory.mktemp("engine"), plain_cpu)
