"""OpenVINO as the CPU backend (engine/openvino_backend.py) on the tiny SD 1.x model: the plan's
choice, conversion and its on-disk cache, and images that agree with torch's.

Tolerance: the converted UNet computes in f32 like torch, in another order, so the two differ by
float rounding (~1e-6 relative per step); over a few sampling steps and the VAE that stays under
one 8-bit level almost everywhere. Asserted: at most 2 levels anywhere, under 0.1 on average.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

import app  # noqa: E402
import engine.openvino_backend as ovb  # noqa: E402
from engine.devices import Hardware, plan_for  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.errors import RequestError  # noqa: E402
from engine.families import FAMILIES, Family  # noqa: E402
from tests.conftest import loaded_engine  # noqa: E402

BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 48,
        "seed": 1234, "save_images": False}
MAX_LEVELS, MEAN_LEVELS = 2, 0.1


@pytest.fixture(scope="module")
def ov_cpu(plain_cpu) -> Hardware:
    return replace(plain_cpu, openvino=True)


@pytest.fixture(scope="module")
def ov_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-engine")


@pytest.fixture(scope="module")
def ov_engine(tiny_models_dir, ov_root, ov_cpu):
    return loaded_engine(tiny_models_dir, ov_root, ov_cpu)


@pytest.fixture(scope="module")
def sd_engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    """This module's own torch engine, fresh like ov_engine, whatever other modules did to the
    session's one (test_generator.py's bf16 round trip left its UNet with bf16-rounded weights
    until it unloaded it: images off by one level, CI failed on that)."""
    return loaded_engine(tiny_models_dir, tmp_path_factory.mktemp("ov-torch-engine"), plain_cpu)


def run(engine, **fields):
    return engine.generate(engine.make_request({**BASE, **fields}))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_close(a, b):
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (diff.max(), diff.mean())


def _cache_entries(root):
    cache = root / "data" / "cache" / "openvino"
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _unet_entries(root, loaded):
    """The UNet's two entries: the cache's but the VAE's and the text encoder's (tests/test_openvino_parts.py)."""
    from engine.openvino_parts import text_encoder_parts, vae_parts

    parts = {ovb.cache_key(loaded.hash, p.name, p.keyed_by, p.inputs)
             for p in vae_parts(loaded.own_vae) + text_encoder_parts(loaded.pipe)}
    return [entry for entry in _cache_entries(root) if entry.name not in parts]


def _unet_entry(root, loaded):
    """The full UNet graph's entry of a model's two (the reuse step's graph holds a few layers)."""
    return max(_unet_entries(root, loaded), key=lambda entry: (entry / "model.bin").stat().st_size)


# --- the plan ---------------------------------------------------------------------------------
def test_auto_picks_openvino_on_a_cpu_that_has_it(ov_cpu, plain_cpu):
    sd1 = FAMILIES[Family.SD1]
    assert plan_for(sd1, ov_cpu).backend == "openvino"
    assert "OpenVINO" in plan_for(sd1, ov_cpu).describe()
    assert plan_for(sd1, plain_cpu).backend == "torch"
    assert plan_for(sd1, ov_cpu, backend="torch").backend == "torch"


def test_openvino_asked_for_without_it_runs_torch_and_says_so(plain_cpu, ov_cpu):
    plan = plan_for(FAMILIES[Family.SD1], plain_cpu, backend="openvino")
    assert plan.backend == "torch" and any("OpenVINO is not installed" in n for n in plan.notes)
    gpu = replace(ov_cpu, cuda=True, cuda_name="Test GPU", cuda_vram_gb=24.0)
    plan = plan_for(FAMILIES[Family.SD1], gpu, backend="openvino")
    assert plan.device == "cuda" and plan.backend == "torch"


def test_unknown_backend_is_refused_naming_the_field(ov_cpu):
    with pytest.raises(RequestError) as error:
        plan_for(FAMILIES[Family.SD1], ov_cpu, backend="tensorrt")
    assert error.value.field == "backend"


def test_cli_refuses_a_bad_backend_in_one_line(tiny_models_dir, tmp_path, capsys):
    code = app.main(["models", "--models-dir", str(tiny_models_dir), "--data-dir", str(tmp_path),
                     "--backend", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and "backend" in err and len(err.strip().splitlines()) == 1


# --- conversion and the cache -------------------------------------------------------------------
def test_load_converts_the_unet_and_the_first_job_says_so(ov_engine, ov_root):
    loaded = ov_engine.manager.current
    assert loaded.plan.backend == "openvino" and loaded.openvino is not None
    assert len(_unet_entries(ov_root, loaded)) == 2  # the full graph and the reuse step's
    result = run(ov_engine)
    assert any("prepared this model for your CPU with OpenVINO" in note for note in result.notes)
    assert not any("OpenVINO" in note for note in run(ov_engine).notes)  # said once


def test_second_load_reads_the_cache_without_converting(ov_engine, tiny_models_dir, ov_root, ov_cpu, monkeypatch):
    calls = []
    for name in ("convert_unet", "convert_unet_reuse"):  # neither part is converted again
        real = getattr(ovb, name)
        monkeypatch.setattr(ovb, name, lambda unet, real=real: calls.append(unet) or real(unet))
    again = loaded_engine(tiny_models_dir, ov_root, ov_cpu)
    assert calls == [] and again.manager.current.openvino.from_cache
    for entry in _cache_entries(ov_root):
        assert any((entry / "compiled").glob("*.blob"))  # OpenVINO's compiled blob, imported on later loads
    assert_close(run(again).images[0], run(ov_engine).images[0])
    fast = dict(speed="fast", steps=12)
    assert_close(run(again, **fast).images[0], run(ov_engine, **fast).images[0])


def test_a_changed_checkpoint_is_converted_again(tmp_path, ov_cpu):
    from engine.tiny import save_sd1_folder

    models = tmp_path / "models"
    save_sd1_folder(models / "Stable-diffusion" / "tiny-sd1", seed=0)
    first = loaded_engine(models, tmp_path, ov_cpu)
    entries = len(_cache_entries(tmp_path))
    before = run(first).images[0]
    save_sd1_folder(models / "Stable-diffusion" / "tiny-sd1", seed=1)  # new weights, same name
    second = loaded_engine(models, tmp_path, ov_cpu)
    assert not second.manager.current.openvino.from_cache
    assert len(_cache_entries(tmp_path)) == 2 * entries  # every part's entries, for each version
    after = run(second).images[0]
    assert np.abs(pixels(before) - pixels(after)).max() > 10  # the new weights' image, not the old graph's
    torch_engine = Engine(EngineConfig(models, tmp_path / "t-out", tmp_path / "t-data", backend="torch"), ov_cpu)
    assert_close(after, run(torch_engine).images[0])


def test_a_damaged_cache_entry_is_rebuilt(tiny_models_dir, tmp_path, ov_cpu):
    entry = _unet_entry(tmp_path, loaded_engine(tiny_models_dir, tmp_path, ov_cpu).manager.current)
    weights = entry / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a half-written copy
    rebuilt = loaded_engine(tiny_models_dir, tmp_path, ov_cpu)
    assert not rebuilt.manager.current.openvino.from_cache
    meta = json.loads((entry / "meta.json").read_text())
    assert (entry / "model.bin").stat().st_size == meta["bin_size"]
    run(rebuilt)


def test_cache_keeps_to_its_size_limit(tmp_path, ov_engine, ov_root):
    entry = _unet_entry(ov_root, ov_engine.manager.current)
    cache = ovb.OpenVINOCache(tmp_path / "cache", limit_bytes=1)  # room for the newest entry only
    for name in ("old", "new"):
        shutil.copytree(entry, cache.root / name)
    cache.prune(keep="new")
    assert [p.name for p in cache.root.iterdir()] == ["new"]


def test_a_failed_conversion_leaves_the_model_on_torch(tiny_models_dir, tmp_path, ov_cpu, monkeypatch):
    def fail(unet):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(ovb, "convert_unet", fail)
    eng = loaded_engine(tiny_models_dir, tmp_path, ov_cpu)
    loaded = eng.manager.current
    assert loaded.openvino is None and loaded.plan.backend == "torch"
    result = run(eng)
    assert any("converter exploded" in note and "running on torch" in note for note in result.notes)
    assert "Backend:" not in result.infotexts[0]


# --- images agree with torch's -------------------------------------------------------------------
# DPM++ SDE is left out: its Brownian noise is seeded from torch's global RNG, so even two torch
# runs of one seed differ (a bug of its own, outside the backend).
@pytest.mark.parametrize("sampler, schedule", [("Euler a", "Automatic"), ("DPM++ 2M", "Karras"), ("DDIM", "Automatic"),
                                               ("LCM", "Automatic"), ("Heun", "Automatic"), ("DPM++ 2M SDE", "Karras"),
                                               ("UniPC", "Automatic"), ("PLMS", "Automatic")])
def test_openvino_and_torch_images_agree(ov_engine, sd_engine, sampler, schedule):
    fields = dict(sampler=sampler, schedule_type=schedule)
    ov, torch_result = run(ov_engine, **fields), run(sd_engine, **fields)
    assert_close(ov.images[0], torch_result.images[0])
    assert "Backend: openvino" in ov.infotexts[0]
    assert "Backend:" not in torch_result.infotexts[0]


def test_other_sizes_batches_cfg_1_and_long_prompts_agree(ov_engine, sd_engine):
    fields = dict(width=40, height=72, batch_size=2, cfg_scale=1.0,
                  prompt=", ".join(f"detail number {i}" for i in range(60)))  # over 75 tokens: 154 of them
    ov, torch_result = run(ov_engine, **fields), run(sd_engine, **fields)
    for a, b in zip(ov.images, torch_result.images):
        assert_close(a, b)


def test_img2img_and_hires_agree(ov_engine, sd_engine):
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    from PIL import Image

    init = Image.fromarray(gradient)
    for fields in (dict(mode="img2img", init_image=init, denoising_strength=0.6),
                   dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5)):
        ov, torch_result = run(ov_engine, **fields), run(sd_engine, **fields)
        assert_close(ov.images[0], torch_result.images[0])
        assert "Backend: openvino" in ov.infotexts[0]


def test_fast_speed_runs_on_openvino_and_agrees_with_torch(ov_engine, sd_engine):
    fields = dict(speed="fast", steps=12)
    ov, torch_result = run(ov_engine, **fields), run(sd_engine, **fields)
    assert_close(ov.images[0], torch_result.images[0])
    assert "Backend: openvino" in ov.infotexts[0] and "Speed: fast" in ov.infotexts[0]
    assert not any("on torch" in note for note in ov.notes)


def test_backend_torch_still_works_where_openvino_is_installed(tiny_models_dir, tmp_path, ov_cpu):
    eng = Engine(EngineConfig(tiny_models_dir, tmp_path / "outputs", tmp_path / "data", backend="torch"), ov_cpu)
    eng.load_model("tiny-sd1")
    assert eng.manager.current.openvino is None and eng.manager.current.plan.backend == "torch"
    assert "Backend:" not in run(eng).infotexts[0]
    assert not (tmp_path / "data" / "cache" / "openvino").exists()  # nothing converted


def test_per_model_setting_picks_the_backend(tiny_models_dir, tmp_path, ov_cpu):
    eng = Engine(EngineConfig(tiny_models_dir, tmp_path / "outputs", tmp_path / "data"), ov_cpu)
    eng.set_model_backend("tiny-sd1", "torch")
    (status,) = [s for s in eng.models() if s.name.startswith("tiny-sd1")]
    assert "OpenVINO" not in status.plan
    eng.set_model_backend("tiny-sd1", "auto")
    (status,) = [s for s in eng.models() if s.name.startswith("tiny-sd1")]
    assert "OpenVINO" in status.plan


def test_latent_sizes_the_downsampling_does_not_divide(ov_engine):
    """The graph holds diffusers' upsample-to-the-skip-size branch, so odd latent sizes run too
    (the tiny model's pixel sizes always give even latents; here the UNet is called directly)."""
    import torch

    unet = ov_engine.manager.current.pipe.unet
    compiled = ov_engine.manager.current.openvino
    for height, width in ((9, 13), (8, 12)):
        sample = torch.randn(2, 4, height, width)
        hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
        with torch.inference_mode():
            expected = unet(sample, 500, encoder_hidden_states=hidden).sample
            with compiled.running(unet) as record:
                got = unet(sample, 500, encoder_hidden_states=hidden).sample
        assert record.used == {"openvino"}
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


# --- the torch UNet beside OpenVINO's ------------------------------------------------------------
def _mapped_files(address: int) -> set[str]:
    """The files mapped into this process at `address` (Linux /proc/self/maps)."""
    found = set()
    for line in open("/proc/self/maps", encoding="utf-8"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) > 5:
            found.add(fields[5])
    return found


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_the_torch_unets_weights_are_memory_mapped_from_the_cache(ov_engine, ov_root):
    """OpenVINO holds its own compiled copy; the torch UNet beside it must not be a second one in RAM."""
    unet = ov_engine.manager.current.pipe.unet
    entry = _unet_entry(ov_root, ov_engine.manager.current)
    weights = [p for p in unet.parameters()]
    mapped = {f for p in (weights[0], weights[len(weights) // 2], weights[-1]) for f in _mapped_files(p.data_ptr())}
    assert mapped == {str(entry / "torch-float32.pt")}


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_openvinos_mapped_weights_are_handed_back_after_a_job_and_read_again_alike(ov_engine, ov_root):
    """OpenVINO repacks the weights it maps from the cache; the pages it read must not stay resident
    beside its copy (engine.mapped_pages), and reading them again must give the same image."""
    from engine.mapped_pages import read_only_mappings
    from tests.test_mapped_pages import resident_bytes

    first = run(ov_engine, prompt="a lighthouse at dusk", seed=11).images[0]
    cache = (ov_root / "data" / "cache" / "openvino").resolve()
    spans = read_only_mappings(cache)
    mapped = {name for _, _, name in spans}
    assert any(name.endswith((".blob", "model.bin")) for name in mapped)  # its weights, mapped
    size = sum(end - start for start, end, _ in spans)
    assert sum(resident_bytes(Path(name)) for name in mapped) < size // 10
    again = run(ov_engine, prompt="a lighthouse at dusk", seed=11).images[0]
    assert np.array_equal(pixels(first), pixels(again))


def test_a_lora_runs_fused_into_the_openvino_unet_like_on_torch(tiny_models_dir, tmp_path, ov_cpu, plain_cpu):
    import os

    from safetensors.torch import save_file
    from tests.test_lora import kohya_lora

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    os.symlink(tiny_models_dir / "Stable-diffusion" / "tiny-sd1", models / "Stable-diffusion" / "tiny-sd1")
    ov = loaded_engine(models, tmp_path / "ov", ov_cpu)
    (models / "Lora").mkdir()
    save_file(kohya_lora(ov.manager.current.pipe, 1), str(models / "Lora" / "style.safetensors"))
    plain = loaded_engine(models, tmp_path / "torch", plain_cpu)
    fields = dict(prompt="a red fox <lora:style:0.8>")
    with_lora = run(ov, **fields)
    assert any(note.startswith("the LoRAs were fused into the OpenVINO UNet in") for note in with_lora.notes)
    assert "Backend: openvino" in with_lora.infotexts[0] and "torch" not in with_lora.infotexts[0]
    assert_close(with_lora.images[0], run(plain, **fields).images[0])
    again = run(ov, **fields)  # the same set: its fused graphs again, no second fuse
    assert not any("fused" in note for note in again.notes)
    assert np.array_equal(pixels(again.images[0]), pixels(with_lora.images[0]))
    assert_close(run(ov).images[0], run(plain).images[0])  # and back to the checkpoint's own weights


def test_a_bf16_plan_keeps_f16_weights_in_its_own_entry(tiny_models_dir, tmp_path, ov_cpu, ov_root, ov_engine):
    """OpenVINO keeps the saved constants beside its repacked bf16 copy: f16 halves the first."""
    bf16_cpu = replace(ov_cpu, cpu_bf16=True)
    eng = loaded_engine(tiny_models_dir, tmp_path, bf16_cpu)
    assert eng.manager.current.openvino.precision == "bf16"
    f16_entry = _unet_entry(tmp_path, eng.manager.current)
    f32_entry = _unet_entry(ov_root, ov_engine.manager.current)
    assert f16_entry.name != f32_entry.name
    f16_size, f32_size = ((e / "model.bin").stat().st_size for e in (f16_entry, f32_entry))
    assert f16_size < 0.6 * f32_size
    assert run(eng).images[0].size == (64, 48)


def test_a_bf16_plans_openvino_pass_gets_the_latents_in_f32(tiny_models_dir, tmp_path, ov_cpu, monkeypatch):
    """The torch UNet beside it is bf16, and torch passes get bf16 inputs; OpenVINO's graph takes
    f32, so its passes get the sampler's f32 latents unrounded (and hand back f32)."""
    import torch

    seen = []
    real = ovb.OpenVINOUNet.__call__
    monkeypatch.setattr(ovb.OpenVINOUNet, "__call__",
                        lambda self, inputs: seen.append(inputs["sample"].dtype) or real(self, inputs))
    eng = loaded_engine(tiny_models_dir, tmp_path, replace(ov_cpu, cpu_bf16=True))
    assert eng.manager.current.pipe.unet.dtype == torch.bfloat16
    run(eng, steps=2)
    assert seen and set(seen) == {torch.float32}


# --- the page says when a first load prepares the model ------------------------------------------
def test_the_pickers_first_load_says_it_is_preparing_the_model(tiny_models_dir, tmp_path, ov_cpu):
    from ui.app_ui import create_ui

    studio = create_ui(Engine(EngineConfig(tiny_models_dir, tmp_path / "out", tmp_path / "data"), ov_cpu)).studio
    first = list(studio.select_model("tiny-sd1"))
    assert any(ovb.PREPARING in message for message in first[:-1]) and first[-1].startswith("Loaded **tiny-sd1**")
    studio.engine.manager.unload()
    again = list(studio.select_model("tiny-sd1"))  # cached now: nothing to prepare
    assert not any(ovb.PREPARING in message for message in again)


def test_a_jobs_first_load_shows_preparing_in_its_progress(tiny_models_dir, tmp_path, ov_cpu):
    from ui.app_ui import create_ui

    studio = create_ui(Engine(EngineConfig(tiny_models_dir, tmp_path / "out", tmp_path / "data"), ov_cpu)).studio
    fields = {"mode": "txt2img", "prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 7}
    views = list(studio.generate(("session", "txt2img"), fields, "tiny-sd1"))
    assert any(ovb.PREPARING in view.progress for view in views[:-1])
    assert views[-1].images


def test_the_plan_names_an_intel_gpu_openvino_sees(tiny_models_dir, tmp_path, ov_cpu):
    with_gpu = replace(ov_cpu, intel_gpus=("Intel(R) Arc(TM) A770 Graphics (dGPU)",))
    plan = plan_for(FAMILIES[Family.SD1], with_gpu)
    assert plan.backend == "openvino" and any("Intel(R) Arc(TM) A770" in note for note in plan.notes)
    (status,) = [s for s in Engine(EngineConfig(tiny_models_dir, tmp_path / "o", tmp_path / "d"), with_gpu).models()
                 if s.name.startswith("tiny-sd1")]
    assert "Intel GPU found (Intel(R) Arc(TM) A770" in status.plan
    assert not any("Intel GPU" in note for note in plan_for(FAMILIES[Family.SD1], ov_cpu).notes)


def test_a_conversion_that_would_not_fit_in_memory_runs_on_torch_and_says_so(tiny_models_dir, tmp_path, ov_cpu,
                                                                             monkeypatch):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1024))  # 1 kB free
    eng = loaded_engine(tiny_models_dir, tmp_path, ov_cpu)
    assert eng.manager.current.openvino is None and eng.manager.current.plan.backend == "torch"
    notes = run(eng).notes
    (note,) = [n for n in notes if "OpenVINO could not prepare this model" in n]
    assert "converting needs about" in note and "running on torch" in note
    # The VAE and text encoder could not either: one note names them together, for the same reason.
    (parts,) = [n for n in notes if "OpenVINO could not prepare the" in n]
    assert "VAE decoder, VAE encoder and text encoder" in parts and "converting needs about" in parts


# --- the fast speed on OpenVINO ----------------------------------------------------------------
def unet_calls(unet, calls):
    """Each (sample, timestep, prompt) call's noise prediction."""
    import torch

    with torch.inference_mode():
        return [unet(sample, t, encoder_hidden_states=hidden).sample for sample, t, hidden in calls]


def reuse_calls():
    """Steps that drift a little, as sampling does; the batch changes at the fifth (a full step)."""
    import torch

    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 9, 13, generator=g), torch.randn(2, 77, 64, generator=g)
    calls = [(sample + 0.1 * k * torch.randn(sample.shape, generator=g), 900 - 50 * k, hidden) for k in range(4)]
    return calls + [(sample[:1], 600, hidden[:1]), (sample[:1] + 0.1, 550, hidden[:1])]


def test_openvino_reuse_steps_compute_torchs_reuse_steps(ov_engine):
    """Called directly: full and reuse steps (the reuse graph fed the full graph's features) give
    torch's feature reuse results, on a latent size the downsampling does not divide, and the
    steps are counted as torch counts them."""
    import torch

    from engine.feature_cache import FeatureReuse

    unet = ov_engine.manager.current.pipe.unet
    compiled = ov_engine.manager.current.openvino
    calls = reuse_calls()
    with FeatureReuse(unet, interval=3) as reuse:
        expected = unet_calls(unet, calls)
    with compiled.running(unet, reuse_interval=3) as record:
        got = unet_calls(unet, calls)
    assert record.used == {"openvino"}
    assert (record.clock.full_steps, record.clock.reused_steps) == (reuse.full_steps, reuse.reused_steps) == (3, 3)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    exact = unet_calls(unet, calls)
    assert not torch.allclose(got[1], exact[1], rtol=1e-4, atol=1e-4)  # step 1 did reuse: not the exact step


def test_the_reuse_graph_holds_only_the_layers_a_reuse_step_runs(ov_engine, ov_root):
    """Its weights are the input conv's, the time embedding's, the last layer's and the output
    head's; the skipped blocks and the activations remembered while tracing are left out."""
    unet = ov_engine.manager.current.pipe.unet
    last = unet.up_blocks[-1]
    runs = [unet.conv_in, unet.time_embedding, last.resnets[-1], unet.conv_norm_out, unet.conv_out,
            *(last.attentions[-1:] if getattr(last, "attentions", None) else [])]
    run_bytes = sum(p.numel() for module in runs for p in module.parameters()) * 4
    entry = min(_unet_entries(ov_root, ov_engine.manager.current), key=lambda entry: (entry / "model.bin").stat().st_size)
    assert 0.9 * run_bytes <= (entry / "model.bin").stat().st_size <= 1.05 * run_bytes


def test_a_call_openvino_does_not_cover_runs_torch_in_full_and_the_next_is_full(ov_engine):
    """A fast pass's call with an argument the graphs do not take (here a per-call LoRA scale) runs
    on torch in full; the next call cannot reuse features that call did not leave, so it is full too."""
    import torch

    unet = ov_engine.manager.current.pipe.unet
    compiled = ov_engine.manager.current.openvino
    calls = reuse_calls()[:3]
    exact = unet_calls(unet, calls)
    with compiled.running(unet, reuse_interval=3) as record, torch.inference_mode():
        sample, t, hidden = calls[0]
        unet(sample, t, encoder_hidden_states=hidden)
        sample, t, hidden = calls[1]
        uncovered = unet(sample, t, encoder_hidden_states=hidden, cross_attention_kwargs={"scale": 1.0}).sample
        sample, t, hidden = calls[2]
        after = unet(sample, t, encoder_hidden_states=hidden).sample
    assert record.used == {"openvino", "torch"}
    assert (record.clock.full_steps, record.clock.reused_steps) == (3, 0)
    assert torch.equal(uncovered, exact[1])
    assert torch.allclose(after, exact[2], rtol=1e-4, atol=1e-4), (after - exact[2]).abs().max()


def test_an_sdxl_unets_reuse_steps_compute_torchs(tmp_path):
    """SDXL's size/pooled-text conditioning goes into the time embedding, which a reuse step
    runs: the reuse graph takes text_embeds and time_ids too."""
    import torch

    from engine.feature_cache import FeatureReuse
    from tests.tiny_models import SDXL_PROJECTION, tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline().unet
    compiled = ovb.prepare_unet(unet, "tiny-sdxl", ovb.OpenVINOCache(tmp_path))
    assert compiled.names[-2:] == ("text_embeds", "time_ids")
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 9, 13, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, SDXL_PROJECTION, generator=g), "time_ids": torch.full((2, 6), 512.0)}

    def steps():
        with torch.inference_mode():
            return [unet(sample + 0.1 * k, 900 - 50 * k, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
                    for k in range(3)]

    with FeatureReuse(unet, interval=3):
        expected = steps()
    with compiled.running(unet, reuse_interval=3) as record:
        got = steps()
    assert record.used == {"openvino"} and record.clock.reused_steps == 2
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
