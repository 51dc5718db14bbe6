"""--device intel-gpu: OpenVINO compiles the model for an Intel GPU, and falls back to the CPU.

No Intel GPU exists on the machines Easel is built and tested on, so the GPU here is a stand-in:
OpenVINO's compile is wrapped so that a compile for "GPU.0" is recorded (device and settings) and
then done on the CPU in f32. What these tests show is everything up to OpenVINO's device name:
the plan, the precision each part is compiled in, the settings a GPU would refuse (CPU threads),
the fallback, the infotext. That OpenVINO's GPU plugin runs the graphs well is not shown here.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("openvino")

import engine.openvino_backend as ovb  # noqa: E402
import engine.openvino_parts as ovp  # noqa: E402
from engine.devices import plan_for  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.errors import RequestError  # noqa: E402
from engine.families import FAMILIES, Family  # noqa: E402
from tests.test_openvino import BASE, assert_close  # noqa: E402

SD1 = FAMILIES[Family.SD1]
ARC = "Intel(R) Arc(TM) A770 Graphics (dGPU)"


@pytest.fixture(scope="module")
def gpu_machine(plain_cpu):
    return replace(plain_cpu, openvino=True, intel_gpus=(ARC,), openvino_gpu="GPU.0")


class _GPUModel:
    """The CPU's compiled model standing in for a GPU's, whose plugin may lack release_memory."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.outputs = compiled.outputs

    def __call__(self, inputs):
        return self.compiled(inputs)

    def release_memory(self):
        raise RuntimeError("[GPU] release_memory is not implemented")


def stand_in(monkeypatch, fail: bool = False) -> list[tuple[str, str, dict]]:
    """Compiles for GPU.0 are recorded, then run on the CPU in f32 (or fail, as a driver would)."""
    compiled = []
    real = ovb.OpenVINOCache.compile

    def compile(self, xml, device, config):
        compiled.append((xml.parent.name, device, dict(config)))
        if device == "GPU.0":
            if fail:
                raise RuntimeError("[GPU] clGetPlatformIDs error -1001")
            return _GPUModel(real(self, xml, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"}))
        return real(self, xml, device, config)

    monkeypatch.setattr(ovb.OpenVINOCache, "compile", compile)
    return compiled


def gpu_engine(tiny_models_dir, root, hardware, **config) -> Engine:
    engine = Engine(EngineConfig(tiny_models_dir, root / "outputs", root / "data", device="intel-gpu", **config),
                    hardware)
    engine.load_model("tiny-sd1")
    return engine


def run(engine, **fields):
    return engine.generate(engine.make_request({**BASE, **fields}))


# --- the plan ---------------------------------------------------------------------------------------
def test_intel_gpu_compiles_the_unet_in_f16_unless_fp32_is_asked_for(gpu_machine):
    plan = plan_for(SD1, gpu_machine, "intel-gpu")
    assert plan.on_intel_gpu and plan.openvino_device == "GPU.0" and plan.openvino_precision == "f16"
    assert plan.describe().startswith("intel-gpu GPU.0 (OpenVINO), unet fp16")
    assert plan_for(SD1, gpu_machine, "intel-gpu", "fp32").openvino_precision == "f32"
    bf16 = plan_for(SD1, gpu_machine, "intel-gpu", "bf16")
    assert bf16.openvino_precision == "f16" and any("not bf16" in note for note in bf16.notes)


def test_auto_keeps_the_cpu_and_names_the_intel_gpu_and_the_flag(gpu_machine):
    plan = plan_for(SD1, gpu_machine)
    assert not plan.on_intel_gpu and plan.openvino_device == "CPU"
    (note,) = [n for n in plan.notes if ARC in n]
    assert "--device intel-gpu" in note


def test_intel_gpu_without_one_is_refused_naming_the_field(plain_cpu):
    with pytest.raises(RequestError) as caught:
        plan_for(SD1, replace(plain_cpu, openvino=True), "intel-gpu")
    assert caught.value.field == "device" and "no Intel GPU" in str(caught.value)


def test_intel_gpu_with_backend_torch_runs_torch_on_the_cpu_and_says_so(gpu_machine):
    plan = plan_for(SD1, gpu_machine, "intel-gpu", backend="torch")
    assert plan.backend == "torch" and not plan.on_intel_gpu and plan.device == "cpu"
    assert any("OpenVINO only" in note for note in plan.notes)


# --- the model on it --------------------------------------------------------------------------------
def test_every_part_is_compiled_for_the_gpu_and_images_say_so(tiny_models_dir, tmp_path, gpu_machine, sd_engine,
                                                              monkeypatch):
    compiled = stand_in(monkeypatch)
    engine = gpu_engine(tiny_models_dir, tmp_path, gpu_machine)
    loaded = engine.manager.current
    assert loaded.plan.on_intel_gpu
    on_gpu = [(device, config) for _, device, config in compiled]
    assert len(on_gpu) == 5 and {device for device, _ in on_gpu} == {"GPU.0"}  # UNet x2, VAE x2, text encoder
    assert not any("INFERENCE_NUM_THREADS" in config for _, config in on_gpu)  # a CPU-only setting
    hints = sorted(config["INFERENCE_PRECISION_HINT"] for _, config in on_gpu)
    assert hints == ["f16", "f16", "f32", "f32", "f32"]  # the UNet's two graphs in f16, the rest f32
    result = run(engine)
    assert "Backend: openvino intel-gpu" in result.infotexts[0]
    assert ovp.attached(loaded.pipe.text_encoder).compiled.loaded  # kept on a GPU: see unload_before_steps
    assert_close(result.images[0], run(sd_engine).images[0])  # the stand-in computes in f32


def test_a_gpu_that_cannot_compile_leaves_the_model_on_openvino_on_the_cpu(tiny_models_dir, tmp_path, gpu_machine,
                                                                           monkeypatch):
    compiled = stand_in(monkeypatch, fail=True)
    engine = gpu_engine(tiny_models_dir, tmp_path, gpu_machine)
    loaded = engine.manager.current
    assert loaded.plan.backend == "openvino" and loaded.plan.openvino_device == "CPU"
    assert any("GPU.0" == device for _, device, _ in compiled) and compiled[-1][1] == "CPU"
    result = run(engine)
    assert "Backend: openvino" in result.infotexts[0] and "intel-gpu" not in result.infotexts[0]
    assert any("the Intel GPU could not run this model" in note and "clGetPlatformIDs" in note
               for note in result.notes)
    entries = {name for name, device, _ in compiled if device == "GPU.0"}
    cache = tmp_path / "data" / "cache" / "openvino"
    assert all((cache / name / "model.xml").is_file() for name in entries)  # the GPU's failure kept them
