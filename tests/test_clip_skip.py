"""CLIP skip (A1111's "Clip skip", CLIP_stop_at_last_layers): the n-th layer from the end of an SD
1.x text encoder, through its final layer norm; per request, remembered per checkpoint, in the
infotext, the CLI and the API's override_settings. SDXL keeps its own layer, with a note."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import app
from engine.engine import Engine, EngineConfig
from engine.errors import RequestError
from engine.families import Family
from engine.infotext import parse_infotext
from engine.tiny import save_sd1_folder
from ldm_export import export_single_file
from tiny_models import tiny_pipeline

BASE = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": 64, "height": 64, "steps": 3, "seed": 5,
        "save_images": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-skip")
    save_sd1_folder(root / "models" / "Stable-diffusion" / "tiny-sd1")
    export_single_file(tiny_pipeline(Family.SDXL), Family.SDXL, root / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors")
    return Engine(EngineConfig(root / "models", root / "outputs", root / "data", watermark=False))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def generate(engine, model="tiny-sd1", **fields):
    return engine.generate(engine.make_request({**BASE, **fields}, model=model), model=model)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layer_norm(engine):
    loaded = engine.load_model("tiny-sd1")
    encoder, tokenizer = loaded.pipe.text_encoder, loaded.pipe.tokenizer
    ids = tokenizer("a lighthouse", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        expected = norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
        last = encoder(ids).last_hidden_state
    assert loaded.encoder.set_clip_skip(2)
    with torch.no_grad():
        encoded = loaded.encoder.encode("a lighthouse").embeds[0]
    loaded.encoder.set_clip_skip(1)
    assert torch.allclose(encoded.float(), expected[0].float(), atol=1e-6)
    assert not torch.allclose(encoded.float(), last[0].float(), atol=1e-3)


def test_clip_skip_changes_the_picture_and_is_recorded_as_a1111_writes_it(engine):
    plain, skipped = generate(engine), generate(engine, clip_skip=2)
    assert np.abs(pixels(plain) - pixels(skipped)).mean() > 0.5
    assert "Clip skip" not in plain.infotexts[0]  # A1111 leaves 1 out
    assert "Clip skip: 2," in skipped.infotexts[0]
    assert parse_infotext(skipped.infotexts[0])["Clip skip"] == "2"


def test_clip_skip_1_gives_the_pixels_of_no_clip_skip(engine):
    assert np.array_equal(pixels(generate(engine)), pixels(generate(engine, clip_skip=1)))


def test_a_remembered_clip_skip_is_the_checkpoints_default_and_survives_a_restart(engine):
    wanted = generate(engine, clip_skip=2)
    engine.set_model_clip_skip("tiny-sd1", 2)
    try:
        assert engine.model_clip_skip("tiny-sd1") == 2
        restarted = Engine(engine.config)
        assert restarted.model_clip_skip("tiny-sd1") == 2
        result = generate(restarted)
        assert "Clip skip: 2," in result.infotexts[0]
        assert np.array_equal(pixels(result), pixels(wanted))
        assert "Clip skip" not in generate(restarted, clip_skip=1).infotexts[0]  # the request wins
    finally:
        engine.set_model_clip_skip("tiny-sd1", 1)


@pytest.mark.parametrize("value", [0, 13, 1.5, "two", True])
def test_a_bad_clip_skip_is_refused_naming_the_field_and_range(engine, value):
    with pytest.raises(RequestError, match=r"clip_skip: must be .*between 1 and 12") as refused:
        engine.make_request({**BASE, "clip_skip": value}, model="tiny-sd1")
    assert "\n" not in str(refused.value)
    with pytest.raises(RequestError, match="clip_skip"):
        engine.set_model_clip_skip("tiny-sd1", value)


def test_sdxl_keeps_its_own_layer_with_a_note_as_a1111_does(engine):
    plain, skipped = generate(engine, "tiny-sdxl.safetensors"), generate(engine, "tiny-sdxl.safetensors", clip_skip=2)
    assert np.array_equal(pixels(plain), pixels(skipped))
    assert any("CLIP skip 2 does not apply to SDXL" in note for note in skipped.notes)


def test_the_cli_takes_clip_skip(engine, tmp_path, capsys):
    code = app.main(["txt2img", "--models-dir", str(engine.config.models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "a cat", "--width", "64", "--height", "64",
                     "--steps", "2", "--model", "tiny-sd1", "--clip-skip", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    (saved,) = (tmp_path / "out").rglob("*.png")
    with Image.open(saved) as image:
        assert "Clip skip: 2," in image.info["parameters"]


def test_the_cli_refuses_a_bad_clip_skip_in_one_line(engine, tmp_path, capsys):
    code = app.main(["txt2img", "--models-dir", str(engine.config.models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "a cat", "--model", "tiny-sd1",
                     "--clip-skip", "20", "--device", "cpu"])
    assert code != 0
    assert "clip_skip: must be between 1 and 12" in capsys.readouterr().err
