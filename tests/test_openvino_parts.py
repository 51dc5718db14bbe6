"""OpenVINO for the VAE's decoder and encoder and the text encoder(s) (engine/openvino_parts.py), on
the tiny models: each part converted once and cached, hooked onto its torch module, agreeing with
torch; textual inversions, a chosen VAE and a text-encoder LoRA still right; a part that fails stays
on torch with a note while the rest keeps OpenVINO.

Tolerance: like the UNet (tests/test_openvino.py), the parts compute in f32 in another order than
torch, so they differ by float rounding: text embeddings within 1e-5 (absolute, on values of order
1), images at most 2 8-bit levels anywhere and under 0.1 on average.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("openvino")

import engine.openvino_backend as ovb  # noqa: E402
import engine.openvino_parts as ovp  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.openvino_parts import attached  # noqa: E402
from engine.prompts import PromptEncoder  # noqa: E402
from tests.test_lora import kohya_lora  # noqa: E402
from tests.test_openvino import assert_close, pixels  # noqa: E402 - the same tolerance as the UNet's
from tests.tiny_models import tiny_sdxl_pipeline, tiny_vae  # noqa: E402

BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 48,
        "seed": 77, "save_images": False}
EMBED_ATOL = 1e-5
# Prompts here carry no (word:1.3) weights: A1111's emphasis rescales each chunk by the ratio of
# its means before and after weighting, and the tiny model's final LayerNorm (bias 0) makes the
# mean ~0, so that ratio turns float rounding into large differences, on torch alone too (a trained
# encoder's bias keeps the mean away from 0). Weights are applied after the encoder either way.
LONG = "a lantern by a lake, " + ", ".join(f"detail {i}" for i in range(50))  # 2 chunks
PARTS = ("vae_decoder", "vae_encoder", "text_encoder")


@pytest.fixture(scope="module")
def models(tiny_models_dir, tmp_path_factory):
    """The session's tiny SD 1.x model, with a textual inversion beside it (A1111's layout), a VAE
    file of other weights and a LoRA that has text-encoder weights."""
    root = tmp_path_factory.mktemp("ov-parts")
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    os.symlink(tiny_models_dir / "Stable-diffusion" / "tiny-sd1", models / "Stable-diffusion" / "tiny-sd1")
    (models / "VAE").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_vae(5).state_dict().items()}, str(models / "VAE" / "other.safetensors"))
    return models


def engine_on(models, root, hardware):
    eng = Engine(EngineConfig(models, root / "outputs", root / "data"), hardware)
    eng.load_model("tiny-sd1")
    return eng


@pytest.fixture(scope="module")
def ov_cpu(plain_cpu):
    return replace(plain_cpu, openvino=True)


@pytest.fixture(scope="module")
def ov_root(models):
    return models.parent / "ov"


@pytest.fixture(scope="module")
def ov_engine(models, ov_root, ov_cpu):
    return engine_on(models, ov_root, ov_cpu)


@pytest.fixture(scope="module")
def torch_engine(models, plain_cpu):
    """A torch engine of its own on the same folder (the chosen VAE and the LoRA change its model)."""
    return engine_on(models, models.parent / "torch", plain_cpu)


@pytest.fixture(scope="module")
def embedding(models, ov_engine):
    """mytoken: an embedding whose vectors are the token rows of "red dog"."""
    loaded = ov_engine.manager.current
    tokenizer, encoder = loaded.encoder.tokenizers[0], loaded.pipe.text_encoder
    ids = tokenizer("red dog", add_special_tokens=False)["input_ids"]
    folder = models.parent / "embeddings"
    folder.mkdir(exist_ok=True)
    save_file({"emb_params": encoder.get_input_embeddings().weight[ids].detach().clone()}, str(folder / "mytoken.safetensors"))
    return "mytoken"


def run(engine, **fields):
    return engine.generate(engine.make_request({**BASE, **fields}))



def modules(loaded) -> dict:
    pipe = loaded.pipe
    return {"vae_decoder": pipe.vae.decoder, "vae_encoder": pipe.vae.encoder, "text_encoder": pipe.text_encoder}


def calls(loaded) -> dict:
    return {name: attached(module).calls for name, module in modules(loaded).items()}


def entry(root, weights_hash, name, keyed_by, inputs):
    return root / "data" / "cache" / "openvino" / ovb.cache_key(weights_hash, name, keyed_by, inputs)


# --- converted, cached, hooked ------------------------------------------------------------------
def test_each_part_is_converted_into_its_own_cache_entry(ov_engine, ov_root):
    loaded = ov_engine.manager.current
    plans = {p.name: p for p in ovp.vae_parts(loaded.pipe.vae) + ovp.text_encoder_parts(loaded.pipe)}
    assert set(plans) == set(PARTS)
    for name, module in modules(loaded).items():
        part = attached(module)
        assert part is not None and part.name == name
        plan = plans[name]
        assert (entry(ov_root, loaded.hash, name, plan.keyed_by, plan.inputs) / "model.xml").is_file()


def test_the_text_encoders_graph_leaves_the_token_table_out(ov_engine, ov_root):
    """The token lookup runs in torch (textual inversions write there), so its 49408-row table is
    not stored twice: the graph's weights are smaller than that table alone."""
    loaded = ov_engine.manager.current
    encoder = loaded.pipe.text_encoder
    folder = entry(ov_root, loaded.hash, "text_encoder", encoder, ("input_ids", "token_embeds"))
    table = encoder.get_input_embeddings().weight
    assert (folder / "model.bin").stat().st_size < table.numel() * 4


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_the_torch_parts_weights_are_memory_mapped_from_their_entries(ov_engine, ov_root):
    """Kept for the token lookup, a LoRA or an uncovered call, but not as a second copy in RAM."""
    from tests.test_openvino import _mapped_files

    loaded = ov_engine.manager.current
    for plan in ovp.vae_parts(loaded.own_vae) + ovp.text_encoder_parts(loaded.pipe):
        folder = entry(ov_root, loaded.hash, plan.name, plan.keyed_by, plan.inputs)
        weights = list(plan.target.parameters())
        mapped = {f for p in (weights[0], weights[-1]) for f in _mapped_files(p.data_ptr())}
        assert mapped == {str(folder / "torch-float32.pt")}, plan.name


def test_a_second_load_converts_no_part(models, ov_engine, ov_root, ov_cpu, monkeypatch):
    converted = []
    for name in ("convert_vae_part", "convert_text_encoder"):
        monkeypatch.setattr(ovp, name, lambda *args, name=name: converted.append(name))
    again = engine_on(models, ov_root, ov_cpu)
    assert converted == []
    assert all(attached(m).from_cache for m in modules(again.manager.current).values())
    assert not any("prepared this model" in note for note in again.manager.current.notes)


# --- agreeing with torch --------------------------------------------------------------------------
def test_txt2img_runs_the_text_encoder_and_decoder_on_openvino_and_agrees(ov_engine, torch_engine):
    loaded = ov_engine.manager.current
    before = calls(loaded)
    ov = run(ov_engine, prompt=LONG)
    after = calls(loaded)
    assert after["text_encoder"] > before["text_encoder"] and after["vae_decoder"] == before["vae_decoder"] + 1
    assert "Backend: openvino" in ov.infotexts[0]
    assert_close(ov.images[0], run(torch_engine, prompt=LONG).images[0])


def test_img2img_encodes_the_init_image_on_openvino_and_agrees(ov_engine, torch_engine):
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    from PIL import Image

    fields = dict(mode="img2img", init_image=Image.fromarray(gradient), denoising_strength=0.6)
    loaded = ov_engine.manager.current
    before = calls(loaded)["vae_encoder"]
    ov = run(ov_engine, **fields)
    assert calls(loaded)["vae_encoder"] == before + 1
    assert_close(ov.images[0], run(torch_engine, **fields).images[0])


LATENT_ATOL = 1e-4  # measured: 1.1e-6 on the tiny VAE, 4.6e-6 on SD 1.5's at 512² (bench/openvino_vae_encoder.py)


def test_the_tiny_vaes_encoder_is_compiled_by_openvino_and_its_latents_agree_with_torch(ov_engine, torch_engine):
    """Issue 20: the encoder traces at convert_vae_part's example on the tiny model (no fallback to
    torch, no note) and `vae.encode` gives torch's latent distribution through the hook."""
    loaded = ov_engine.manager.current
    part = attached(loaded.own_vae.encoder)
    assert part is not None and not part.failed
    assert not any("VAE encoder" in note for note in loaded.notes)
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    before = part.calls
    with torch.inference_mode():
        ov = loaded.own_vae.encode(image).latent_dist
        ref = torch_engine.manager.current.own_vae.encode(image).latent_dist
    assert part.calls == before + 1  # the compiled graph ran, not the torch forward
    assert ov.mean.shape == ref.mean.shape == (1, 4, 24, 32)
    assert torch.allclose(ov.mean, ref.mean, atol=LATENT_ATOL, rtol=0), (ov.mean - ref.mean).abs().max()
    assert torch.allclose(ov.logvar, ref.logvar, atol=LATENT_ATOL, rtol=0), (ov.logvar - ref.logvar).abs().max()


def test_only_an_example_too_small_for_the_net_trips_the_encoders_trace():
    """What trips "Couldn't get TorchScript module by tracing" on the tiny VAE's encoder: an example
    of 3x3 or less, whose 1x1 map after the downsample leaves F.group_norm one value per group (32
    channels in 32 groups). The same net with SD 1.5's 4 channels per group traces there; the
    tiny VAE traces from 4x4 up, and convert_vae_part's 9x11 example (see its docstring) clears it."""
    from diffusers import AutoencoderKL

    def convert(vae, side):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ovb.convert_model(ovp._ConvNetTraceable(vae.encoder).eval(), example_input=(torch.randn(1, 3, side, side),))

    tiny = tiny_vae(0)
    with pytest.raises(Exception, match="Couldn't get TorchScript") as failed:
        convert(tiny, 3)
    assert "Expected more than 1 value per channel" in str(failed.value)
    convert(tiny, 4)
    config = {k: v for k, v in tiny.config.items() if not k.startswith("_")}
    convert(AutoencoderKL.from_config({**config, "norm_num_groups": 8}).eval(), 3)  # 4 channels per group


def test_a_part_openvino_cannot_trace_runs_on_torch_and_says_so_in_the_log(tmp_path, caplog):
    """A real trace failure (the encoder at a 3x3 example) leaves the part on torch with a note, and
    the warning reaches the log: openvino.convert_model left the root logger at ERROR after a
    failed conversion, which dropped that warning and every later one (ovb.convert_model)."""
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    vae = tiny_vae(0)

    def too_small():
        with torch.no_grad():
            example = (torch.randn(1, 3, 3, 3),)
            return ovb.convert_model(ovp._ConvNetTraceable(vae.encoder).eval(), example_input=example)

    plan = replace(ovp.vae_parts(vae)[1], convert=too_small)
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        parts = ovp.prepare_parts([plan], "too-small", ovb.OpenVINOCache(tmp_path), notes)
    assert parts == {} and attached(vae.encoder) is None
    (note,) = notes
    assert "VAE encoder" in note and "Couldn't get TorchScript" in note and "runs on torch" in note
    assert note in caplog.text
    assert (root.level, root.filters, root.handlers) == state
    logging.getLogger("engine.openvino_parts").warning("a later warning")
    assert "a later warning" in caplog.text


# --- idle parts ------------------------------------------------------------------------------------
def test_the_encoders_are_unloaded_for_the_steps_and_compiled_again_for_the_next_job(ov_engine, torch_engine):
    """Their repacked weights are not held through the steps and the decode (the memory target of
    issue 14); the next job's new prompt compiles the text encoder again and runs it on OpenVINO."""
    loaded = ov_engine.manager.current
    parts = {name: attached(module) for name, module in modules(loaded).items()}
    run(ov_engine, prompt="a harbour at noon")
    assert not parts["text_encoder"].compiled.loaded and not parts["vae_encoder"].compiled.loaded
    assert parts["vae_decoder"].compiled.loaded  # it runs after the steps
    before = calls(loaded)["text_encoder"]
    again = run(ov_engine, prompt="a harbour at night")
    assert calls(loaded)["text_encoder"] > before  # on OpenVINO again, not torch
    assert_close(again.images[0], run(torch_engine, prompt="a harbour at night").images[0])


def test_a_part_that_cannot_compile_again_runs_on_torch_and_the_job_finishes(ov_engine, torch_engine, monkeypatch,
                                                                             caplog):
    loaded = ov_engine.manager.current
    part = attached(loaded.pipe.text_encoder)
    part.unload()

    def entry_gone():
        raise RuntimeError("Cannot open model.xml")

    monkeypatch.setattr(part.compiled, "_compile", entry_gone)
    monkeypatch.setattr(part, "failed", False)
    before = calls(loaded)["text_encoder"]
    ov = run(ov_engine, prompt="a windmill in fog")  # a prompt no job encoded before
    assert calls(loaded)["text_encoder"] == before
    assert "could not compile the text encoder again" in caplog.text
    assert_close(ov.images[0], run(torch_engine, prompt="a windmill in fog").images[0])


def test_prompt_embeddings_agree_with_torch(ov_engine, torch_engine):
    prompt, negative = "a blue house BREAK by the sea", "ugly, " * 40
    ov = ov_engine.manager.current.encoder.encode_pair(prompt, negative)
    ref = torch_engine.manager.current.encoder.encode_pair(prompt, negative)
    for a, b in zip(ov, ref):
        assert a.embeds.shape == b.embeds.shape
        assert torch.allclose(a.embeds, b.embeds, atol=EMBED_ATOL, rtol=0), (a.embeds - b.embeds).abs().max()


def test_a_textual_inversion_runs_on_openvino(ov_engine, torch_engine, embedding):
    loaded = ov_engine.manager.current
    before = calls(loaded)["text_encoder"]
    ov = run(ov_engine, prompt=f"a photo of a {embedding}")
    assert calls(loaded)["text_encoder"] > before
    assert "TI hashes" in ov.infotexts[0]
    # Its vectors are "red dog"'s rows: the same conditioning as those words, and torch's image.
    words = loaded.encoder.encode("a photo of a red dog").embeds
    assert torch.allclose(loaded.encoder.encode(f"a photo of a {embedding}").embeds, words, atol=EMBED_ATOL, rtol=0)
    assert_close(ov.images[0], run(torch_engine, prompt=f"a photo of a {embedding}").images[0])


def test_a_chosen_vae_decodes_with_its_own_weights_on_openvino(ov_engine, torch_engine, ov_root):
    automatic = run(ov_engine)
    chosen = run(ov_engine, vae="other.safetensors")
    loaded = ov_engine.manager.current
    vae = loaded.pipe.vae
    assert vae is not loaded.own_vae and attached(vae.decoder).calls >= 1
    assert (entry(ov_root, loaded.vae_hash, "vae_decoder", vae, ("sample",)) / "model.xml").is_file()
    assert np.abs(pixels(chosen.images[0]) - pixels(automatic.images[0])).max() > 10  # not the own VAE's image
    assert_close(chosen.images[0], run(torch_engine, vae="other.safetensors").images[0])
    assert_close(run(ov_engine, vae="Automatic").images[0], automatic.images[0])


def test_a_lora_with_text_encoder_weights_runs_fused_into_the_openvino_encoder(ov_engine, torch_engine, models):
    lora = models / "Lora"
    if not lora.exists():
        lora.mkdir()
        save_file(kohya_lora(torch_engine.manager.current.pipe, 1), str(lora / "styled.safetensors"))
    loaded = ov_engine.manager.current
    before = calls(loaded)["text_encoder"]
    prompt = "a lora'd fox <lora:styled:1>"
    ov = run(ov_engine, prompt=prompt)
    fused = attached(loaded.pipe.text_encoder)._loras.value
    assert calls(loaded)["text_encoder"] == before and fused.calls >= 1  # the LoRA's own graph ran
    assert_close(ov.images[0], run(torch_engine, prompt=prompt).images[0])
    run(ov_engine, prompt="a plain fox")  # the LoRA is taken off: the checkpoint's graph again
    assert calls(loaded)["text_encoder"] > before


def test_sdxl_text_encoders_agree_with_torch(tmp_path):
    """Both SDXL encoders: the penultimate hidden states joined, and the second's pooled text_embeds."""
    pipe = tiny_sdxl_pipeline(0)
    encoder = PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                            device=torch.device("cpu"), dtype=torch.float32, cache_size=0)
    prompt = "a castle on a hill, " * 12
    ref = encoder.encode(prompt)
    notes: list[str] = []
    parts = ovp.prepare_parts(ovp.text_encoder_parts(pipe), "sdxl-test", ovb.OpenVINOCache(tmp_path), notes)
    assert set(parts) == {"text_encoder", "text_encoder_2"} and notes == []
    got = encoder.encode(prompt)
    assert all(p.calls == 1 for p in parts.values())  # one call per encoder: the chunks are its batch
    assert torch.allclose(got.embeds, ref.embeds, atol=EMBED_ATOL, rtol=0), (got.embeds - ref.embeds).abs().max()
    assert torch.allclose(got.pooled, ref.pooled, atol=EMBED_ATOL, rtol=0)


# --- a part that fails ----------------------------------------------------------------------------
def test_a_part_that_fails_stays_on_torch_with_a_note(models, ov_engine, ov_root, ov_cpu, torch_engine, tmp_path,
                                                      monkeypatch):
    # The other parts' entries are copied over, so only the decoder is converted (and fails).
    loaded = ov_engine.manager.current
    shutil.copytree(ov_root / "data" / "cache", tmp_path / "data" / "cache")
    shutil.rmtree(entry(tmp_path, loaded.hash, "vae_decoder", loaded.own_vae, ("sample",)))
    real = ovp.convert_vae_part

    def convert(net, channels):
        if channels == loaded.own_vae.config.latent_channels:
            raise RuntimeError("decoder converter exploded")
        return real(net, channels)

    monkeypatch.setattr(ovp, "convert_vae_part", convert)
    eng = engine_on(models, tmp_path, ov_cpu)
    current = eng.manager.current
    assert attached(current.pipe.vae.decoder) is None
    assert attached(current.pipe.vae.encoder) is not None and attached(current.pipe.text_encoder) is not None
    assert current.openvino is not None and current.plan.backend == "openvino"
    result = run(eng, vae="Automatic")
    assert any("VAE decoder" in n and "decoder converter exploded" in n and "runs on torch" in n for n in result.notes)
    assert "Backend: openvino" in result.infotexts[0]
    assert_close(result.images[0], run(torch_engine, vae="Automatic").images[0])


def test_clip_skip_2_stays_on_the_openvino_text_encoder_and_agrees(ov_engine, torch_engine):
    loaded = ov_engine.manager.current
    before = calls(loaded)["text_encoder"]
    ov = run(ov_engine, clip_skip=2)
    assert calls(loaded)["text_encoder"] > before  # its penultimate layer comes from the compiled part
    assert "Clip skip: 2," in ov.infotexts[0]
    assert_close(ov.images[0], run(torch_engine, clip_skip=2).images[0])


def test_clip_skip_further_back_than_the_compiled_part_gives_runs_that_encoder_on_torch(tmp_path):
    """The compiled text encoder hands back its last two layers; CLIP skip 3 asks for a third from
    the end, so that one encoding runs on torch (and agrees with a plain torch encoder)."""
    from types import SimpleNamespace

    from engine.tiny import tiny_text_encoder
    from engine.tokenizers import load_clip_tokenizer

    encoder, tokenizer = tiny_text_encoder(layers=4).eval(), load_clip_tokenizer("clip-l")
    reference = PromptEncoder([tokenizer], [tiny_text_encoder(layers=4).eval()], device="cpu", dtype=torch.float32)
    (plan,) = ovp.text_encoder_parts(SimpleNamespace(text_encoder=encoder))
    part = ovp.prepare_part(plan, "clip-skip-test", ovb.OpenVINOCache(tmp_path))
    compiled = PromptEncoder([tokenizer], [encoder], device="cpu", dtype=torch.float32)
    for clip_skip in (2, 3):
        compiled.set_clip_skip(clip_skip)
        reference.set_clip_skip(clip_skip)
        before = part.calls
        got = compiled.encode("a red barn").embeds
        assert (part.calls > before) == (clip_skip == 2)  # 3: not on the compiled part
        assert torch.allclose(got, reference.encode("a red barn").embeds, atol=1e-4)


def test_tiling_runs_on_torch_with_a_note_and_the_next_job_is_on_openvino_again(ov_engine, torch_engine):
    loaded = ov_engine.manager.current
    before = calls(loaded)["vae_decoder"]
    tiled = run(ov_engine, tiling=True)
    assert calls(loaded)["vae_decoder"] == before  # circular padding: decoded on torch
    assert any("tiling ran on torch" in note for note in tiled.notes)
    assert "Backend: openvino" not in tiled.infotexts[0] and "Tiling: True" in tiled.infotexts[0]
    assert_close(tiled.images[0], run(torch_engine, tiling=True).images[0])
    assert "Backend: openvino" in run(ov_engine).infotexts[0]
    assert calls(loaded)["vae_decoder"] == before + 1
