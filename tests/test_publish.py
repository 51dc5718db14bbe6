"""The publishing step on its own (engine/publish.py): watermark on the final pixels, the infotext
both ways, atomic saves, grids, and a failed save that keeps the images."""
from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

import engine.outputs as outputs
from engine.infotext import build_infotext, params_from_values, parse_infotext, read_infotext, values_from_params
from engine.outputs import OutputSettings
from engine.publish import Publisher
from engine.request import GenerationRequest
from engine.watermark import Watermarker


@pytest.fixture(scope="module")
def watermarker():
    return Watermarker()


def picture(side: int = 256, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, side, dtype=np.float32)
    pixels = (base[None, :, None] * 0.6 + base[:, None, None] * 0.3 + rng.normal(0, 12, (side, side, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_the_mark_is_put_on_the_image_as_published(tmp_path, watermarker):
    """An image resized before publishing (an upscale, a hires pass) carries the mark, because the
    mark goes on the final pixels."""
    upscaled = picture(256).resize((512, 512), Image.LANCZOS)
    publication = Publisher(OutputSettings(tmp_path, True), watermarker).begin("txt2img")
    shown = publication.add(upscaled, 5, "a cat\nSteps: 1, Seed: 5, Size: 512x512")
    published = publication.finish()
    assert watermarker.detect(shown) is True
    with Image.open(published.paths[0]) as saved:
        assert watermarker.detect(saved.convert("RGB")) is True


def test_a_mark_put_on_before_resizing_does_not_survive(watermarker):
    """Why the order matters: the dwtDct mark is lost when the marked image is resized."""
    marked_then_resized = watermarker.embed(picture(256)).resize((512, 512), Image.LANCZOS)
    assert watermarker.detect(marked_then_resized) is not True


def test_watermark_off_publishes_the_pixels_unchanged(tmp_path, watermarker):
    image = picture(256)
    publication = Publisher(OutputSettings(tmp_path, False), watermarker).begin("txt2img")
    shown = publication.add(image, 1, "x\nSteps: 1, Seed: 1, Size: 256x256")
    assert np.array_equal(np.asarray(shown), np.asarray(image))
    assert watermarker.detect(shown) is False


def test_saved_files_carry_their_infotext_and_a_grid_is_made(tmp_path, watermarker):
    publication = Publisher(OutputSettings(tmp_path, False), watermarker).begin("img2img")
    infotexts = [f"a cat\nSteps: 2, Seed: {s}, Size: 64x64" for s in (7, 8)]
    for seed, info in zip((7, 8), infotexts):
        publication.add(picture(64, seed), seed, info)
    published = publication.finish(grid=True)
    assert [p.name for p in published.paths] == ["00001-7.png", "00002-8.png"]
    assert [read_infotext(p) for p in published.paths] == infotexts
    assert published.grid_path is not None and published.grid_path.parent == published.paths[0].parent
    with Image.open(published.grid_path) as grid:
        assert grid.size == (128, 64)
    assert published.save_error is None
    assert not [p for p in published.paths[0].parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_publishing_without_saving_writes_nothing(tmp_path, watermarker):
    publication = Publisher(OutputSettings(tmp_path / "out", True), watermarker).begin("txt2img", save=False)
    publication.add(picture(64), 1, "x")
    published = publication.finish(grid=True)
    assert published.paths == () and published.grid_path is None and len(published.images) == 1
    assert not (tmp_path / "out").exists()


def test_a_failed_save_keeps_the_images_and_says_why(tmp_path, watermarker, monkeypatch):
    real_os = outputs.os

    class DiskFullAfterOneFile:
        """outputs' view of `os`: the first file's write succeeds, every later one finds the disk full."""
        writes = 0

        def __getattr__(self, name):
            return getattr(real_os, name)

        def write(self, fd, data):
            DiskFullAfterOneFile.writes += 1
            if DiskFullAfterOneFile.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_os.write(fd, data)

    monkeypatch.setattr(outputs, "os", DiskFullAfterOneFile())
    publication = Publisher(OutputSettings(tmp_path, False), watermarker).begin("txt2img")
    for seed in (1, 2, 3):
        publication.add(picture(64, seed), seed, "x")
    published = publication.finish(grid=True)
    assert len(published.images) == 3 and len(published.paths) == 1 and published.grid_path is None
    assert published.save_error.startswith("2 of 3 images not saved") and "No space left" in published.save_error
    assert sorted(p.name for p in published.paths[0].parent.iterdir()) == ["00001-1.png"]


def test_the_infotext_table_reads_back_what_it_wrote():
    request = GenerationRequest(mode="img2img", prompt="a (red:1.2) fox", negative_prompt="fog", steps=12,
                                sampler="DPM++ 2M", schedule_type="Karras", cfg_scale=6.5, width=192, height=128,
                                denoising_strength=0.4, speed="fast", init_image=picture(64))
    values = {name: getattr(request, name) for name in GenerationRequest.field_names()}
    params = params_from_values({**values, "seed": 99}, model_hash="0123456789", model="m", version="easel-test")
    read = values_from_params(parse_infotext(build_infotext(request.prompt, request.negative_prompt, params)))
    assert read == {"prompt": "a (red:1.2) fox", "negative_prompt": "fog", "steps": 12, "sampler": "DPM++ 2M",
                    "schedule_type": "Karras", "cfg_scale": 6.5, "seed": 99, "width": 192, "height": 128,
                    "denoising_strength": 0.4, "speed": "fast", "enable_hr": False, "clip_skip": 1, "tiling": False, "restore_faces": False}


def test_unset_values_are_left_out_as_a1111_does_and_read_back_as_unset():
    values = {name: getattr(GenerationRequest(prompt="x"), name) for name in GenerationRequest.field_names()}
    params = params_from_values({**values, "seed": 1}, model_hash=None, model=None, version="v")
    text = build_infotext("x", "", params)
    assert "Schedule type" not in text and "Speed" not in text and "Denoising strength" not in text
    read = values_from_params(parse_infotext(text))
    assert (read["schedule_type"], read["speed"], read["negative_prompt"]) == ("Automatic", "exact", "")


def test_hires_fields_are_written_only_when_hires_is_on_and_read_back():
    request = GenerationRequest(prompt="x", enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                hr_second_pass_steps=6, denoising_strength=0.55)
    values = {name: getattr(request, name) for name in GenerationRequest.field_names()}
    text = build_infotext("x", "", params_from_values({**values, "seed": 3}, model_hash=None, model=None, version="v"))
    assert "Hires upscale: 1.5, Hires steps: 6, Hires upscaler: Lanczos" in text and "Denoising strength: 0.55" in text
    read = values_from_params(parse_infotext(text))
    assert (read["enable_hr"], read["hr_scale"], read["hr_upscaler"], read["hr_second_pass_steps"],
            read["denoising_strength"]) == (True, 1.5, "Lanczos", 6, 0.55)
    off = {**values, "enable_hr": False}
    assert "Hires" not in build_infotext("x", "", params_from_values({**off, "seed": 3}, model_hash=None, model=None,
                                                                    version="v"))
