"""The tiled SD x4 upscaler (engine/sd_upscaler.py) on the tiny random-weight x4 upscaler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import CancelledError, RequestError
from engine.jobs import Job
from engine.sd_upscaler import SCALE, plan_tiles, upscale_sd_x4
from tests.tiny_models import tiny_upscaler_pipeline

STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    return tiny_upscaler_pipeline(0)


def smooth_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    rgb = np.stack([120 + 80 * np.sin(3 * x) + 0 * y, 100 + 60 * np.cos(2 * y) + 0 * x, 80 + 70 * x * y], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def ramp_image(width: int, height: int) -> Image.Image:
    """Brightness rising left to right (green falling): neighbouring tiles see different statistics."""
    ramp = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([ramp, 255 - ramp, ramp], -1).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def count_unet_calls(pipe, after=None):
    calls = []

    def hook(module, args):
        calls.append(1)
        if after is not None:
            after(len(calls))

    return calls, pipe.unet.register_forward_pre_hook(hook)


# --- plan_tiles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,tile,overlap", [
    (512, 512, 128, 16), (300, 170, 128, 16), (40, 24, 16, 4), (129, 128, 128, 16), (10, 7, 128, 16),
    (97, 33, 32, 0), (1, 1, 8, 0),
])
def test_plan_tiles_cover_every_pixel_with_the_overlap(width, height, tile, overlap):
    boxes = plan_tiles(width, height, tile, overlap)
    covered = np.zeros((height, width), dtype=int)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left <= max(tile, 0) or right - left == width
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1  # every pixel, nothing outside (the asserts above)
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert len(boxes) == len(xs) * len(ys)  # a grid
    assert len({b[2] - b[0] for b in boxes}) == 1 and len({b[3] - b[1] for b in boxes}) == 1  # one tile size
    for starts, size in ((xs, boxes[0][2] - boxes[0][0]), (ys, boxes[0][3] - boxes[0][1])):
        shared = [a + size - b for a, b in zip(starts, starts[1:])]
        assert all(s >= overlap for s in shared)
        assert max(shared, default=0) - min(shared, default=0) <= 1  # spread evenly, none squeezed at the edge


def test_plan_tiles_count_for_512():
    # 512 px in tiles of at most 128 overlapping by 16: 5 tiles of 116 a side -> 5 x 5
    assert len(plan_tiles(512, 512, 128, 16)) == 25
    assert {b[2] - b[0] for b in plan_tiles(512, 512, 128, 16)} == {116}
    assert len(plan_tiles(512, 512, 128, 0)) == 16


@pytest.mark.parametrize("length, tile, overlap, starts, size", [
    (512, 256, 16, [0, 165, 330], 182),   # packed from the start it was 0, 240, 256: 2.25x the pixels
    (512, 512, 16, [0], 512),
    (120, 64, 8, [0, 56], 64),
    (100, 0, 16, [0], 100),               # 0: no tiling
    (129, 128, 16, [0, 56], 73),          # two small tiles, not two of 128 sharing 127 px
])
def test_tile_span_uses_the_fewest_even_tiles(length, tile, overlap, starts, size):
    from engine.tiling import tile_span

    assert tile_span(length, tile, overlap) == (starts, size)


@pytest.mark.parametrize("tile,overlap,field", [(4, 0, "tile"), (32, 16, "overlap"), (32, -1, "overlap")])
def test_plan_tiles_refuses_bad_sizes(tile, overlap, field):
    with pytest.raises(RequestError) as e:
        plan_tiles(64, 64, tile, overlap)
    assert e.value.field == field


# --- the upscaler ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size,tile", [((40, 22), 16), ((13, 9), 128)])
def test_output_is_exactly_four_times_the_input(pipe, size, tile):
    out = upscale_sd_x4(pipe, smooth_image(*size), steps=STEPS, seed=1, tile=tile, overlap=4)
    assert out.size == (size[0] * SCALE, size[1] * SCALE)
    assert out.mode == "RGB"


def test_same_seed_same_output_other_seed_differs(pipe):
    image = smooth_image(28, 16)
    a = upscale_sd_x4(pipe, image, steps=STEPS, seed=3, tile=16, overlap=4)
    b = upscale_sd_x4(pipe, image, steps=STEPS, seed=3, tile=16, overlap=4)
    c = upscale_sd_x4(pipe, image, steps=STEPS, seed=4, tile=16, overlap=4)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 10


def test_tiled_agrees_with_one_tile_away_from_seams(pipe):
    """Tiles see the same noise as the whole image (one image-sized draw per seed, sliced), so away
    from the overlaps tiled and one-tile outputs differ only through the model's view of its
    context (the random UNet's group norms and attention see the whole tile). Tolerance: mean
    |difference| under 20 of 255 and under half of what another seed changes (measured: 15 vs 42)."""
    width, height, tile, overlap = 40, 24, 16, 4
    image = smooth_image(width, height)
    tiled = pixels(upscale_sd_x4(pipe, image, steps=STEPS, seed=5, tile=tile, overlap=overlap))
    whole = pixels(upscale_sd_x4(pipe, image, steps=STEPS, seed=5, tile=128, overlap=overlap))
    other = pixels(upscale_sd_x4(pipe, image, steps=STEPS, seed=6, tile=128, overlap=overlap))
    away = np.ones((height * SCALE, width * SCALE), dtype=bool)
    boxes = plan_tiles(width, height, tile, overlap)
    for left, top, right, bottom in boxes:  # mask out every overlap (plus a margin) in output pixels
        if left > 0:
            away[:, (left - 2) * SCALE:(left + overlap + 2) * SCALE] = False
        if top > 0:
            away[(top - 2) * SCALE:(top + overlap + 2) * SCALE, :] = False
    assert away.sum() > 0.2 * away.size
    diff = np.abs(tiled - whole)[away].mean()
    seed_diff = np.abs(whole - other)[away].mean()
    assert diff < 20 and diff < seed_diff / 2, (diff, seed_diff)


def border_steps(image: np.ndarray) -> np.ndarray:
    """For each pair of neighbouring columns: the mean (signed, over the whole column) step from one
    to the next, absolute, averaged over RGB. A seam is a line: a step the same along the whole
    border, which this average keeps, while the random model's pixel texture averages out."""
    return np.abs(np.diff(image, axis=1).mean(axis=0)).mean(-1)


def test_no_seam_between_tiles(pipe):
    """Across the tile borders the step is about the size of the steps inside tiles (averaged over
    three seeds, so the random model's texture averages out further). Measured with tiles at 0, 21
    and 42: 1.01x the largest step inside; pasting the tiles without blending (each tile's weight a
    constant, later tiles on top) gives 1.14x, the step at each tile's left edge. Deterministic
    (fixed seeds and model), so the bound sits between the two."""
    width, height, tile, overlap = 72, 32, 32, 8
    boxes = plan_tiles(width, height, tile, overlap)
    assert len(boxes) == 3  # one row of three
    steps = np.mean([border_steps(pixels(upscale_sd_x4(pipe, ramp_image(width, height), steps=STEPS, seed=seed,
                                                       tile=tile, overlap=overlap)))
                     for seed in (1, 2, 3)], axis=0)
    in_overlap = set()
    for left, _, right, _ in boxes:  # every column border in an overlap (in output pixels)
        for other_left, _, _, _ in boxes:
            if left < other_left < right:
                in_overlap.update(range(other_left * SCALE - 1, right * SCALE))
    margin = 2 * SCALE  # the image's own outer edge is not a tile border
    inside = [s for i, s in enumerate(steps) if i not in in_overlap and margin <= i < len(steps) - margin]
    across = [steps[i] for i in sorted(in_overlap)]
    assert max(across) <= 1.07 * max(inside), (max(across), max(inside))


def test_progress_reports_every_tile(pipe):
    job_updates, tile_updates = [], []
    job = Job(on_progress=job_updates.append)
    upscale_sd_x4(pipe, smooth_image(40, 20), steps=STEPS, seed=1, tile=16, overlap=4, job=job,
                  on_tile=tile_updates.append)
    total = len(plan_tiles(40, 20, 16, 4))
    assert total == 6
    assert [u.step for u in tile_updates] == list(range(1, total + 1))
    assert all(u.steps == total and u.batch == 0 and u.batches == 1 for u in tile_updates)
    assert job_updates == tile_updates
    elapsed = [u.elapsed for u in tile_updates]
    assert elapsed == sorted(elapsed)
    first = tile_updates[0]
    assert first.eta == pytest.approx(first.elapsed * (total - 1))  # the mean tile time x tiles left
    assert tile_updates[-1].fraction == 1 and tile_updates[-1].eta == 0


def test_cancel_between_tiles_stops(pipe):
    job = Job()
    updates = []

    def on_tile(update):
        updates.append(update)
        job.cancel()

    calls, handle = count_unet_calls(pipe)
    try:
        with pytest.raises(CancelledError):
            upscale_sd_x4(pipe, smooth_image(40, 20), steps=STEPS, seed=1, tile=16, overlap=4, job=job,
                          on_tile=on_tile)
    finally:
        handle.remove()
    assert len(updates) == 1
    assert len(calls) == STEPS  # the first tile's steps, none of the second's


def test_cancel_between_denoising_steps(pipe):
    job = Job()
    calls, handle = count_unet_calls(pipe, after=lambda n: job.cancel())
    try:
        with pytest.raises(CancelledError):
            upscale_sd_x4(pipe, smooth_image(20, 20), steps=5, seed=1, tile=16, overlap=4, job=job)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_cancelled_before_start_runs_nothing(pipe):
    job = Job()
    job.cancel()
    calls, handle = count_unet_calls(pipe)
    try:
        with pytest.raises(CancelledError):
            upscale_sd_x4(pipe, smooth_image(20, 20), steps=STEPS, job=job)
    finally:
        handle.remove()
    assert calls == []


def test_vae_tiling_is_on_during_the_run_and_restored(pipe):
    seen = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(pipe.vae.use_tiling))
    try:
        pipe.vae.disable_tiling()
        upscale_sd_x4(pipe, smooth_image(12, 12), steps=1, seed=1)
    finally:
        handle.remove()
    assert seen and all(seen)
    assert pipe.vae.use_tiling is False


def test_prompt_encoder_matches_the_pipelines_own_encoding(pipe):
    from engine.prompts import PromptEncoder

    encoder = PromptEncoder([pipe.tokenizer], [pipe.text_encoder], device=torch.device("cpu"), dtype=torch.float32)
    kwargs = dict(prompt="a red barn", negative_prompt="blurry", steps=STEPS, seed=2, tile=16, overlap=4)
    image = smooth_image(20, 16)
    with_encoder = upscale_sd_x4(pipe, image, encoder=encoder, **kwargs)
    without = upscale_sd_x4(pipe, image, **kwargs)
    assert np.abs(pixels(with_encoder) - pixels(without)).max() <= 1


@pytest.mark.parametrize("kwargs,field", [({"noise_level": 351}, "noise_level"), ({"noise_level": -1}, "noise_level"),
                                          ({"steps": 0}, "steps")])
def test_bad_arguments_name_the_field(pipe, kwargs, field):
    with pytest.raises(RequestError) as e:
        upscale_sd_x4(pipe, smooth_image(12, 12), **kwargs)
    assert e.value.field == field
