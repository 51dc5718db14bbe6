"""`--precision int8`: the OpenVINO UNet with its weights compressed to int8 by NNCF
(engine/openvino_backend.py compress_int8), on the tiny SD 1.x model.

Tolerance, measured on this tiny model (4 steps, 64x48, seeds 1234/7/99, Euler a, DPM++ 2M, DDIM,
LCM): one UNet call is 1.4e-2 relative RMS from torch fp32 (f32 OpenVINO: 1.4e-6), and the images
are at most 4 levels apart from f32 OpenVINO's, 0.40-0.65 levels on average (the images' own
spread is ~41 levels). Per-channel int8 rounds each weight to 1/255 of its channel's range, an
error that does not grow with the steps, so the bounds are twice what was measured: at most
8 levels anywhere and under 1.3 on average, and 3e-2 relative RMS per call. Asserted too: int8
really ran (its images are further from f32's than float rounding, test_openvino.py's 0.1).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import app  # noqa: E402
import engine.openvino_backend as ovb  # noqa: E402
from engine.devices import Hardware, plan_for  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.families import FAMILIES, Family  # noqa: E402
from engine.infotext import parse_infotext, read_infotext, values_from_params, write_png_with_infotext  # noqa: E402

BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 48,
        "seed": 1234, "save_images": False}
MAX_LEVELS, MEAN_LEVELS = 8, 1.3
FLOAT_ROUNDING_MEAN = 0.1  # test_openvino.py's f32 OpenVINO vs torch bound
MAX_REL_RMS = 3e-2
SD1 = FAMILIES[Family.SD1]


@pytest.fixture(scope="module")
def int8_cpu(plain_cpu) -> Hardware:
    return replace(plain_cpu, openvino=True, nncf=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-int8")


def engine_on(models, root, hardware, precision: str) -> Engine:
    eng = Engine(EngineConfig(models, root / "outputs", root / "data", precision=precision), hardware)
    eng.load_model("tiny-sd1")
    return eng


@pytest.fixture(scope="module")
def f32_engine(tiny_models_dir, root, int8_cpu):
    return engine_on(tiny_models_dir, root, int8_cpu, "fp32")


@pytest.fixture(scope="module")
def int8_engine(f32_engine, tiny_models_dir, root, int8_cpu):
    """Loaded after f32_engine, in the same data folder: the int8 entry is made from the f32 one."""
    return engine_on(tiny_models_dir, root, int8_cpu, "int8")


def run(engine, **fields):
    return engine.generate(engine.make_request({**BASE, **fields}))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def entries(root, engine) -> dict:
    """{cache entry: its model.bin's size} of the UNet's entries (two parts, "unet" and
    "unet_reuse", per stored form), not the VAE's and text encoder's (never compressed)."""
    from tests.test_openvino import _unet_entries

    return {p.name: (p / "model.bin").stat().st_size for p in _unet_entries(root, engine.manager.current)}


def unet_entry(engine, compression: str | None) -> str:
    """The cache key of the loaded model's full UNet graph, f32-stored, plain or compressed."""
    loaded = engine.manager.current
    unet = loaded.pipe.unet
    return ovb.cache_key(loaded.hash, "unet", unet, ovb.input_names(unet.config), "f32", compression)


def no_conversion(monkeypatch, calls: list) -> None:
    monkeypatch.setattr(ovb, "convert_unet", lambda unet: calls.append("convert"))
    monkeypatch.setattr(ovb, "convert_unet_reuse", lambda unet: calls.append("convert"))


# --- the plan -----------------------------------------------------------------------------------
def test_int8_plan_runs_openvino_with_int8_weights(int8_cpu):
    plan = plan_for(SD1, int8_cpu, precision="int8")
    assert plan.backend == "openvino" and plan.int8_weights and not plan.notes
    assert "unet int8 weights (fp32 compute)" in plan.describe()
    bf16 = plan_for(SD1, replace(int8_cpu, cpu_bf16=True), precision="int8")
    assert "unet int8 weights (bf16 compute)" in bf16.describe()  # bf16 compute only where it is native


@pytest.mark.parametrize("case, why", [("torch backend", "need the OpenVINO backend"),
                                       ("no openvino", "OpenVINO backend (not installed)"),
                                       ("no nncf", "need NNCF"),
                                       ("gpu", "CPU only, not on cuda")])
def test_int8_where_it_cannot_run_falls_back_to_auto_and_says_why(int8_cpu, case, why):
    hardware, backend = int8_cpu, "auto"
    if case == "torch backend":
        backend = "torch"
    elif case == "no openvino":
        hardware = replace(int8_cpu, openvino=False)
    elif case == "no nncf":
        hardware = replace(int8_cpu, nncf=False)
    else:
        hardware = replace(int8_cpu, cuda=True, cuda_name="Test GPU", cuda_vram_gb=24.0)
    plan = plan_for(SD1, hardware, precision="int8", backend=backend)
    auto = plan_for(SD1, hardware, backend=backend)
    assert not plan.int8_weights and plan.unet_dtype == auto.unet_dtype and plan.backend == auto.backend
    (note,) = [n for n in plan.notes if n.startswith("int8")]
    assert why in note and "using the auto precision" in note


# --- the cache ----------------------------------------------------------------------------------
def test_int8_is_its_own_cache_entry_beside_f32_and_smaller(int8_engine, root):
    assert int8_engine.manager.current.openvino.compression == "int8"
    sizes = entries(root, int8_engine)
    assert len(sizes) == 4  # the f32 entries and the int8 ones, of both parts
    int8, f32 = sizes[unet_entry(int8_engine, "int8")], sizes[unet_entry(int8_engine, None)]
    assert int8 < 0.35 * f32  # int8 weights: a quarter of f32's, plus scales and zero points


def test_second_int8_load_converts_and_compresses_nothing(int8_engine, tiny_models_dir, root, int8_cpu, monkeypatch):
    calls = []
    no_conversion(monkeypatch, calls)
    monkeypatch.setattr(ovb, "compress_int8", lambda model: calls.append("compress"))
    again = engine_on(tiny_models_dir, root, int8_cpu, "int8")
    assert calls == [] and again.manager.current.openvino.from_cache
    assert again.manager.current.openvino.compression == "int8"
    assert "Backend: openvino int8" in run(again).infotexts[0]


def test_int8_is_made_from_the_cached_f32_entry(tiny_models_dir, tmp_path, int8_cpu, monkeypatch):
    engine_on(tiny_models_dir, tmp_path, int8_cpu, "fp32")
    calls = []
    real = ovb.compress_int8
    no_conversion(monkeypatch, calls)
    monkeypatch.setattr(ovb, "compress_int8", lambda model: calls.append("compress") or real(model))
    eng = engine_on(tiny_models_dir, tmp_path, int8_cpu, "int8")
    assert calls == ["compress", "compress"] and eng.manager.current.openvino.compression == "int8"  # both parts
    assert len(entries(tmp_path, eng)) == 4


def test_int8_is_made_from_a_bf16_plans_f16_entry_too(tiny_models_dir, tmp_path, int8_cpu, monkeypatch):
    bf16_cpu = replace(int8_cpu, cpu_bf16=True)  # its auto plan saves the UNet's entry in f16
    assert engine_on(tiny_models_dir, tmp_path, bf16_cpu, "auto").manager.current.plan.unet_dtype.itemsize == 2
    calls = []
    no_conversion(monkeypatch, calls)
    eng = engine_on(tiny_models_dir, tmp_path, bf16_cpu, "int8")
    assert calls == [] and eng.manager.current.openvino.compression == "int8"
    assert "Backend: openvino int8" in run(eng).infotexts[0]


def test_int8_without_an_f32_entry_converts_and_keeps_only_int8(tiny_models_dir, tmp_path, int8_cpu):
    eng = engine_on(tiny_models_dir, tmp_path, int8_cpu, "int8")
    assert not eng.manager.current.openvino.from_cache
    assert len(entries(tmp_path, eng)) == 2  # the int8 entries of both parts, no f32 ones
    assert any("with int8 weights" in note for note in run(eng).notes)


def test_a_failed_compression_leaves_the_model_on_torch(tiny_models_dir, tmp_path, int8_cpu, monkeypatch):
    def fail(model):
        raise RuntimeError("nncf exploded")

    monkeypatch.setattr(ovb, "compress_int8", fail)
    eng = engine_on(tiny_models_dir, tmp_path, int8_cpu, "int8")
    loaded = eng.manager.current
    assert loaded.openvino is None and loaded.plan.backend == "torch" and not loaded.plan.int8_weights
    result = run(eng)
    assert any("nncf exploded" in note and "running on torch" in note for note in result.notes)
    assert "Backend:" not in result.infotexts[0]


# --- what int8 does to the output ---------------------------------------------------------------
def test_one_unet_call_is_within_the_stated_bound(int8_engine, f32_engine):
    import torch

    unet = int8_engine.manager.current.pipe.unet
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 24, 32, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.inference_mode():
        expected = unet(sample, 500, encoder_hidden_states=hidden).sample
        errors = {}
        for name, eng in (("int8", int8_engine), ("f32", f32_engine)):
            with eng.manager.current.openvino.running(unet):
                got = unet(sample, 500, encoder_hidden_states=hidden).sample
            errors[name] = float(((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt())
    assert errors["f32"] < 1e-4 < errors["int8"] < MAX_REL_RMS, errors


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "LCM"])
def test_int8_images_differ_from_f32_by_a_bounded_amount(int8_engine, f32_engine, sampler):
    int8, f32 = run(int8_engine, sampler=sampler), run(f32_engine, sampler=sampler)
    diff = np.abs(pixels(int8.images[0]) - pixels(f32.images[0]))
    assert diff.max() <= MAX_LEVELS and FLOAT_ROUNDING_MEAN < diff.mean() < MEAN_LEVELS, (diff.max(), diff.mean())


# --- the infotext -------------------------------------------------------------------------------
def test_infotext_records_int8_and_reads_back(int8_engine):
    result = run(int8_engine)
    assert "Backend: openvino int8" in result.infotexts[0]
    png = write_png_with_infotext(result.images[0], result.infotexts[0])
    from io import BytesIO

    from PIL import Image

    parsed = parse_infotext(read_infotext(Image.open(BytesIO(png))))
    assert parsed["Backend"] == "openvino int8"
    values = values_from_params(parsed)
    assert (values["steps"], values["seed"], values["width"], values["prompt"]) == (4, 1234, 64, BASE["prompt"])


def test_int8_on_torch_says_why_on_the_first_job(tiny_models_dir, tmp_path, plain_cpu):
    eng = engine_on(tiny_models_dir, tmp_path, plain_cpu, "int8")
    assert eng.manager.current.plan.backend == "torch"
    result = run(eng)
    assert any(n.startswith("int8 weights need the OpenVINO backend") for n in result.notes)
    assert "Backend:" not in result.infotexts[0]


# --- the command line ---------------------------------------------------------------------------
def models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu, *options):
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: int8_cpu))
    code = app.main(["models", "--models-dir", str(tiny_models_dir), "--data-dir", str(tmp_path), *options])
    return code, capsys.readouterr()


def test_cli_precision_int8_shows_in_the_plan(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu):
    code, out = models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu, "--precision", "int8")
    assert code == 0 and "cpu (OpenVINO), unet int8 weights (fp32 compute)" in out.out


def test_cli_precision_int8_without_openvino_says_why(tiny_models_dir, tmp_path, capsys, monkeypatch, plain_cpu):
    code, out = models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, plain_cpu, "--precision", "int8")
    assert code == 0 and "int8 weights need the OpenVINO backend (not installed); using the auto precision" in out.out
    assert "unet fp32" in out.out


def test_cli_set_precision_int8_is_remembered(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu):
    code, out = models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu,
                               "--set-precision", "tiny-sd1", "int8")
    assert code == 0 and "unet int8 weights" in out.out
    code, out = models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu)
    assert code == 0 and "unet int8 weights" in out.out


def test_cli_refuses_a_bad_precision_in_one_line(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu):
    code, out = models_listing(tiny_models_dir, tmp_path, capsys, monkeypatch, int8_cpu, "--precision", "int4")
    assert code == 2 and "precision" in out.err and "int8" in out.err and len(out.err.strip().splitlines()) == 1
