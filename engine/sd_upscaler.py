"""The Stable Diffusion x4 upscaler, run in overlapping tiles of the input so any image fits in memory.

- `plan_tiles`: boxes of at most `tile` input pixels a side covering the image exactly; neighbours
  overlap by `overlap` pixels (the last row/column is aligned to the image edge, so it may overlap more).
- Each tile goes through the pipeline's own parts (text embeddings once, `low_res_scheduler` noise
  augmentation, the denoising loop on `pipe.unet` / `pipe.scheduler`, `pipe.vae` decode with VAE
  tiling on), diffusers' `StableDiffusionUpscalePipeline.__call__` step for step. The loop is ours so
  that the noise comes from one image-sized draw per seed, sliced per tile: overlapping tiles see the
  same noise there, and a seed gives the same output on any device and for any tile size.
- Blending: each 4x tile is weighted by a linear feather across its actual overlap with each
  neighbour (ends at 1/(2n) and 1 - 1/(2n), never 0); the weighted sum is divided by the summed
  weights, so tiles meet without a seam.
- Memory: only one tile is in the UNet/VAE at a time, so the model's working memory depends on the
  tile size alone (the tile's latent is tile x tile, CFG batch 2; its decode runs in the VAE's own
  tiles). What grows with the image: the noise (7 float32 per input pixel: 28 B) and the
  accumulation buffers (RGB + weight float32 per output pixel: 16 B, i.e. 256 B per input pixel),
  plus transient float copies of the RGB buffer (12 B per output pixel) while the result is made:
  512 -> 2048 is ~75 MB beside the tile's cost. bench/x4_upscale.py measures a tile's cost.
- Progress per tile (step = tiles done, steps = tiles), so `ProgressUpdate.eta` is the mean tile
  time times the tiles left; cancel between tiles and between denoising steps.

Device and dtypes are where the manager's `DevicePlan` placed the pipeline's parts; nothing here
decides one. No gradio.
"""
from __future__ import annotations

import inspect
import time
from typing import Callable

import torch
from PIL import Image

from engine.errors import RequestError
from engine.jobs import Job, ProgressUpdate, check_cancelled
from engine.tiling import tile_span

SCALE = 4
DEFAULT_TILE = 128  # input pixels: the model's native input size
DEFAULT_OVERLAP = 16
DEFAULT_STEPS = 20  # diffusers' default is 75; 20 is the studio's usual step count
DEFAULT_GUIDANCE = 9.0  # diffusers' StableDiffusionUpscalePipeline default
DEFAULT_NOISE_LEVEL = 20  # diffusers' default; at most the pipeline's max_noise_level (350)

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), input pixels


def plan_tiles(width: int, height: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> list[Box]:
    """Row-major boxes covering a `width` x `height` image exactly (see `engine.tiling.tile_span`)."""
    if width < 1 or height < 1:
        raise RequestError("image", f"must be at least 1x1 pixels, got {width}x{height}")
    if tile < 8:
        raise RequestError("tile", f"must be at least 8 input pixels, got {tile}")
    if not 0 <= overlap < tile // 2:
        raise RequestError("overlap", f"must be from 0 to under half the tile ({tile // 2}), got {overlap}")
    (xs, tw), (ys, th) = tile_span(width, tile, overlap), tile_span(height, tile, overlap)
    return [(x, y, x + tw, y + th) for y in ys for x in xs]


def _ramp(n: int, before: int, after: int) -> torch.Tensor:
    """Weights along one axis of a tile's output of `n` pixels: a linear rise over the `before`
    pixels it shares with the previous tile, a fall over the `after` pixels shared with the next."""
    w = torch.ones(n)
    if before > 0:
        w[:before] = (torch.arange(before) + 0.5) / before
    if after > 0:
        w[n - after:] = torch.minimum(w[n - after:], (torch.arange(after, 0, -1) - 0.5) / after)
    return w


def _feather(box: Box, boxes: list[Box], scale: int) -> torch.Tensor:
    """[h, w] weights of one tile's 4x output: feathered across its actual overlap with each neighbour."""
    left, top, right, bottom = box
    before_x = max((r - left for l, t, r, b in boxes if t == top and l < left < r), default=0)
    after_x = max((right - l for l, t, r, b in boxes if t == top and l < right < r and l > left), default=0)
    before_y = max((b - top for l, t, r, b in boxes if l == left and t < top < b), default=0)
    after_y = max((bottom - t for l, t, r, b in boxes if l == left and t < bottom < b and t > top), default=0)
    wx = _ramp((right - left) * scale, before_x * scale, after_x * scale)
    wy = _ramp((bottom - top) * scale, before_y * scale, after_y * scale)
    return wy[:, None] * wx[None, :]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1], as the pipeline's image processor gives."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    t = data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0
    return t.unsqueeze(0)


def _to_image(t: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image."""
    pixels = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes())


def _encode(pipe, prompt: str, negative_prompt: str, encoder, guided: bool) -> torch.Tensor:
    """[2 or 1, tokens, D] text embeddings (negative first), A1111 syntax when `encoder` is given."""
    if encoder is not None:
        pos, neg = encoder.encode_pair(prompt, negative_prompt)
        pos, neg = pos.embeds, neg.embeds
    else:
        pos, neg = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, guided, negative_prompt)
    return torch.cat([neg, pos]) if guided else pos


@torch.inference_mode()
def _denoise_tile(pipe, low: torch.Tensor, latents: torch.Tensor, image_noise: torch.Tensor, embeds: torch.Tensor,
                  *, steps: int, guidance: float, noise_level: int, generator: torch.Generator,
                  job: Job | None) -> torch.Tensor:
    """One tile: [1, 3, h, w] in [-1, 1] -> [3, 4h, 4w] in [-1, 1] (float32, CPU)."""
    unet, scheduler, vae = pipe.unet, pipe.scheduler, pipe.vae
    device, dtype = pipe._execution_device, unet.dtype
    guided = guidance > 1.0
    level = torch.tensor([noise_level], dtype=torch.long, device=device)
    image = pipe.low_res_scheduler.add_noise(low.to(device), image_noise.to(device), level).to(dtype)
    image = torch.cat([image] * (2 if guided else 1))
    levels = torch.cat([level] * image.shape[0])
    scheduler.set_timesteps(steps, device=device)
    latents = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
    embeds = embeds.to(device=device, dtype=dtype)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        if job is not None:
            check_cancelled(job)
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, t), image], dim=1)
        pred = unet(model_input, t, encoder_hidden_states=embeds, class_labels=levels, return_dict=False)[0]
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
    if job is not None:
        check_cancelled(job)
    latents = latents.to(device=device, dtype=vae.dtype)
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return decoded[0].float().cpu()


def upscale_sd_x4(
    pipe,
    image: Image.Image,
    *,
    prompt: str = "",
    negative_prompt: str = "",
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    seed: int = 0,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    job: Job | None = None,
    on_tile: Callable[[ProgressUpdate], None] | None = None,
    encoder=None,
) -> Image.Image:
    """`image` upscaled 4x by a `StableDiffusionUpscalePipeline`, tile by tile (see the module doc).

    `encoder`: the loaded model's `engine.prompts.PromptEncoder` (long, weighted prompts); without
    it the pipeline's own `encode_prompt` reads the prompts. Progress after each tile goes to
    `on_tile` and `job.on_progress`; a cancelled job raises `CancelledError` between tiles or steps.
    """
    if steps < 1:
        raise RequestError("steps", f"must be at least 1, got {steps}")
    max_level = int(pipe.config.max_noise_level)
    if not 0 <= noise_level <= max_level:
        raise RequestError("noise_level", f"must be from 0 to {max_level}, got {noise_level}")
    width, height = image.size
    boxes = plan_tiles(width, height, tile, overlap)
    start = time.monotonic()
    if job is not None:
        check_cancelled(job)

    cpu = torch.Generator("cpu").manual_seed(seed)
    channels = pipe.vae.config.latent_channels
    latent_noise = torch.randn((1, channels, height, width), generator=cpu)
    image_noise = torch.randn((1, 3, height, width), generator=cpu)
    low = _to_tensor(image)
    out = torch.zeros(3, height * SCALE, width * SCALE)
    total = torch.zeros(height * SCALE, width * SCALE)

    guided = guidance > 1.0
    with torch.inference_mode():
        embeds = _encode(pipe, prompt, negative_prompt, encoder, guided)
    was_tiling = getattr(pipe.vae, "use_tiling", False)
    pipe.vae.enable_tiling()
    try:
        for index, box in enumerate(boxes):
            if job is not None:
                check_cancelled(job)
            left, top, right, bottom = box
            crop = (slice(None), slice(None), slice(top, bottom), slice(left, right))
            up = _denoise_tile(pipe, low[crop], latent_noise[crop], image_noise[crop], embeds, steps=steps,
                               guidance=guidance, noise_level=noise_level,
                               generator=torch.Generator("cpu").manual_seed(seed + 1 + index), job=job)
            if up.shape[-2:] != ((bottom - top) * SCALE, (right - left) * SCALE):
                raise ValueError(f"the pipeline's VAE gave {tuple(up.shape[-2:])} for a "
                                 f"{bottom - top}x{right - left} tile; not a x4 upscaler")
            weight = _feather(box, boxes, SCALE)
            region = (slice(top * SCALE, bottom * SCALE), slice(left * SCALE, right * SCALE))
            out[(slice(None), *region)] += up * weight
            total[region] += weight
            update = ProgressUpdate(step=index + 1, steps=len(boxes), batch=0, batches=1,
                                    elapsed=time.monotonic() - start)
            if on_tile is not None:
                on_tile(update)
            if job is not None and job.on_progress is not None:
                job.on_progress(update)
    finally:
        if not was_tiling:
            pipe.vae.disable_tiling()
    return _to_image(out / total)
