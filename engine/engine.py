"""Engine: the one object the CLI, the web UI and the HTTP API talk to.

It owns the model library, the model manager and the generator, and runs one generation at a
time (a lock per engine, which is per device). Every method takes plain values or a validated
request and returns plain values, so callers need no torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from engine.devices import Hardware, resolve_device
from engine.downloads import Downloads
from engine.embeddings import Embeddings
from engine.errors import EaselError, ModelNotFoundError, RequestError
from engine.faces import FaceRestorers
from engine.generator import Generator
from engine.jobs import GenerationResult, Job, check_cancelled
from engine.images import open_image
from engine.infotext import parse_infotext, printable, read_infotext
from engine.library import ModelLibrary
from engine.lora import Loras
from engine.manager import LoadedModel, ModelFacts, ModelManager, ModelSettings
from engine.networks import JobNetworks
from engine.networks.controlnet import ControlNetKind, ControlNets
from engine.networks.embeddings import EmbeddingsKind
from engine.networks.lora import LoraKind
from engine.outputs import OutputSettings, remove_leftovers
from engine.publish import Publisher
from engine.request import HIRES_UPSCALERS, LIMITS, GenerationRequest, size_multiple
from engine.samplers import SAMPLERS, SCHEDULE_TYPES
from engine.turns import TurnQueue
from engine.upscalers import Upscalers, check_sd_options
from engine.watermark import Watermarker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    models_dir: Path
    outputs_dir: Path
    data_dir: Path  # per-checkpoint settings, hash cache
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"   # what runs the UNet: auto, torch or openvino (engine/devices.py)
    watermark: bool = True
    catalog_path: Path | None = None  # the models offered for download; None: engine/configs/catalog.json
    # The process ends after one request (the CLI's txt2img/img2img): the compiled UNet is dropped
    # before the request's last decode, as nothing runs it again (engine.generator says why).
    single_request: bool = False


@dataclass(frozen=True)
class ModelStatus:
    name: str
    family: str | None  # the family's label, or None when it could not be identified
    plan: str | None    # the device/precision plan, in words
    error: str | None   # why it cannot be used
    loaded: bool
    few_step: str | None = None  # "turbo: why" / "lcm: why" (LCM only once loaded), else None


@dataclass(frozen=True)
class WeightsStatus:
    """A file in one of the other model folders (VAE, upscalers, LoRA, embeddings)."""
    name: str              # relative to the models folder, e.g. "Lora/style.safetensors"
    tensors: int | None    # how many tensors it holds; None when it cannot be used
    error: str | None      # why it cannot be used, one line


@dataclass(frozen=True)
class PngInfo:
    parameters: str | None
    fields: dict
    watermark: bool | None  # True: Easel's mark found; None: image too small to tell


class Engine:
    def __init__(self, config: EngineConfig, hardware: Hardware | None = None):
        self.config = config
        self.hardware = hardware or Hardware.detect()
        self.library = ModelLibrary(config.models_dir)
        self.manager = ModelManager(self.library, self.hardware, device=config.device, precision=config.precision,
                                    settings=ModelSettings(config.data_dir / "model-settings.json"),
                                    cache_dir=config.data_dir / "cache", backend=config.backend)
        self.watermarker = Watermarker()
        self.publisher = Publisher(OutputSettings(config.outputs_dir, config.watermark), self.watermarker)
        self.upscalers = Upscalers(self.library, self.publisher, device=resolve_device(self.hardware, config.device),
                                   manager=self.manager)
        self.loras = Loras(self.library)
        self.embeddings = Embeddings(self.library)
        self.faces = FaceRestorers(self.library, device=resolve_device(self.hardware, config.device))
        self.controlnets = ControlNets(config.models_dir)
        # What a job may add to the model, in the order it is attached (engine/networks/).
        networks = JobNetworks((LoraKind(self.loras), EmbeddingsKind(self.embeddings), ControlNetKind(self.controlnets)))
        self.generator = Generator(self.manager, self.publisher, upscalers=self.upscalers, faces=self.faces,
                                   single_request=config.single_request, networks=networks)
        # The page's and the API's jobs take turns on the device in arrival order (engine/turns.py).
        self.turns = TurnQueue()
        # The download catalogue and its advice for this machine; partial downloads wait in data/downloads.
        self.downloads = Downloads.for_config(config, self.hardware)
        # Temp files of saves that were killed mid-write (only those whose writer is gone: engine/outputs.py).
        remove_leftovers(config.outputs_dir)

    # --- models -----------------------------------------------------------------------------
    def refresh_models(self) -> list[ModelStatus]:
        self.library.refresh()
        return self.models()

    def models(self) -> list[ModelStatus]:
        statuses = []
        current = self.manager.current
        for entry in self.library.entries():
            try:
                facts = self.manager.facts(entry)
                plan = self.manager.plan(entry, facts.family)
                loaded = bool(current and current.entry == entry)
                few_step = None if facts.distillation == "none" else f"{facts.distillation}: {facts.distillation_why}"
                # The plan's notes say why it differs from what was asked (fp16 on a CPU, OpenVINO
                # missing) and name what it leaves unused (an Intel GPU).
                described = "; ".join((plan.describe(), *plan.notes))
                statuses.append(ModelStatus(entry.name, facts.info.label, described, None, loaded, few_step))
            except EaselError as e:
                statuses.append(ModelStatus(entry.name, None, None, str(e), False))
            except Exception as e:  # noqa: BLE001 - one strange file must not take the whole list down
                logger.exception("identifying %s", entry.path)
                statuses.append(ModelStatus(entry.name, None, None,
                                            f"{entry.name}: cannot be identified ({type(e).__name__}: {e})", False))
        return statuses

    def extra_models(self) -> dict[str, list[WeightsStatus]]:
        """The other model folders by heading ("VAE", "Upscalers", "LoRA", "Embeddings"): each file
        with its tensor count, or why it cannot be used. Read safely (`engine.safe_files`): only
        a safetensors header or the restricted unpickler, nothing in a file runs."""
        from engine.library import EXTRA_KINDS
        from engine.safe_files import inspect_weights

        listing = {}
        for kind in EXTRA_KINDS:
            statuses = []
            for entry in self.library.extra_entries(kind):
                info = inspect_weights(entry.path)
                statuses.append(WeightsStatus(entry.name, len(info.shapes) if info.ok else None, info.reason))
            listing[kind] = statuses
        return listing

    def model_names(self) -> list[str]:
        return [e.name for e in self.library.entries()]

    @property
    def current_model(self) -> str | None:
        return self.manager.current.entry.name if self.manager.current else None

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go (`<models>/Stable-diffusion`): for messages telling the user."""
        return self.library.checkpoint_dir

    def add_model_path(self, path: Path) -> str:
        """Make a checkpoint outside the models folder usable, by its path; returns its model name.
        Only for a path typed on the command line of this machine: the UI and the API never call it."""
        return self.library.add_external(Path(path)).name

    def _model_name(self, name: str | None) -> str:
        """The name asked for, or else the loaded model, or else the first in the list."""
        if name:
            return name
        if self.manager.current:
            return self.manager.current.entry.name
        entries = self.library.entries()
        if not entries:
            raise ModelNotFoundError(f"model: no checkpoint found; put a .safetensors file in {self.checkpoint_dir}")
        return entries[0].name

    def model_facts(self, name: str | None = None) -> ModelFacts:
        """Family, VAE scale factor and distillation of a model, from its files' headers: no load."""
        return self.manager.facts(self.library.resolve(self._model_name(name)))

    def load_model(self, name: str | None = None, job: Job | None = None) -> LoadedModel:
        """Load a model now (the model picker): waits for its turn, like a job of its own; `job`
        hears what a long load is doing (Job.say)."""
        job = job or Job()
        with self.turns.turn(job), self.manager.use(self._model_name(name), on_status=job.say) as loaded:
            return loaded

    def set_model_precision(self, name: str, precision: str) -> None:
        entry = self.library.resolve(name)
        self.manager.settings.set_precision(entry.name, precision)
        if self.manager.current and self.manager.current.entry == entry:
            self.manager.unload()

    def set_model_backend(self, name: str, backend: str) -> None:
        """Remember auto, torch or openvino for one checkpoint (a --backend other than auto wins)."""
        entry = self.library.resolve(name)
        self.manager.settings.set_backend(entry.name, backend)
        if self.manager.current and self.manager.current.entry == entry:
            self.manager.unload()

    def vae_names(self) -> list[str]:
        """"Automatic" (each checkpoint's own VAE), then the files in models/VAE."""
        from engine.vae import vae_choices

        return vae_choices(self.library)

    def model_vae(self, name: str | None = None) -> str:
        """The VAE remembered for a checkpoint ("Automatic" unless one was chosen)."""
        return self.manager.settings.vae(self.library.resolve(self._model_name(name)).name)

    def find_vae(self, name: str) -> str | None:
        """The VAE picker's name for `name` as an infotext records it (A1111 writes the file name,
        Easel the picker's name), or None when models/VAE holds no such file."""
        from engine.errors import RequestError
        from engine.vae import AUTOMATIC, resolve_vae

        try:
            found = resolve_vae(self.library, name)
        except RequestError:
            return None
        return AUTOMATIC if found is None else found.name

    def set_model_vae(self, name: str | None, vae: str) -> None:
        """Remember a VAE for a checkpoint (the page's VAE picker); used from its next job on. The
        name must be a file in models/VAE (RequestError naming `vae`); a VAE of the wrong kind for
        the checkpoint is refused when it is applied."""
        from engine.vae import AUTOMATIC, resolve_vae

        entry = self.library.resolve(self._model_name(name))
        choice = resolve_vae(self.library, vae)
        self.manager.settings.set_vae(entry.name, AUTOMATIC if choice is None else choice.name)

    def model_clip_skip(self, name: str | None = None) -> int:
        """The CLIP skip remembered for a checkpoint (1 unless one was chosen)."""
        return self.manager.settings.clip_skip(self.library.resolve(self._model_name(name)).name)

    def set_model_clip_skip(self, name: str | None, clip_skip: int) -> int:
        """Remember a CLIP skip for a checkpoint (1-12; RequestError naming `clip_skip`); a job
        that gives none uses it."""
        return self.manager.settings.set_clip_skip(self.library.resolve(self._model_name(name)).name, clip_skip)

    def set_model_distillation(self, name: str, distillation: str) -> None:
        """The user's word on a checkpoint: "turbo", "none" or "auto" (tell from its name)."""
        entry = self.library.resolve(name)
        self.manager.settings.set_distillation(entry.name, distillation)
        if self.manager.current and self.manager.current.entry == entry:
            self.manager.unload()

    # --- prompt styles (A1111's styles.csv in the data folder: engine/styles.py) ---------------
    @property
    def prompt_styles(self):
        from engine.styles import STYLES_FILE, Styles

        if getattr(self, "_styles", None) is None:
            self._styles = Styles(Path(self.config.data_dir) / STYLES_FILE)
        return self._styles

    def style_names(self) -> list[str]:
        return self.prompt_styles.names()

    def styles(self) -> list[dict]:
        """Each style as {"name", "prompt", "negative_prompt"}, in the file's order."""
        return [s.as_dict() for s in self.prompt_styles.all()]

    def apply_styles(self, prompt: str, negative_prompt: str, names) -> tuple[str, str]:
        """(prompt, negative_prompt) with the named styles applied in order ({prompt} placement or
        appended after ", "); RequestError naming `styles` for an unknown name."""
        return self.prompt_styles.apply(prompt, negative_prompt, names)

    def save_style(self, name: str, prompt: str, negative_prompt: str) -> None:
        """Add or overwrite a style; the file is rewritten atomically, other rows kept."""
        self.prompt_styles.save(name, prompt, negative_prompt)

    def delete_style(self, name: str) -> None:
        self.prompt_styles.delete(name)

    # --- where and how images are saved -------------------------------------------------------
    @property
    def outputs(self) -> OutputSettings:
        return self.publisher.outputs

    def set_outputs(self, outdir: Path | None = None, watermark: bool | None = None) -> OutputSettings:
        current = self.publisher.outputs
        self.publisher.outputs = OutputSettings(Path(outdir) if outdir is not None else current.outdir,
                                                current.watermark if watermark is None else bool(watermark))
        return self.publisher.outputs

    # --- generation ---------------------------------------------------------------------------
    samplers = tuple(SAMPLERS)
    schedule_types = SCHEDULE_TYPES

    limits = LIMITS  # the request's ranges, for the page's sliders and the API's messages

    def make_request(self, fields: Mapping[str, Any], model: str | None = None) -> GenerationRequest:
        """Validate raw fields for a model: sizes step by `size_step`, and fields left out (or None)
        take the model's own defaults where it has them (LCM, turbo). Reads the model's headers and
        config files only: no weights are loaded here."""
        facts = self.model_facts(model)
        given = {k: v for k, v in fields.items() if v is not None}
        defaults = facts.default_fields()
        if isinstance(given.get("prompt"), str):
            defaults = {**defaults, **self.lora_defaults(given["prompt"], facts)}  # also checks its <lora:...> tags
        request = GenerationRequest.validate({**defaults, **given},
                                             size_multiple=size_multiple(facts.vae_scale_factor),
                                             hires_upscalers=self.hires_upscaler_names())
        if request.vae is not None:
            from engine.vae import resolve_vae

            resolve_vae(self.library, request.vae)  # a name outside models/VAE: RequestError("vae") now
        if request.restore_faces:  # the restorer that will run (its file and the detector on disk), named now
            request = replace(request, face_restorer=self.faces.resolve(request.face_restorer))
        for i, unit in enumerate(request.controlnet):  # a name outside models/ControlNet: refused now
            self.controlnets.resolve(unit.model, f"controlnet[{i}].model")
        if request.enable_hr and facts.info.inpaint_unet:
            raise RequestError("enable_hr", f"hires fix needs an ordinary checkpoint; {facts.info.label} models "
                                            "redraw through a mask")
        return request

    def size_step(self, model: str | None = None) -> int:
        """The step width and height must take for this model (see `size_multiple`)."""
        return size_multiple(self.model_facts(model).vae_scale_factor)

    def face_restorer_names(self) -> list[str]:
        """The face restorers with a model on disk ("GFPGAN", "CodeFormer"), the first one the default."""
        return self.faces.names()

    def controlnet_names(self) -> list[str]:
        """The ControlNets in models/ControlNet (and an A1111 tree's extension folder), as
        sd-webui-controlnet lists them: "name [hash8]"."""
        return self.controlnets.titles()

    def controlnet_detect(self, module, image, processor_res=-1, threshold_a=-1, threshold_b=-1):
        """A picture's control map by a preprocessor (the page's preview, /controlnet/detect)."""
        from engine.networks.control_units import detect_map

        return detect_map(module, open_image(image, "image"), processor_res, threshold_a, threshold_b)

    def lora_names(self) -> list[str]:
        """The LoRAs in models/Lora and models/LyCORIS, by the name <lora:NAME:1> takes."""
        return self.loras.names()

    def lora_defaults(self, prompt: str, facts: ModelFacts | None = None) -> dict[str, Any]:
        """Request fields a step-distilled LoRA in the prompt wants (engine.lora.step_lora: LCM-LoRA,
        Hyper-SD, SDXL-Lightning, DMD2, TCD; the sampler, steps and CFG their authors publish) unless
        the model is itself few-step; {} otherwise. RequestError naming `prompt` for a tag that does not
        read or names no file in the LoRA folders."""
        facts = facts or self.model_facts()
        step = self.loras.step_lora(prompt, facts.info.label)  # also refuses one of another family
        if facts.distillation == "none" and step is not None:
            return dict(step.fields)
        return {}

    def model_defaults(self, model: str | None = None) -> dict[str, Any]:
        """Request fields this model wants other than A1111's defaults (e.g. LCM: sampler, steps, CFG)."""
        return self.model_facts(model).default_fields()

    def generate(self, request: GenerationRequest, job: Job | None = None, model: str | None = None) -> GenerationResult:
        """Run a validated request: the one place a model is loaded for a job, under the manager's
        in-use scope, so nothing re-plans or unloads it while the job runs."""
        job = job or Job()
        check_cancelled(job)  # cancelled while it waited in the page's queue: not even a load
        with self.turns.turn(job), self.manager.use(self._model_name(model), on_status=job.say) as loaded:
            # The request's VAE, else the one remembered for this checkpoint (engine.vae).
            self.manager.apply_vae(loaded, request.vae or self.manager.settings.vae(loaded.entry.name))
            # Likewise CLIP skip: the infotext records the one that ran, as A1111's does.
            clip_skip = request.clip_skip or self.manager.settings.clip_skip(loaded.entry.name)
            request = replace(request, clip_skip=clip_skip)
            if clip_skip > 1 and not loaded.encoder.set_clip_skip(clip_skip):
                loaded.notes.append(f"CLIP skip {clip_skip} does not apply to {loaded.info.label} models: their "
                                    "text encoder's own layer is used (as in A1111)")
            return self.generator.run(request, loaded, job)  # checks first: cancelled while it waited

    # --- upscaling (extras) ---------------------------------------------------------------------
    def upscaler_names(self) -> list[str]:
        """"Lanczos", then the files in models/ESRGAN, RealESRGAN and SwinIR, then "SD x4: <model>"
        for each checkpoint in models/Stable-diffusion that is the SD x4 upscaler."""
        return self.upscalers.names()

    def hires_upscaler_names(self) -> tuple[str, ...]:
        """What hires fix may enlarge with: "Latent", "Lanczos", then the ESRGAN-family models."""
        return (*HIRES_UPSCALERS, *self.upscalers.hires_names())

    def default_upscale_tile(self, upscaler: str | None) -> int:
        """The tile size `upscaler` uses when none is given (the tab's slider follows it)."""
        return self.upscalers.default_tile(upscaler)

    def is_sd_upscaler(self, upscaler: str | None) -> bool:
        """Whether `upscaler` names an SD x4 upscaler checkpoint (the one that takes a prompt,
        steps, noise level and seed); RequestError naming `upscaler` when it names none."""
        return self.upscalers.resolve(upscaler).sd_x4

    def upscale(self, image, upscaler: str | None = None, scale=4, tile=None, job: Job | None = None,
                *, overlap=None, save: bool = True, prompt: str | None = None, negative_prompt: str | None = None,
                steps=None, noise_level=None, seed=None, cfg_scale=None) -> GenerationResult:
        """Upscale an opened image (engine.images.open_image) and publish it in outputs/upscale:
        watermark after upscaling, the source's infotext plus the Postprocess keys. `tile` None: the
        upscaler's default (256; the SD x4 upscaler's 128). prompt, negative_prompt, steps,
        cfg_scale (0-30, default 9), noise_level (0..the model's max_noise_level, default 20) and seed
        (-1/None: random) are the
        SD x4 upscaler's (the model is loaded through the manager, for upscaling only); the other
        upscalers ignore them."""
        sd = check_sd_options(prompt, negative_prompt, steps, noise_level, seed, cfg_scale)
        job = job or Job()
        with self.turns.turn(job):
            return self.upscalers.run(image, upscaler, scale, tile, overlap, job, save=save, sd=sd)

    # --- the machine ----------------------------------------------------------------------------
    def cuda_memory(self) -> dict | None:
        """The CUDA device's memory in A1111's /sdapi/v1/memory shape (torch's numbers), or None
        when there is no CUDA device."""
        if not self.hardware.cuda:
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()

        def pair(key: str) -> dict:
            return {"current": stats.get(f"{key}.all.current", 0), "peak": stats.get(f"{key}.all.peak", 0)}

        return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
                "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
                "inactive": pair("inactive_split_bytes"),
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}

    # --- PNG info -----------------------------------------------------------------------------
    def png_info(self, source) -> PngInfo:
        return read_png_info(source, self.watermarker)

    # --- demo ---------------------------------------------------------------------------------
    @classmethod
    def demo(cls, config: EngineConfig, hardware: Hardware | None = None) -> "Engine":
        """An engine whose only model is a tiny random-weight one (its images are noise), so the
        UI can be tried and tested with no checkpoint on disk."""
        from engine.tiny import save_sd1_folder

        models_dir = config.data_dir / "demo-models"
        folder = models_dir / "Stable-diffusion" / DEMO_MODEL_NAME
        if not (folder / "model_index.json").is_file():
            save_sd1_folder(folder)
        engine = cls(replace(config, models_dir=models_dir), hardware)
        engine.is_demo = True
        return engine

    is_demo = False


DEMO_MODEL_NAME = "demo-tiny-random (makes noise)"

def read_png_info(source, watermarker: Watermarker | None = None) -> PngInfo:
    """Parameters and watermark status of an image (a path, bytes or a PIL image), opened with the
    safe opener (size, pixel and text-chunk bounds: RequestError naming `image`). The parameters
    are for showing: control characters come back as visible escapes (`printable`)."""
    image = open_image(source, "image")
    text = read_infotext(image)
    text = printable(text) if text else text
    mark = (watermarker or Watermarker()).detect(image)
    return PngInfo(text, parse_infotext(text) if text else {}, mark)
