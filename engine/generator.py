"""Generator: runs one validated request on the loaded model.

Seeds: initial noise is drawn on the CPU from one torch.Generator per image, seeded seed+k for
image k, so a seed gives the same image on any device and any image of a batch can be re-made
alone. Progress, live previews and cancel go through the pipeline's step-end callback.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps

from engine import __version__
from engine.errors import CancelledError, EaselError
from engine.families import Family
from engine.feature_cache import INTERVAL, MIN_STEPS, FeatureReuse
from engine.infotext import build_infotext
from engine.manager import LoadedModel, ModelManager
from engine.outputs import SaveError, make_grid, save_grid, save_png
from engine.preview import latents_to_preview
from engine.request import MAX_SEED, GenerationRequest
from engine.samplers import make_scheduler
from engine.watermark import Watermarker


@dataclass(frozen=True)
class ProgressUpdate:
    step: int            # steps done in the current batch
    steps: int           # steps per batch
    batch: int           # 0-based index of the current batch
    batches: int
    elapsed: float       # seconds since the job started
    preview: Image.Image | None = None

    @property
    def fraction(self) -> float:
        done = self.batch * self.steps + self.step
        return done / max(1, self.batches * self.steps)

    @property
    def eta(self) -> float | None:
        f = self.fraction
        return None if f <= 0 else self.elapsed * (1 - f) / f


@dataclass
class Job:
    """A running job's handle: progress goes out through `on_progress`; `cancel()` stops it."""
    on_progress: Callable[[ProgressUpdate], None] | None = None
    preview_every: int = 0  # 0: no previews
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]
    infotexts: tuple[str, ...]
    paths: tuple[Path, ...]
    grid_path: Path | None
    notes: tuple[str, ...]  # what the engine had to do on its own (OOM step-down, fp32 VAE retry)
    save_error: str | None = None  # why some images (count given) were not saved; they are still in `images`


@dataclass(frozen=True)
class OutputSettings:
    outdir: Path
    watermark: bool = True


def _check(job: Job) -> None:
    if job.cancelled.is_set():
        raise CancelledError("cancelled")


def resize_init_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    image = ImageOps.exif_transpose(image).convert("RGB")
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    # "resize and fill": fit inside, then fill the bars by stretching the edge pixels (as A1111)
    inner = ImageOps.contain(image, (width, height), Image.LANCZOS)
    canvas = image.resize((width, height), Image.LANCZOS)
    canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return canvas


class Generator:
    def __init__(self, manager: ModelManager, outputs: OutputSettings, watermarker: Watermarker | None = None,
                 reuse_interval: int = INTERVAL):
        self.manager = manager
        self.outputs = outputs
        self.watermarker = watermarker or Watermarker()
        self.reuse_interval = reuse_interval  # speed "fast": one full UNet step in this many

    def run(self, request: GenerationRequest, model: LoadedModel, job: Job | None = None) -> GenerationResult:
        job = job or Job()
        _check(job)  # cancelled while it waited in the queue: nothing runs
        base_seed = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        notes: list[str] = []
        start = time.monotonic()
        images, seeds, infotexts, paths = [], [], [], []
        save_error: str | None = None
        encoded: dict = {}

        def prompts():
            # Encoded once, and again only after an out-of-memory step down moved the text encoder.
            if encoded.get("encoder") is not model.encoder:
                encoded.update(encoder=model.encoder,
                               pair=model.encoder.encode_pair(request.prompt, request.negative_prompt))
            return encoded["pair"]

        for batch in range(request.batch_count):
            _check(job)
            batch_seeds = [(base_seed + batch * request.batch_size + k) % (MAX_SEED + 1) for k in range(request.batch_size)]
            if request.mode == "img2img" and request.denoising_strength == 0:
                # Nothing to denoise (A1111 returns the init image too); no model call at all.
                init = resize_init_image(request.init_image, request.width, request.height, request.resize_mode)
                decoded = [init.copy() for _ in batch_seeds]
            else:
                if batch == 0 and request.speed == "fast" and self.denoising_steps(request) < MIN_STEPS:
                    notes.append(f"speed fast: {self.denoising_steps(request)} denoising steps are too few to reuse "
                                 f"features (it needs {MIN_STEPS}); ran every step in full")
                # Out of memory in the UNet or in the VAE: the manager steps the plan down and the
                # failed part runs again (a batch's denoising from its start; a decode on its own).
                latents = self.manager.with_fallback(
                    model, lambda: self._denoise(request, model, *prompts(), batch_seeds, batch, job, start), notes)
                _check(job)
                decoded = self.manager.with_fallback(model, lambda: self._decode(model, latents, notes), notes)
                _check(job)
            for k, image in enumerate(decoded):
                seed = batch_seeds[k]
                info = self.infotext(request, model, seed)
                if self.outputs.watermark:
                    image = self.watermarker.embed(image)
                images.append(image)
                seeds.append(seed)
                infotexts.append(info)
                if request.save_images and save_error is None:
                    _check(job)
                    try:
                        paths.append(save_png(image, self.outputs.outdir, request.mode, seed, info))
                    except SaveError as error:
                        # Disk full, read-only folder: the images are still shown; saving stops here.
                        save_error = str(error)
        grid_path = None
        if request.save_grid and request.save_images and save_error is None and len(images) > 1:
            grid = make_grid(images)
            if self.outputs.watermark:
                grid = self.watermarker.embed(grid)  # a grid of marked tiles no longer reads as marked
            try:
                grid_path = save_grid(grid, self.outputs.outdir, request.mode, seeds[0], infotexts[0])
            except SaveError as error:
                save_error = f"the grid was not saved: {error}"
        if save_error is not None and len(paths) < len(images):
            unsaved = len(images) - len(paths)
            save_error = f"{unsaved} of {len(images)} image{'s' if len(images) != 1 else ''} not saved: {save_error}"
        if save_error is not None:
            notes.append(save_error)
        return GenerationResult(tuple(images), tuple(seeds), tuple(infotexts), tuple(paths), grid_path, tuple(notes),
                                save_error)

    def infotext(self, request: GenerationRequest, model: LoadedModel, seed: int) -> str:
        params = {
            "Steps": request.steps,
            "Sampler": request.sampler,
            "Schedule type": None if request.schedule_type == "Automatic" else request.schedule_type,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model.hash,
            "Model": model.name,
            "Denoising strength": request.denoising_strength if request.mode == "img2img" else None,
            "Speed": None if request.speed == "exact" else request.speed,
            "Version": f"easel-{__version__}",
        }
        return build_infotext(request.prompt, request.negative_prompt, params)

    @staticmethod
    def _pipeline_steps(request: GenerationRequest) -> int:
        """`num_inference_steps` for diffusers: img2img runs int(steps * strength) of them, at least one."""
        steps = request.steps
        if request.mode == "img2img":
            while int(steps * request.denoising_strength) < 1:
                steps += 1
        return steps

    @classmethod
    def denoising_steps(cls, request: GenerationRequest) -> int:
        """How many UNet steps the request really runs."""
        steps = cls._pipeline_steps(request)
        return int(steps * request.denoising_strength) if request.mode == "img2img" else steps

    def _denoise(self, request, model, pos, neg, seeds, batch, job, start) -> torch.Tensor:
        pipe = model.pipeline(request.mode)
        pipe.scheduler = make_scheduler(request.sampler, request.schedule_type, model.scheduler_config)
        n = len(seeds)
        steps = self._pipeline_steps(request)
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        kwargs = dict(
            prompt_embeds=rep(pos.embeds),
            negative_prompt_embeds=rep(neg.embeds),
            num_inference_steps=steps,
            guidance_scale=request.cfg_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="latent",
            callback_on_step_end=self._callback(request, model, batch, job, start),
        )
        if pos.pooled is not None:
            kwargs["pooled_prompt_embeds"] = rep(pos.pooled)
            kwargs["negative_pooled_prompt_embeds"] = rep(neg.pooled)
        if model.family in (Family.SD1_INPAINT, Family.SD2_INPAINT):
            init = (resize_init_image(request.init_image, request.width, request.height, request.resize_mode)
                    if request.mode == "img2img" else Image.new("RGB", (request.width, request.height), (127, 127, 127)))
            # Whole-image mask: the inpainting UNet redraws everything, guided by the init image.
            kwargs.update(image=init, mask_image=Image.new("L", init.size, 255), width=request.width, height=request.height,
                          strength=request.denoising_strength if request.mode == "img2img" else 1.0)
        elif request.mode == "img2img":
            kwargs.update(image=resize_init_image(request.init_image, request.width, request.height, request.resize_mode),
                          strength=request.denoising_strength)
        else:
            kwargs.update(width=request.width, height=request.height)
        reuse = request.speed == "fast" and self.denoising_steps(request) >= MIN_STEPS
        with torch.inference_mode(), (FeatureReuse(pipe.unet, self.reuse_interval) if reuse else contextlib.nullcontext()):
            return pipe(**kwargs).images

    def _callback(self, request, model, batch, job, start):
        sdxl = model.family is Family.SDXL

        def on_step_end(pipe, i, t, tensors):
            _check(job)
            if job.on_progress:
                steps = getattr(pipe, "num_timesteps", None) or request.steps
                preview = None
                if job.preview_every and (i + 1) % job.preview_every == 0 and "latents" in tensors:
                    preview = latents_to_preview(tensors["latents"][:1], sdxl=sdxl)[0]
                job.on_progress(ProgressUpdate(i + 1, steps, batch, request.batch_count, time.monotonic() - start, preview))
                _check(job)  # cancelled while this step was reported: no further UNet step
            return tensors

        return on_step_end

    def _decode(self, model: LoadedModel, latents: torch.Tensor, notes: list[str]) -> list[Image.Image]:
        pipe = model.pipe
        with torch.inference_mode():
            pixels = self._vae_decode(pipe, latents)
            if not torch.isfinite(pixels).all() and model.plan.vae_dtype != torch.float32:
                # A1111's black images: this VAE overflows in half precision. Retry once in fp32 and
                # keep fp32 for this model from now on.
                self.manager.replan(model, model.plan.with_fp32_vae())
                notes.append(model.plan.notes[-1])
                pixels = self._vae_decode(pipe, latents)
        if not torch.isfinite(pixels).all():
            raise EaselError(f"model: {model.entry.name} produced an invalid (NaN) image even in fp32")
        return pipe.image_processor.postprocess(pixels.float(), output_type="pil", do_denormalize=[True] * len(pixels))

    @staticmethod
    def _vae_decode(pipe, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        config = vae.config
        # With model CPU offload the VAE sits on the CPU until decode moves it: the pipeline's
        # execution device is where it will run.
        latents = latents.to(device=pipe._execution_device, dtype=vae.dtype)
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]
