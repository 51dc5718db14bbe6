"""LoRA: <lora:NAME:WEIGHT> tags, files written here in the layouts users download (kohya/A1111 keys
and diffusers/peft keys) for the tiny SD 1.x model, loaded through the engine's real path."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.errors import EaselError, RequestError
from engine.infotext import values_from_params
from engine.lora import lora_hash
from engine.prompt_syntax import LoraTag, add_lora_tag, extract_loras
from tests.conftest import loaded_engine
from tests.tiny_models import models_linking_tiny_sd1

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 11, "save_images": False}
RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targets(module, suffixes):
    return {name: m for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)}


def _pair(linear, rank, generator, scale=0.3):
    down = torch.randn(rank, linear.in_features, generator=generator) * scale
    up = torch.randn(linear.out_features, rank, generator=generator) * scale
    return down, up


def kohya_lora(pipe, seed: int) -> dict:
    """kohya-ss / A1111 layout: lora_unet_<module_with_underscores>.lora_down/lora_up/alpha."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module, suffixes in (("lora_unet_", pipe.unet, UNET_TARGETS), ("lora_te_", pipe.text_encoder, TE_TARGETS)):
        for name, linear in _targets(module, suffixes).items():
            key = prefix + name.replace(".", "_")
            down, up = _pair(linear, RANK, g)
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    return state


def diffusers_lora(pipe, seed: int) -> dict:
    """diffusers / peft layout: unet.<module>.lora_A/lora_B.weight, text_encoder.<module>...."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, module, suffixes in (("unet.", pipe.unet, UNET_TARGETS), ("text_encoder.", pipe.text_encoder, TE_TARGETS)):
        for name, linear in _targets(module, suffixes).items():
            down, up = _pair(linear, RANK, g)
            state[f"{prefix}{name}.lora_A.weight"], state[f"{prefix}{name}.lora_B.weight"] = down, up
    return state


@pytest.fixture(scope="module")
def lora_engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    """An engine of its own (LoRAs change its model's modules), on the session's tiny SD 1.x model."""
    root = tmp_path_factory.mktemp("lora")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    engine = loaded_engine(models, root, plain_cpu)
    pipe = engine.manager.current.pipe
    lora, lyco = models / "Lora", models / "LyCORIS"
    lora.mkdir()
    lyco.mkdir()
    save_file(kohya_lora(pipe, 1), str(lora / "kohya-style.safetensors"))
    save_file(diffusers_lora(pipe, 2), str(lora / "diffusers-style.safetensors"))
    save_file(kohya_lora(pipe, 3), str(lyco / "second.safetensors"))
    save_file(kohya_lora(pipe, 4), str(lora / "lcm-lora-tiny.safetensors"))
    save_file(kohya_lora(pipe, 5), str(lora / "speedy.safetensors"), metadata={"modelspec.title": "LCM LoRA SD1.5"})
    for seed, name in enumerate(STEP_LORAS, 10):  # the releases' file names (random weights)
        save_file(kohya_lora(pipe, seed), str(lora / f"{name}.safetensors"))
    # Shaped for SDXL: a second text encoder and 2048-wide cross-attention.
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, RANK),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(RANK, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, RANK)},
              str(lora / "xl-only.safetensors"))
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(32, RANK),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b": torch.zeros(RANK, 64)},
              str(lyco / "loha-style.safetensors"))
    return engine


def image(engine, prompt: str, **fields) -> np.ndarray:
    result = engine.generate(engine.make_request({"prompt": prompt, **SMALL, **fields}))
    return np.asarray(result.images[0])


def weights_digest(pipe) -> dict[str, str]:
    """sha256 of every UNet and text encoder tensor, by key: equal digests mean the same weights."""
    return {f"{part}.{key}": hashlib.sha256(value.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
            for part in ("unet", "text_encoder") for key, value in getattr(pipe, part).state_dict().items()}


# --- the tag --------------------------------------------------------------------------------------

def test_lora_tags_are_taken_out_of_the_prompt_with_their_weights():
    text, tags = extract_loras("a cat <lora:ink:0.6>, <lora:paper>, <lyco:old:0.5:0.25>")
    assert text == "a cat , , "
    assert tags == (LoraTag("ink", 0.6, 0.6), LoraTag("paper", 1.0, 1.0), LoraTag("old", 0.5, 0.25))


@pytest.mark.parametrize("prompt", ["<lora:ink:strong>", "<lora:ink:1e9>", "<hypernet:ink:1>", "<lora:ink:1:2:3:4>"])
def test_a_tag_that_does_not_read_is_refused_naming_the_prompt(lora_engine, prompt):
    with pytest.raises(RequestError) as error:
        lora_engine.make_request({"prompt": f"a cat {prompt}", **SMALL})
    assert error.value.field == "prompt" and prompt in str(error.value)


def test_an_unknown_lora_is_refused_listing_the_available_ones(lora_engine):
    with pytest.raises(RequestError) as error:
        lora_engine.make_request({"prompt": "<lora:../../etc/passwd:1> a cat", **SMALL})
    assert "no such LoRA" in str(error.value) and "kohya-style" in str(error.value)


def test_the_picker_appends_the_tag():
    assert add_lora_tag("a cat, ", "ink") == "a cat, <lora:ink:1>"
    assert add_lora_tag("", "ink") == "<lora:ink:1>"


# --- loading through diffusers -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["kohya-style", "diffusers-style"])
def test_weight_zero_gives_the_base_image_exactly(lora_engine, name):
    base = image(lora_engine, "a red barn")
    assert np.array_equal(image(lora_engine, f"a red barn <lora:{name}:0>"), base)


@pytest.mark.parametrize("name", ["kohya-style", "diffusers-style"])
def test_weight_one_changes_the_image(lora_engine, name):
    base = image(lora_engine, "a red barn")
    changed = image(lora_engine, f"a red barn <lora:{name}:1>")
    assert np.abs(changed.astype(int) - base.astype(int)).mean() > 1.0


def test_two_loras_compose_their_changes(lora_engine):
    """Each targeted layer's output moves by the sum of both LoRAs' changes."""
    loaded = lora_engine.manager.current
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"

    def output(prompt):
        lora_engine.loras.apply(loaded, prompt)
        with torch.no_grad():
            return dict(loaded.pipe.unet.named_modules())[layer](x)

    base = output("")
    first, second = output("<lora:kohya-style:1>") - base, output("<lora:second:1>") - base
    both = output("<lora:kohya-style:1> <lora:second:1>") - base
    output("")
    assert first.abs().mean() > 1e-3 and second.abs().mean() > 1e-3
    assert torch.allclose(both, first + second, atol=1e-5)


def test_switching_loras_leaves_the_base_weights_as_loaded(lora_engine):
    pipe = lora_engine.manager.current.pipe
    before = weights_digest(pipe)
    image(lora_engine, "a red barn <lora:kohya-style:1>")
    image(lora_engine, "a red barn <lora:diffusers-style:0.5> <lora:second:1>")
    image(lora_engine, "a red barn")
    assert weights_digest(pipe) == before


def test_a_lora_for_another_family_is_refused_naming_both(lora_engine):
    with pytest.raises(EaselError) as error:
        image(lora_engine, "a red barn <lora:xl-only:1>")
    message = str(error.value)
    assert "xl-only" in message and "SDXL" in message and "SD 1.x" in message


def test_an_unsupported_lycoris_kind_is_refused_by_name(lora_engine):
    with pytest.raises(EaselError, match="loha-style is a LoHa network"):
        image(lora_engine, "a red barn <lora:loha-style:1>")


# --- LCM-LoRA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lcm-lora-tiny", "speedy"])  # by its name; by its metadata
def test_an_lcm_lora_switches_to_lcm_sampling(lora_engine, name):
    request = lora_engine.make_request({"prompt": f"a red barn <lora:{name}:1>", "width": 64, "height": 64})
    assert (request.sampler, request.steps, request.cfg_scale) == ("LCM", 4, 1.0)


def test_fields_given_win_over_the_lcm_lora_defaults(lora_engine):
    request = lora_engine.make_request({"prompt": "a red barn <lora:lcm-lora-tiny:1>", "steps": 6, **{
        k: v for k, v in SMALL.items() if k != "steps"}})
    assert (request.sampler, request.steps) == ("LCM", 6)


# File name -> the sampler, schedule, steps and CFG its authors publish (engine.lora.step_lora).
STEP_LORAS = {
    "Hyper-SD15-8steps-lora": ("Euler", "SGM Uniform", 8, 1.0),
    "Hyper-SD15-1step-lora": ("Euler", "SGM Uniform", 1, 1.0),
    "Hyper-SD15-8steps-CFG-lora": ("Euler", "SGM Uniform", 8, 5.0),
    "TCD-SD15-LoRA": ("LCM", "Automatic", 4, 1.0),
    "sdxl_lightning_4step_lora": None,  # SDXL only: refused on this SD 1.x model
    "dmd2_sdxl_4step_lora": None,
}


@pytest.mark.parametrize("name", [n for n, settings in STEP_LORAS.items() if settings])
def test_a_step_lora_gets_its_authors_settings_and_the_infotext_records_them(lora_engine, name):
    request = lora_engine.make_request({"prompt": f"a red barn <lora:{name}:1>", "width": 64, "height": 64,
                                        "save_images": False})
    sampler, schedule, steps, cfg = STEP_LORAS[name]
    assert (request.sampler, request.schedule_type, request.steps, request.cfg_scale) == (sampler, schedule, steps, cfg)
    info = lora_engine.generate(request).infotexts[0]
    assert f"Steps: {steps}, Sampler: {sampler}," in info and f"CFG scale: {cfg}" in info
    assert ("Schedule type: SGM Uniform" in info) == (schedule == "SGM Uniform")


@pytest.mark.parametrize("name,kind", [("sdxl_lightning_4step_lora", "SDXL-Lightning"), ("dmd2_sdxl_4step_lora", "DMD2")])
def test_a_step_lora_of_another_family_is_refused_naming_both(lora_engine, name, kind):
    with pytest.raises(RequestError, match=rf"prompt: <lora:{name}> is {kind}, a step LoRA released for SDXL; "
                                           r"this checkpoint is SD 1.x"):
        lora_engine.make_request({"prompt": f"a red barn <lora:{name}:1>"})


def test_an_ordinary_lora_keeps_the_defaults(lora_engine):
    request = lora_engine.make_request({"prompt": "a red barn <lora:kohya-style:1>", "width": 64, "height": 64})
    assert request.sampler != "LCM"


# --- infotext --------------------------------------------------------------------------------

def test_lora_hash_is_a1111s_hash_of_the_tensor_bytes(lora_engine, tmp_path):
    path = lora_engine.library.models_dir / "Lora" / "kohya-style.safetensors"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def test_lora_hashes_round_trip_through_png_info_and_send_to(lora_engine, tmp_path):
    prompt = "a red barn <lora:kohya-style:0.7> <lora:second:1>"
    result = lora_engine.generate(lora_engine.make_request({"prompt": prompt, **SMALL, "save_images": True}))
    lora_dir = lora_engine.library.models_dir
    expected = (f"kohya-style: {lora_hash(lora_dir / 'Lora' / 'kohya-style.safetensors')}, "
                f"second: {lora_hash(lora_dir / 'LyCORIS' / 'second.safetensors')}")
    assert f'Lora hashes: "{expected}"' in result.infotexts[0]
    fields = lora_engine.png_info(result.paths[0]).fields
    assert fields["Lora hashes"] == expected
    values = values_from_params(fields)
    assert values["prompt"] == prompt and "Lora hashes" not in values
    assert lora_engine.make_request(values).prompt == prompt  # send-to gives a request that runs again


def test_no_lora_no_lora_hashes(lora_engine):
    result = lora_engine.generate(lora_engine.make_request({"prompt": "a red barn", **SMALL}))
    assert "Lora hashes" not in result.infotexts[0]


# --- the page ----------------------------------------------------------------------------------

def test_the_pages_lora_picker_inserts_the_tag_and_lcm_settings(lora_engine):
    from ui.app_ui import create_ui

    page = create_ui(lora_engine)
    picker = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "txt2img-lora")
    assert ("kohya-style", "kohya-style") in picker.choices and ("second", "second") in picker.choices
    add = next(f for f in page.fns.values() if f.api_name == "txt2img_add_lora")
    prompt, sampler, _schedule, steps, cfg = add.fn("a red barn,", "lcm-lora-tiny", "tiny-sd1")
    assert prompt == "a red barn, <lora:lcm-lora-tiny:1>"
    assert (sampler["value"], steps["value"], cfg["value"]) == ("LCM", 4, 1.0)
    prompt, sampler, *_ = add.fn("a red barn", "kohya-style", "tiny-sd1")
    assert prompt == "a red barn <lora:kohya-style:1>" and "value" not in sampler


def test_the_models_tab_lists_lora_files_and_why_one_cannot_be_used(lora_engine, tmp_path):
    from ui.app_ui import extra_rows

    broken = lora_engine.library.models_dir / "Lora" / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    try:
        rows = {row[1]: row for row in extra_rows(lora_engine)}
    finally:
        broken.unlink()
    assert rows["Lora/kohya-style.safetensors"][0] == "LoRA" and rows["Lora/kohya-style.safetensors"][2] > 0
    assert rows["LyCORIS/second.safetensors"][3] == ""
    assert "broken.safetensors" in rows["Lora/broken.safetensors"][3]
