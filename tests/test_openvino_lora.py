"""LoRAs on the OpenVINO backend (engine/openvino_lora.py): fused into the UNet's and the text
encoder's graphs once per set of LoRAs and weights, agreeing with torch's LoRA; weight 0 and an
all-zero LoRA give the plain image exactly; a set changed or taken off leaves nothing behind.

Tolerance as tests/test_openvino.py's: the graphs compute in f32 like torch, in another order
(at most 2 levels anywhere, under 0.1 on average)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from safetensors.torch import save_file  # noqa: E402

from tests.conftest import loaded_engine  # noqa: E402
from tests.test_lora import diffusers_lora, kohya_lora  # noqa: E402
from tests.test_openvino import BASE, assert_close, pixels  # noqa: E402
from tests.tiny_models import models_linking_tiny_sd1  # noqa: E402

FUSED = "the LoRAs were fused into the OpenVINO UNet in"
READ = "the OpenVINO UNet with these LoRAs was read from the cache in"
BF16_DECODE = "the VAE decoded in bf16 for LCM-LoRA's few-step job"


@pytest.fixture(scope="module")
def models(tiny_models_dir, tmp_path_factory, plain_cpu):
    root = tmp_path_factory.mktemp("ov-lora-models")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    pipe = loaded_engine(models, root / "probe", plain_cpu).manager.current.pipe
    (models / "Lora").mkdir()
    save_file(kohya_lora(pipe, 1), str(models / "Lora" / "style.safetensors"))
    save_file(diffusers_lora(pipe, 2), str(models / "Lora" / "ink.safetensors"))
    blank = {k: torch.zeros_like(v) if "lora_up" in k else v for k, v in kohya_lora(pipe, 3).items()}
    save_file(blank, str(models / "Lora" / "blank.safetensors"))
    save_file(kohya_lora(pipe, 4), str(models / "Lora" / "lcm-lora-tiny.safetensors"))  # a step LoRA by its name
    return models


@pytest.fixture(scope="module")
def ov(models, tmp_path_factory, plain_cpu):
    return loaded_engine(models, tmp_path_factory.mktemp("ov-lora"), replace(plain_cpu, openvino=True))


@pytest.fixture(scope="module")
def on_torch(models, tmp_path_factory, plain_cpu):
    return loaded_engine(models, tmp_path_factory.mktemp("torch-lora"), plain_cpu)


def run(engine, prompt):
    return engine.generate(engine.make_request({**BASE, "prompt": prompt}))


def text_encoder_part(engine):
    from engine.openvino_parts import HOOK_NAME

    return engine.manager.current.pipe.text_encoder._diffusers_hook.get_hook(HOOK_NAME).part


@pytest.mark.parametrize("tags", ["<lora:style:0.8>", "<lora:ink:0.6>", "<lora:style:0.5> <lora:ink:0.7>"],
                         ids=["kohya", "diffusers", "two"])
def test_a_lora_set_runs_on_openvino_and_agrees_with_torch(ov, on_torch, tags):
    prompt = f"a red fox in the snow {tags}"
    result = run(ov, prompt)
    assert any(note.startswith(FUSED) for note in result.notes), result.notes
    assert "Backend: openvino," in result.infotexts[0]
    assert not any("ran on torch" in note for note in result.notes)
    assert_close(result.images[0], run(on_torch, prompt).images[0])


def test_text_encoder_only_weights_fuse_the_encoder_and_leave_the_unet_plain(ov, on_torch):
    prompt = "a red fox in the snow <lora:style:0.9:0>"
    result = run(ov, prompt)
    assert not any(note.startswith(FUSED) for note in result.notes)  # the UNet's own graph
    assert text_encoder_part(ov)._loras.value.calls >= 1
    assert_close(result.images[0], run(on_torch, prompt).images[0])


def test_unet_only_weights_fuse_the_unet_and_leave_the_encoder_plain(ov, on_torch):
    part = text_encoder_part(ov)
    before = part.calls
    prompt = "a red fox in the snow <lora:style:0:0.9>"
    result = run(ov, prompt)
    assert any(note.startswith(FUSED) for note in result.notes)
    assert part.calls > before  # the checkpoint's own text encoder graph
    assert_close(result.images[0], run(on_torch, prompt).images[0])


@pytest.mark.parametrize("engine_name", ["ov", "on_torch"])
@pytest.mark.parametrize("tags", ["<lora:style:0>", "<lora:blank:1>", "<lora:style:0:0>"])
def test_weight_zero_and_an_all_zero_lora_give_the_plain_pixels_exactly(request, engine_name, tags):
    engine = request.getfixturevalue(engine_name)
    plain = run(engine, "a red fox in the snow")
    tagged = run(engine, f"a red fox in the snow {tags}")
    assert np.array_equal(pixels(tagged.images[0]), pixels(plain.images[0]))
    assert "Lora hashes" in tagged.infotexts[0]  # still recorded: the prompt names it
    assert tagged.notes == plain.notes


def test_a_new_weight_is_fused_again_and_agrees_with_torch(ov, on_torch):
    run(ov, "a red fox <lora:style:0.3>")
    again = run(ov, "a red fox <lora:style:0.3>")
    assert not any(note.startswith(FUSED) for note in again.notes)  # the same set: no second fuse
    changed = run(ov, "a red fox <lora:style:1.2>")
    assert any(note.startswith(FUSED) for note in changed.notes)
    assert_close(changed.images[0], run(on_torch, "a red fox <lora:style:1.2>").images[0])


def test_after_lora_jobs_a_plain_job_is_a_fresh_engines_pixels(ov, models, tmp_path, plain_cpu):
    for tags in ("<lora:style:0.8>", "<lora:style:0.4> <lora:ink:1>", "<lora:ink:0.5:0>"):
        run(ov, f"a red fox {tags}")
    after = run(ov, "a red fox in the snow")
    fresh = loaded_engine(models, tmp_path, replace(plain_cpu, openvino=True))
    assert np.array_equal(pixels(after.images[0]), pixels(run(fresh, "a red fox in the snow").images[0]))


def test_one_compiled_unet_is_kept_at_a_time(ov):
    unet = ov.manager.current.openvino
    run(ov, "a red fox <lora:style:0.6>")
    assert not unet.compiled.loaded and not unet.compiled_reuse.loaded  # the LoRA set's graphs replace them
    assert unet._loras.value.compiled.loaded
    run(ov, "a red fox")
    assert unet.compiled.loaded and unet._loras.value is None  # plain again: the set's graphs are gone


def _entries(root) -> set[str]:
    folder = root / "data" / "cache" / "openvino"
    return {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_a_lora_set_is_stored_the_second_time_it_is_fused_and_read_from_the_cache_after(models, tmp_path, plain_cpu):
    """Each engine is a new process's: the first fuses in memory, the second fuses and stores, the
    third compiles the stored graph; all three give the same pixels."""
    prompt = "a red fox <lora:style:0.7>"
    results, entries = [], []
    for _ in range(3):
        engine = loaded_engine(models, tmp_path, replace(plain_cpu, openvino=True))
        if not entries:
            entries.append(_entries(tmp_path))  # the checkpoint's own
        results.append(run(engine, prompt))
        entries.append(_entries(tmp_path))
    first, second, third = results
    assert any(note.startswith(FUSED) for note in first.notes) and entries[1] == entries[0]
    assert any(note.startswith(FUSED) for note in second.notes) and len(entries[2] - entries[1]) == 2  # both graphs
    assert any(note.startswith(READ) for note in third.notes) and entries[3] == entries[2]
    assert not any(note.startswith(FUSED) for note in third.notes)
    for other in (second, third):
        assert np.array_equal(pixels(other.images[0]), pixels(first.images[0]))


def test_a_weight_sweep_writes_no_graph_to_the_cache(models, tmp_path, plain_cpu):
    engine = loaded_engine(models, tmp_path, replace(plain_cpu, openvino=True))
    before = _entries(tmp_path)
    for weight in (0.25, 0.5, 0.75, 1):
        assert any(note.startswith(FUSED) for note in run(engine, f"a red fox <lora:style:{weight}>").notes)
    assert _entries(tmp_path) == before


def test_a_step_lora_job_on_a_bf16_plan_decodes_in_bf16_and_says_so(models, tmp_path, plain_cpu):
    import openvino

    from engine.openvino_parts import attached

    engine = loaded_engine(models, tmp_path, replace(plain_cpu, openvino=True, cpu_bf16=True))
    decoder = attached(engine.manager.current.pipe.vae.decoder)
    step = run(engine, "a red fox <lora:lcm-lora-tiny:1>")
    assert any(note.startswith(BF16_DECODE) for note in step.notes), step.notes
    hint, variant = decoder._other
    assert hint == "bf16" and variant.config["INFERENCE_PRECISION_HINT"] == "bf16"  # what Easel asked for
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # an AVX2-only CPU runs f32
        assert variant.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    assert not decoder.compiled.loaded  # one decoder in memory at a time
    plain = run(engine, "a red fox")
    assert not any(note.startswith(BF16_DECODE) for note in plain.notes)
    assert decoder.compiled.loaded and not variant.loaded  # the f32 decoder again


def test_a_step_lora_job_on_an_f32_plan_keeps_the_f32_decode(ov):
    step = run(ov, "a red fox <lora:lcm-lora-tiny:1>")
    assert not any("bf16" in note for note in step.notes), step.notes


def test_a_decoder_compiled_in_bf16_computes_in_bf16(ov):
    """compiled_in is the same graph compiled with another hint: bf16 rounding, not other weights."""
    import openvino

    from engine.openvino_parts import compiled_in

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no native bf16: OpenVINO computes a bf16-hinted graph in f32 here")
    vae = ov.manager.current.pipe.vae
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f32 = vae.decoder(latents)
        with compiled_in(vae.decoder, "bf16") as part:
            assert part is not None
            bf16 = vae.decoder(latents)
        again = vae.decoder(latents)
    assert torch.equal(again, f32)
    assert not torch.equal(bf16, f32)
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()


def test_a_single_request_engine_drops_the_compiled_unet_before_its_last_decode(ov, models, tmp_path, plain_cpu):
    once = loaded_engine(models, tmp_path, replace(plain_cpu, openvino=True))
    once.generator.single_request = True  # as the CLI's EngineConfig(single_request=True) sets it
    prompt = "a red fox <lora:style:0.6>"
    first = run(once, prompt)
    unet = once.manager.current.openvino
    assert not unet._loras.value.compiled.loaded and not unet.compiled.loaded  # gone before the decode
    expected = pixels(run(ov, prompt).images[0])
    assert np.array_equal(pixels(first.images[0]), expected)
    assert np.array_equal(pixels(run(once, prompt).images[0]), expected)  # called again, it compiles again
    assert run(ov, prompt) and ov.manager.current.openvino._loras.value.compiled.loaded  # a server keeps it
