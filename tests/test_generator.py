"""Generation through the whole engine on a tiny random-weight SD 1.x model."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import CancelledError
from engine.jobs import Job

BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 48,
        "seed": 1234, "save_images": False}


def run(engine, job=None, **fields):
    request = engine.make_request({**BASE, **fields})
    return engine.generate(request, job)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_image_has_requested_size(sd_engine):
    result = run(sd_engine)
    assert result.images[0].size == (64, 48)


def test_same_request_gives_identical_pixels(sd_engine):
    a, b = run(sd_engine), run(sd_engine)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_different_seed_gives_different_image(sd_engine):
    a, b = run(sd_engine, seed=1), run(sd_engine, seed=2)
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_random_seed_is_reported_and_reproducible(sd_engine):
    a = run(sd_engine, seed=-1)
    b = run(sd_engine, seed=a.seeds[0])
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ SDE"])
def test_batch_image_k_equals_a_single_run_with_seed_plus_k(sd_engine, sampler):
    batch = run(sd_engine, seed=500, batch_size=2, batch_count=2, sampler=sampler)
    assert batch.seeds == (500, 501, 502, 503)
    alone = run(sd_engine, seed=503, sampler=sampler)
    # A batch of 2 may take another BLAS path than a batch of 1: allow one level of rounding.
    assert np.abs(pixels(batch.images[3]) - pixels(alone.images[0])).max() <= 1


def test_negative_prompt_changes_the_image(sd_engine):
    a, b = run(sd_engine, negative_prompt=""), run(sd_engine, negative_prompt="ugly, deformed, watermark")
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_long_weighted_prompt_runs_and_weight_matters(sd_engine):
    long_prompt = ", ".join(f"detail number {i}" for i in range(60))  # well over 75 tokens
    a = run(sd_engine, prompt=f"(a fox:1.5), {long_prompt}")
    b = run(sd_engine, prompt=f"a fox, {long_prompt}")
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def _init_image():
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    return Image.fromarray(gradient)


def test_img2img_strength_controls_distance_from_init(sd_engine):
    # A random VAE does not reproduce the init image, so compare against a barely-denoised run
    # (strength 0.05 is close to the VAE's round trip of the init image).
    init = _init_image()
    near = pixels(run(sd_engine, mode="img2img", init_image=init, denoising_strength=0.05, steps=20).images[0])
    distance = []
    for strength in (0.3, 0.9):
        result = run(sd_engine, mode="img2img", init_image=init, denoising_strength=strength, steps=20)
        distance.append(np.abs(pixels(result.images[0]) - near).mean())
    assert distance[0] < distance[1]


def test_img2img_strength_zero_returns_the_init_image(sd_engine):
    init = _init_image()
    result = run(sd_engine, mode="img2img", init_image=init, denoising_strength=0.0)
    assert np.abs(pixels(result.images[0]) - pixels(init)).max() <= 2


def halves(left, right, size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def test_img2img_feeds_the_init_images_pixels_to_the_vae_encoder(sd_engine):
    seen = []
    encoder = sd_engine.manager.current.pipe.vae.encoder
    handle = encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().float().clone()))
    try:
        run(sd_engine, mode="img2img", init_image=halves((200, 30, 30), (20, 40, 220)), denoising_strength=0.5)
    finally:
        handle.remove()
    assert seen, "img2img never encoded its init image"
    x = seen[0][0]  # [3, H, W] in [-1, 1]
    assert tuple(x.shape) == (3, 48, 64)
    left, right = x[:, :, :28].mean(dim=(1, 2)), x[:, :, 36:].mean(dim=(1, 2))
    expect = lambda rgb: torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1  # noqa: E731
    assert torch.allclose(left, expect((200, 30, 30)), atol=0.02)
    assert torch.allclose(right, expect((20, 40, 220)), atol=0.02)


def test_img2img_result_depends_on_the_init_image_and_less_so_at_high_strength(sd_engine):
    red, blue = halves((200, 30, 30), (20, 40, 220)), halves((20, 40, 220), (200, 30, 30))
    gap = {}
    for strength in (0.3, 0.9):
        a = pixels(run(sd_engine, mode="img2img", init_image=red, denoising_strength=strength, steps=10).images[0])
        b = pixels(run(sd_engine, mode="img2img", init_image=blue, denoising_strength=strength, steps=10).images[0])
        gap[strength] = np.abs(a - b).mean()
    assert gap[0.3] > 0
    assert gap[0.3] > gap[0.9]


def test_progress_reports_every_step_with_previews(sd_engine):
    updates = []
    run(sd_engine, Job(on_progress=updates.append, preview_every=1), steps=4)
    assert [u.step for u in updates] == [1, 2, 3, 4]
    assert updates[-1].fraction == 1.0
    assert all(u.preview is not None and u.preview.size == (32, 24) for u in updates)


def test_cancel_stops_the_job_and_saves_nothing(sd_engine):
    job = Job()
    job.on_progress = lambda update: job.cancel()
    before = set(sd_engine.config.outputs_dir.rglob("*.png"))
    with pytest.raises(CancelledError):
        run(sd_engine, job, steps=20, save_images=True)
    assert set(sd_engine.config.outputs_dir.rglob("*.png")) == before


def test_saved_png_carries_parameters_and_is_numbered(sd_engine):
    result = run(sd_engine, save_images=True, batch_size=2)
    names = [p.name for p in result.paths]
    assert names[0].endswith("-1234.png") and names[1].endswith("-1235.png")
    assert result.paths[0].parent.parent.name == "txt2img"
    info = sd_engine.png_info(result.paths[1])
    assert info.fields["Seed"] == "1235"
    assert info.fields["Negative prompt"] == "blurry"
    assert info.fields["Size-1"] == "64" and info.fields["Size-2"] == "48"
    assert info.fields["Model"] == "tiny-sd1"
    assert len(info.fields["Model hash"]) == 10


def test_img2img_infotext_has_denoising_strength(sd_engine):
    result = run(sd_engine, mode="img2img", init_image=_init_image(), denoising_strength=0.6)
    assert "Denoising strength: 0.6" in result.infotexts[0]


def test_watermark_is_embedded_on_large_enough_images(sd_engine):
    result = run(sd_engine, width=256, height=256, steps=1)
    assert sd_engine.watermarker.detect(result.images[0]) is True


# Out of memory and NaN VAE output: tests/test_faults.py (real hooks, the real `place`).


def test_bf16_unet_runs_inside_an_fp32_pipeline(sd_engine):
    """The CPU bf16 plan: UNet in bf16, text encoder and VAE in fp32, sampler arithmetic in fp32."""
    from engine.devices import replace
    loaded = sd_engine.manager.current
    original_plan = loaded.plan
    reference = run(sd_engine).images[0]
    sd_engine.manager.replan(loaded, replace(original_plan, unet_dtype=torch.bfloat16))
    try:
        assert loaded.pipe.unet.dtype == torch.bfloat16
        image = run(sd_engine).images[0]
    finally:
        sd_engine.manager.replan(loaded, original_plan)
        # Back in fp32 the UNet keeps bf16-rounded weights: load the checkpoint's own again for the
        # session's next tests (the OpenVINO tests compare against them).
        sd_engine.manager.unload()
        sd_engine.load_model("tiny-sd1")
    diff = np.abs(pixels(image) - pixels(reference))
    assert 0 < diff.mean() < 20  # close to fp32, not bit-identical


@pytest.mark.parametrize("cfg,unet_batch", [(7.0, 2), (1.0, 1)])
def test_cfg_scale_one_skips_the_unconditional_pass(sd_engine, cfg, unet_batch):
    """CFG 1 means the negative prompt cannot matter: the UNet runs once per step, not twice."""
    batches = []
    unet = sd_engine.manager.current.pipe.unet
    handle = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        run(sd_engine, cfg_scale=cfg, steps=2)
    finally:
        handle.remove()
    assert batches == [unet_batch, unet_batch]


def deep_unet_calls(engine, **fields):
    """Run a request; count how often the UNet's mid block really ran (a full step)."""
    calls = []
    inner = engine.manager.current.pipe.unet.mid_block.resnets[0]
    handle = inner.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        result = run(engine, **fields)
    finally:
        handle.remove()
    return result, len(calls)


def test_fast_speed_runs_one_full_unet_step_in_interval(sd_engine):
    interval = sd_engine.generator.reuse_interval
    exact, exact_calls = deep_unet_calls(sd_engine, steps=10)
    fast, fast_calls = deep_unet_calls(sd_engine, steps=10, speed="fast")
    assert (exact_calls, fast_calls) == (10, len(range(0, 10, interval)))  # full steps 0, interval, ...
    diff = np.abs(pixels(fast.images[0]) - pixels(exact.images[0]))
    assert 0 < diff.mean() < 10  # a slightly different image (2 levels of 255 here), not another picture
    assert "Speed: fast" in fast.infotexts[0] and "Speed" not in exact.infotexts[0]


def test_fast_speed_below_ten_steps_runs_exact_and_says_so(sd_engine):
    exact = run(sd_engine, steps=4)
    fast, calls = deep_unet_calls(sd_engine, steps=4, speed="fast")
    assert calls == 4
    assert np.array_equal(pixels(fast.images[0]), pixels(exact.images[0]))
    assert any("too few" in note for note in fast.notes)


def test_fast_img2img_counts_the_steps_it_really_runs(sd_engine):
    interval = sd_engine.generator.reuse_interval
    init = _init_image()
    _, half = deep_unet_calls(sd_engine, mode="img2img", init_image=init, steps=20, denoising_strength=0.5, speed="fast")
    _, short = deep_unet_calls(sd_engine, mode="img2img", init_image=init, steps=12, denoising_strength=0.5, speed="fast")
    assert half == len(range(0, 10, interval))  # 10 denoising steps: reuse applies
    assert short == 6   # 6 denoising steps: too few, every step in full


def test_the_reuse_interval_is_the_generators_to_set(sd_engine):
    generator = sd_engine.generator
    original = generator.reuse_interval
    generator.reuse_interval = 2
    try:
        _, calls = deep_unet_calls(sd_engine, steps=10, speed="fast")
    finally:
        generator.reuse_interval = original
    assert calls == 5  # full steps 0, 2, 4, 6, 8


def test_dpm_sde_gives_the_same_image_for_the_same_seed(sd_engine):
    """Its Brownian-tree noise is seeded from the image's seed, not torch's global RNG."""
    a = run(sd_engine, sampler="DPM++ SDE", seed=77)
    torch.manual_seed(12345)  # the global RNG moved on: must not matter
    b = run(sd_engine, sampler="DPM++ SDE", seed=77)
    c = run(sd_engine, sampler="DPM++ SDE", seed=78)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def cancel_after_step(job: Job, step: int):
    def on_progress(update):
        if update.step >= step:
            job.cancel()
    return on_progress


def test_an_interrupted_keep_partial_job_answers_with_the_picture_as_far_as_it_got(sd_engine):
    """A1111's API answer to interrupt: no further UNet step, no further batch, the partial picture."""
    unet = sd_engine.load_model().pipe.unet
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    job = Job(keep_partial=True)
    job.on_progress = cancel_after_step(job, 2)
    try:
        result = run(sd_engine, job, steps=10, batch_count=3, enable_hr=True, hr_upscaler="Lanczos")
    finally:
        handle.remove()
    assert len(calls) == 2  # two steps of ten, no hires pass, no second batch
    assert len(result.images) == 1 and result.images[0].size == (64, 48)  # the first pass's size
    assert any("interrupted" in note for note in result.notes)
    complete = run(sd_engine, steps=10)
    assert np.abs(pixels(result.images[0]) - pixels(complete.images[0])).mean() > 1  # not the finished picture


def test_an_interrupted_page_job_still_gives_no_picture(sd_engine):
    job = Job()
    job.on_progress = cancel_after_step(job, 2)
    with pytest.raises(CancelledError):
        run(sd_engine, job, steps=10)
