"""Generator: runs one validated request on the loaded model.

Seeds: initial noise is drawn on the CPU from one torch.Generator per image, seeded seed+k for
image k, so a seed gives the same image on any device and any image of a batch can be re-made
alone. Progress, live previews and cancel go through the pipeline's step-end callback.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps

from engine import __version__
from engine.errors import EaselError
from engine.faces import FaceRestorers
from engine.feature_cache import INTERVAL, MIN_STEPS, FeatureReuse
from engine.infotext import build_infotext, params_from_values
from engine.inpaint import InpaintJob
from engine.jobs import GenerationResult, Job, ProgressUpdate, check_cancelled, stopping_early
from engine.lora import strip_loras
from engine.manager import LoadedModel, ModelManager
from engine.networks import JobNetworks
from engine.openvino_parts import compiled_in, unload_before_steps
from engine.publish import Publisher
from engine.preview import latents_to_preview
from engine.request import MAX_SEED, GenerationRequest, hires_size, size_multiple
from engine.samplers import scheduler_for
from engine.upscalers import Upscalers


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


def pipeline_steps(request: GenerationRequest) -> int:
    """`num_inference_steps` for diffusers' first pass (see img2img_steps)."""
    return img2img_steps(request.steps, request.denoising_strength) if request.mode == "img2img" else request.steps


def img2img_steps(steps: int, strength: float) -> int:
    """`num_inference_steps` for an img2img pass: diffusers runs int(steps * strength) of them, and
    at least one must run. Strength 0 runs no step at all."""
    if strength > 0:
        while int(steps * strength) < 1:
            steps += 1
    return steps


def denoising_steps(request: GenerationRequest) -> int:
    """How many UNet steps the request really runs."""
    steps = pipeline_steps(request)
    return int(steps * request.denoising_strength) if request.mode == "img2img" else steps


@dataclass
class Run:
    """One job on one model: what every part of sampling needs, worked out once."""
    request: GenerationRequest
    model: LoadedModel
    job: Job
    started: float
    init_image: Image.Image | None  # the init image at the request's size (img2img), resized once
    steps: int                      # num_inference_steps handed to diffusers
    reuse_features: bool            # speed "fast" and enough steps to reuse the UNet's deep features
    inpaint: InpaintJob | None = None  # img2img with a mask
    notes: list[str] = field(default_factory=list)
    backends: set = field(default_factory=set)  # what ran the UNet's calls: "torch", "openvino", "openvino int8"
    networks: dict = field(default_factory=dict)  # infotext pairs of the job's networks ("Lora hashes", "ControlNet 0")
    faces_restored: int = 0  # restore_faces: how many faces the job's pictures had redrawn
    step_lora: str | None = None  # the kind of step-distilled LoRA the prompt runs ("LCM-LoRA", ...): engine.lora
    decode_noted: bool = False  # the note on a step LoRA's bf16 decode is in `notes`
    last_batch: bool = True  # the request's last batch is sampling: no UNet step follows its decode
    scheduler: object = None  # the running pass's scheduler (engine.networks read its progress)
    pass_images: int = 1      # pictures in the running pass (a CFG call holds twice as many rows)
    network_parts: list = field(default_factory=list)  # engine.networks.JobPart of the job's ControlNets, ...
    _encoded: tuple = ()

    def cfg_halves(self, rows: int) -> bool:
        """Whether a UNet call of `rows` rows is CFG's [negative, positive] halves."""
        return rows == 2 * self.pass_images
    def prompts(self) -> tuple:
        """(positive, negative) embeddings; encoded once, and again only if an out-of-memory step
        down moved the text encoder (the manager rebuilds the encoder for the new plan)."""
        if not self._encoded or self._encoded[0] is not self.model.encoder:
            # The <lora:...> tags are the job's LoRAs (applied before sampling), not words to encode.
            self.model.encoder.set_clip_skip(self.request.clip_skip or 1)
            pair = self.model.encoder.encode_pair(strip_loras(self.request.prompt), self.request.negative_prompt)
            self._encoded = (self.model.encoder, pair)
        return self._encoded[1]

    def backend(self) -> str:
        """What ran the UNet in this run ("torch", "openvino", "openvino int8", "openvino+torch")."""
        return "+".join(sorted(self.backends, key=lambda name: name == "torch")) or "torch"

    def used_embeddings(self) -> tuple[str, ...]:
        """The textual inversions the encoded prompts used, in order (engine/networks/embeddings.py)."""
        return tuple(dict.fromkeys(n for e in (self._encoded[1] if self._encoded else ()) for n in e.embeddings))

    def infotext_networks(self) -> dict:
        """The job's networks' infotext pairs (`Lora hashes`, `TI hashes`, `ControlNet 0`, ...)."""
        return {**self.networks, **JobNetworks.late_infotext(self)}


TILING_ON_TORCH = ("tiling ran on torch: OpenVINO's compiled UNet and VAE pad with zeros, and seamless "
                   "tiling needs circular padding")


@contextlib.contextmanager
def _circular_padding(run: Run):
    """A1111's tiling: every Conv2d of the UNet and the VAE pads circularly for the job (the
    compiled VAE parts run on torch meanwhile), and pads as before afterwards."""
    from engine.openvino_parts import parts_on_torch

    pipe = run.model.pipe
    convs = [m for part in (pipe.unet, pipe.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    before = [conv.padding_mode for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        with parts_on_torch(pipe.vae.decoder, pipe.vae.encoder):
            yield
    finally:
        for conv, mode in zip(convs, before):
            conv.padding_mode = mode


class Generator:
    """Sampling: a request and a loaded model in, images out (`sample`); `run` hands them to the
    publishing step (watermark, infotext, save, grid: `engine.publish`)."""

    def __init__(self, manager: ModelManager, publisher: Publisher, *, networks: JobNetworks,
                 reuse_interval: int = INTERVAL, upscalers: Upscalers | None = None,
                 faces: FaceRestorers | None = None, single_request: bool = False):
        self.manager = manager
        self.publisher = publisher
        self.upscalers = upscalers  # engine.upscalers.Upscalers: hires fix's upscaler models
        self.faces = faces          # engine.faces.FaceRestorers: restore_faces' models; None: refused
        self.reuse_interval = reuse_interval  # speed "fast": one full UNet step in this many
        self.single_request = single_request  # the process ends after one request (see _finish_pictures)
        # What a job adds to the model (LoRAs, embeddings, ControlNet units): engine.networks, built
        # by the engine (a <lora:...> tag is refused by its LoRA kind when there is no LoRA folder).
        self.networks = networks

    def run(self, request: GenerationRequest, model: LoadedModel, job: Job | None = None) -> GenerationResult:
        job = job or Job()
        check_cancelled(job)  # cancelled while it waited in the queue: nothing runs
        run = self._plan(request, model, job)
        run.notes.extend(model.notes)  # what loading it had to say (OpenVINO's first conversion), once
        model.notes.clear()
        with self.networks.for_job(run) as added:  # LoRAs, embeddings, ControlNet units: once per job
            run.networks = added
            publication = self.publisher.begin(request.mode, save=request.save_images, job=job)
            seeds, infotexts = [], []
            for batch, batch_seeds in enumerate(self._batch_seeds(request)):
                run.last_batch = batch == request.batch_count - 1
                for image, seed in zip(self.sample(run, batch, batch_seeds), batch_seeds):
                    info = self.infotext(request, model, seed, run.infotext_networks(), run.backend())
                    publication.add(image, seed, info)
                    seeds.append(seed)
                    infotexts.append(info)
                if stopping_early(job):  # interrupted with keep_partial: no further batch
                    break
        if request.restore_faces:
            run.notes.append(f"restore faces: {run.faces_restored} face(s) redrawn by {request.face_restorer}"
                             if run.faces_restored else "restore faces: no face found in the pictures")
        published = publication.finish(grid=request.save_grid)
        if published.save_error is not None:
            run.notes.append(published.save_error)
        return GenerationResult(published.images, tuple(seeds), tuple(infotexts), published.paths,
                                published.grid_path, tuple(run.notes), published.save_error)

    def _plan(self, request: GenerationRequest, model: LoadedModel, job: Job) -> Run:
        init = inpaint = None
        if request.mode == "img2img":
            init = resize_init_image(request.init_image, request.width, request.height, request.resize_mode)
        if request.mask is not None:  # the mask goes through the same resize as the init image
            mask = resize_init_image(request.mask, request.width, request.height, request.resize_mode)
            inpaint = InpaintJob.prepare(request, init, mask)
        reuse = request.speed == "fast" and denoising_steps(request) >= MIN_STEPS and not request.controlnet
        run = Run(request, model, job, time.monotonic(), init, pipeline_steps(request), reuse, inpaint)
        if request.speed == "fast" and request.controlnet:
            run.notes.append("speed fast: ran every step in full (the ControlNet's residuals change the deep "
                             "features a reuse step would keep)")
        elif request.speed == "fast" and not reuse:
            run.notes.append(f"speed fast: {denoising_steps(request)} denoising steps are too few to reuse "
                             f"features (it needs {MIN_STEPS}); ran every step in full")
        return run

    @staticmethod
    def _batch_seeds(request: GenerationRequest) -> list[list[int]]:
        """Image k of the whole job gets seed+k (-1: a random base seed), as A1111 does."""
        base = request.seed if request.seed != -1 else random.randint(0, MAX_SEED)
        size = request.batch_size
        return [[(base + b * size + k) % (MAX_SEED + 1) for k in range(size)] for b in range(request.batch_count)]

    def sample(self, run: Run, batch: int, seeds: list[int]) -> list[Image.Image]:
        """One batch's images (seamless with `tiling`: see _circular_padding)."""
        with _circular_padding(run) if run.request.tiling else contextlib.nullcontext():
            return self._sample(run, batch, seeds)

    def _sample(self, run: Run, batch: int, seeds: list[int]) -> list[Image.Image]:
        """Out of memory in the UNet or the VAE: the manager steps the plan down and the failed part
        runs again (a batch's denoising from its start; a decode on its own)."""
        check_cancelled(run.job)
        if run.request.mode == "img2img" and run.request.denoising_strength == 0:
            return self._restored(run, [run.init_image.copy() for _ in seeds])  # nothing to denoise (A1111 returns the init image too)
        latents = self.manager.with_fallback(run.model, lambda: self._denoise(run, batch, seeds), run.notes)
        if stopping_early(run.job):  # the pictures as far as the steps got; no hires pass
            run.notes.append("interrupted: the pictures are as far as their steps got")
            return self._finish_pictures(run, latents)
        if run.request.enable_hr and run.request.denoising_strength == 0:
            # A1111 takes hires denoising 0: the second pass changes nothing, so the answer is the
            # first pass enlarged (a latent enlargement decoded), with no UNet step run.
            return self.manager.with_fallback(run.model, lambda: self._enlarged_pictures(run, latents), run.notes)
        if run.request.enable_hr:
            first = latents
            latents = self.manager.with_fallback(run.model, lambda: self._hires_pass(run, batch, seeds, first), run.notes)
            stopping_early(run.job)
        return self._finish_pictures(run, latents)

    def _finish_pictures(self, run: Run, latents: torch.Tensor) -> list[Image.Image]:
        if self.single_request and run.last_batch and run.model.openvino is not None:
            # The process ends after this request, and no UNet step follows this decode: its compiled
            # graphs (1.7 GB of repacked weights for SD 1.5) go now, and the VAE's first call, which
            # allocates its large activations, reuses that memory instead of faulting in fresh pages:
            # 6.6-6.9 s against 7.5-8.7 s for SD 1.5's bf16 decode at 512² on a 2-core Zen 4
            # (docs/benchmarks.md). A server keeps them: its next job would pay the compile and the
            # first call's repacking (about 1.5 s) to save that second.
            run.model.openvino.unload()
        images = self.manager.with_fallback(run.model, lambda: self._decode(run, latents), run.notes)
        stopping_early(run.job)
        images = self._restored(run, images)  # before the inpaint composite, as A1111: unmasked pixels stay the init's
        if run.inpaint is not None:  # before publishing: see engine.inpaint on the watermark
            images = [run.inpaint.composite(image) for image in images]
        return images

    def _restored(self, run: Run, images: list[Image.Image]) -> list[Image.Image]:
        """The pictures with their faces restored, when the request asks (engine.faces)."""
        request = run.request
        if not request.restore_faces:
            return images
        if self.faces is None:
            raise EaselError("restore_faces: this engine has no face restoration models")
        run.job.say(f"Restoring faces ({request.face_restorer})")
        out = []
        for image in images:
            restored = self.faces.restore(image, request.face_restorer, request.codeformer_weight, run.job)
            run.faces_restored += restored.faces
            out.append(restored.image)
        return out

    def infotext(self, request: GenerationRequest, model: LoadedModel, seed: int, networks: dict | None = None,
                 backend: str | None = None) -> str:
        values = {name: getattr(request, name) for name in request.field_names()}
        params = params_from_values({**values, "seed": seed, "vae": model.vae_name}, model_hash=model.hash,
                                    model=model.name, version=f"easel-{__version__}", vae_hash=model.vae_hash,
                                    networks=networks, backend=backend)
        return build_infotext(request.prompt, request.negative_prompt, params)

    def _denoise(self, run: Run, batch: int, seeds: list[int]) -> torch.Tensor:
        """The first (or only) pass: txt2img, img2img, or the inpainting UNet given a whole-image mask."""
        request, model = run.request, run.model
        if run.inpaint is not None:
            pipe = model.pipeline("inpaint")
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            with torch.inference_mode():
                extra = run.inpaint.pipeline_inputs(pipe, generators, pipe.unet.config.in_channels)
            extra.update(width=request.width, height=request.height, strength=request.denoising_strength)
            return self._pipeline_pass(run, batch, seeds, "inpaint", run.steps, extra, run.reuse_features)
        if model.info.inpaint_unet:
            size = (request.width, request.height)
            init = run.init_image or Image.new("RGB", size, (127, 127, 127))
            # Whole-image mask: the inpainting UNet redraws everything, guided by the init image.
            extra = dict(image=init, mask_image=Image.new("L", size, 255), width=request.width, height=request.height,
                         strength=request.denoising_strength if request.mode == "img2img" else 1.0)
        elif request.mode == "img2img":
            extra = dict(image=run.init_image, strength=request.denoising_strength)
        else:
            extra = dict(width=request.width, height=request.height)
        return self._pipeline_pass(run, batch, seeds, request.mode, run.steps, extra, run.reuse_features)

    def _hires_pass(self, run: Run, batch: int, seeds: list[int], latents: torch.Tensor) -> torch.Tensor:
        """Hires fix's second pass: enlarge the first pass (see _enlarge), then img2img over it at
        the request's denoising strength."""
        request = run.request
        image = self._enlarge(run, latents)
        steps = img2img_steps(request.hr_second_pass_steps or request.steps, request.denoising_strength)
        return self._pipeline_pass(run, batch, seeds, "img2img", steps,
                                   dict(image=image, strength=request.denoising_strength), reuse=False)

    def _enlarge(self, run: Run, latents: torch.Tensor) -> torch.Tensor | list[Image.Image]:
        """The first pass at hires fix's final size: its latents enlarged ("Latent"), or its decoded
        pictures enlarged with Lanczos or an upscaler model."""
        request, model = run.request, run.model
        factor = model.vae_scale_factor
        width, height = hires_size(request.width, request.height, request.hr_scale, size_multiple(factor))
        if request.hr_upscaler == "Latent":
            return torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode="bilinear")
        if request.hr_upscaler == "Lanczos":
            return [picture.resize((width, height), Image.LANCZOS) for picture in self._decode(run, latents)]
        # an upscaler model (ESRGAN family), validated against the models folder by the engine
        if self.upscalers is None:
            raise EaselError(f"hr_upscaler: {request.hr_upscaler} needs the engine's upscalers")
        return [self.upscalers.enlarge(picture, request.hr_upscaler, (width, height), run.job)
                for picture in self._decode(run, latents)]

    def _enlarged_pictures(self, run: Run, latents: torch.Tensor) -> list[Image.Image]:
        enlarged = self._enlarge(run, latents)
        return self._decode(run, enlarged) if isinstance(enlarged, torch.Tensor) else enlarged

    def _pipeline_pass(self, run: Run, batch: int, seeds: list[int], mode: str, steps: int, extra: dict,
                       reuse: bool) -> torch.Tensor:
        """One diffusers call that returns latents: the prompts, sampler, seeds and progress are the
        run's; `extra` holds what the pass starts from (a size, or an image and a strength)."""
        request, model = run.request, run.model
        pipe = model.pipeline(mode)
        scheduled = scheduler_for(request.sampler, request.schedule_type, model.scheduler_config, steps,
                                  sdxl=model.info.latent_preview == "sdxl")
        if scheduled.note and scheduled.note not in run.notes:  # runs as A1111 runs it; the answer says so
            run.notes.append(scheduled.note)
        pipe.scheduler = scheduled.scheduler
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            # DPM++ SDE's Brownian tree, one per image seeded with its seed as A1111 does; left unset,
            # diffusers seeds it from torch's global RNG and the same seed gives another image.
            pipe.scheduler.noise_sampler_seed = list(seeds)
        pos, neg = run.prompts()
        n = len(seeds)
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        kwargs = dict(
            prompt_embeds=rep(pos.embeds),
            negative_prompt_embeds=rep(neg.embeds),
            num_inference_steps=steps,
            guidance_scale=request.cfg_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="latent",
            callback_on_step_end=self._callback(run, batch),
            **extra,
        )
        if scheduled.sigmas is not None:  # the schedule's own sigma list: the pipeline counts the steps from it
            kwargs["sigmas"] = scheduled.sigmas
        if pos.pooled is not None:
            kwargs["pooled_prompt_embeds"] = rep(pos.pooled)
            kwargs["negative_pooled_prompt_embeds"] = rep(neg.pooled)
        run.scheduler, run.pass_images = pipe.scheduler, n
        with torch.inference_mode(), self._unet_backend(run, pipe.unet, reuse) as record, \
                self.networks.on_pass(run, pipe.unet):  # after the backend's hook: outermost
            latents = pipe(**kwargs).images
        run.backends |= record.used if record is not None else {"torch"}
        return latents

    @contextlib.contextmanager
    def _unet_backend(self, run: Run, unet, reuse: bool):
        """What runs the UNet for this pass, feature reuse included: OpenVINO's compiled UNet when
        the model has one and the pass can use it (yielding its PassRecord), else torch's (yielding
        None), with feature_cache's hooks on it for a `fast` pass."""
        interval = self.reuse_interval if reuse else None
        unload_before_steps(run.model.pipe)  # the prompts (and any init image) are encoded by now
        compiled = run.model.openvino
        if compiled is not None and any(unet_weight for _, _, unet_weight in run.model.lora_weights):
            compiled = self._lora_unet(run, compiled, unet)  # None: this LoRA set runs on torch
        elif compiled is not None:
            compiled.drop_loras()  # its memory goes before the plain graphs are compiled again
            if compiled.control is not None and not run.request.controlnet:
                compiled.control.unload()  # likewise the UNet graph a ControlNet job used
        tiling = compiled is not None and run.request.tiling
        if tiling and TILING_ON_TORCH not in run.notes:
            run.notes.append(TILING_ON_TORCH)
        if compiled is None or tiling:
            with FeatureReuse(unet, interval) if reuse else contextlib.nullcontext():
                yield None
            return
        with compiled.running(unet, interval) as record:
            yield record

    @staticmethod
    def _lora_unet(run: Run, compiled, unet):
        """The OpenVINO UNet with the job's LoRAs fused in (engine.openvino_lora), or None, with a
        note, when this set of LoRAs cannot be fused (it runs on torch)."""
        try:
            fused, seconds = compiled.for_loras(unet)
        except Exception as error:  # noqa: BLE001 - compiling failed: torch still has the LoRA layers
            fused, seconds = error, None
        if isinstance(fused, Exception):
            why = f"the LoRA ran on torch: {str(fused).splitlines()[0] if str(fused) else type(fused).__name__}"
            if why not in run.notes:
                run.notes.append(why)
            return None
        if seconds is not None and fused.from_cache:
            run.notes.append(f"the OpenVINO UNet with these LoRAs was read from the cache in {seconds:.1f} s")
        elif seconds is not None:
            run.notes.append(f"the LoRAs were fused into the OpenVINO UNet in {seconds:.1f} s, once for this set of "
                             "LoRAs and weights")
        return fused

    @staticmethod
    def _callback(run: Run, batch: int):
        job, request = run.job, run.request
        sdxl = run.model.info.latent_preview == "sdxl"

        def on_step_end(pipe, i, t, tensors):
            if stopping_early(job):
                pipe._interrupt = True  # diffusers' own early stop: the loop skips the steps left
                return tensors
            if job.on_progress:
                steps = getattr(pipe, "num_timesteps", None) or request.steps
                preview = None
                if job.preview_every and (i + 1) % job.preview_every == 0 and "latents" in tensors:
                    preview = latents_to_preview(tensors["latents"][:1], sdxl=sdxl)[0]
                job.on_progress(ProgressUpdate(i + 1, steps, batch, request.batch_count,
                                               time.monotonic() - run.started, preview))
                if stopping_early(job):  # cancelled while this step was reported: no further UNet step
                    pipe._interrupt = True
            return tensors

        return on_step_end

    def _decode(self, run: Run, latents: torch.Tensor) -> list[Image.Image]:
        model = run.model
        pipe = model.pipe
        with torch.inference_mode(), self._decoder_precision(run):
            pixels = self._vae_decode(pipe, latents)
            if not torch.isfinite(pixels).all() and model.plan.vae_dtype != torch.float32:
                # A1111's black images: this VAE overflows in half precision. The manager keeps it in
                # fp32 for this model from now on; decode once more.
                run.notes.append(self.manager.use_fp32_vae(model))
                pixels = self._vae_decode(pipe, latents)
        if not torch.isfinite(pixels).all():
            raise EaselError(f"model: {model.entry.name} produced an invalid (NaN) image even in fp32")
        return pipe.image_processor.postprocess(pixels.float(), output_type="pil", do_denormalize=[True] * len(pixels))

    @staticmethod
    @contextlib.contextmanager
    def _decoder_precision(run: Run):
        """A step LoRA's job decodes in bf16 where the plan runs the UNet in native bf16 on OpenVINO:
        the decode is then a third of a 4-step job, and bf16 halves it (12.6 s to 6.3 s at 512² on a
        2-core Zen 4: docs/benchmarks.md), as FastSD CPU's OpenVINO mode decodes. Every other job
        keeps the f32 decode (bf16 is up to 11 levels off); the job's notes say when it happened."""
        model = run.model
        if run.step_lora is None or model.openvino is None or model.plan.openvino_precision != "bf16":
            yield
            return
        with compiled_in(model.pipe.vae.decoder, "bf16") as part:
            if part is not None and not run.decode_noted:
                run.notes.append(f"the VAE decoded in bf16 for {run.step_lora}'s few-step job (about twice "
                                 "as fast as f32; every other job decodes in f32)")
                run.decode_noted = True
            yield

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
