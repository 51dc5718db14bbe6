"""ModelManager: loads one checkpoint at a time and places it as its DevicePlan says.

The plan for a checkpoint comes from `devices.plan_for`, with the user's overrides in this order:
the command line's --device/--precision/--backend, then the precision and backend stored for that
checkpoint, then auto. A plan whose backend is OpenVINO gets the UNet, the VAE's decoder and encoder
and the text encoder(s) converted (or read from the cache) when the model loads; a part that fails
runs on torch and says why (the UNet failing puts the whole plan on torch).
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch

from engine.atomic import write_atomic
from engine.checkpoints import identify_model, load_pipeline, read_model_configs
from engine.devices import BACKENDS, DevicePlan, Hardware, Precision, cast_floating, plan_for
from engine.errors import EaselError, RequestError
from engine.families import FAMILIES, Family, FamilyInfo
from engine.library import ModelEntry, ModelLibrary, model_hash
from engine.prompts import PromptEncoder
from engine.request import RANGES

logger = logging.getLogger(__name__)

# What a user can say about a checkpoint's distillation (`app.py models --set-distilled`): "auto"
# lets the engine tell (an LCM UNet shows it in its config; a turbo file only in its name).
DISTILLATIONS = ("auto", "turbo", "none")

# What a model is loaded for: generating images (every family but the upscaler), or upscaling one
# (the SD x4 upscaler only: `engine.upscalers`).
PURPOSES = ("generate", "upscale")

# The inpainting pipeline for each txt2img pipeline: it takes 4-channel UNets too (masked img2img).
INPAINT_PIPELINES = {"StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
                     "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline"}

# Request defaults for few-step models, for the fields the user left out.
FEW_STEP_DEFAULTS = {
    # LCM: the LCM sampler; guidance goes in as an embedding, so CFG 1.5 costs no extra pass.
    "lcm": {"sampler": "LCM", "schedule_type": "Automatic", "steps": 4, "cfg_scale": 1.5},
    # Adversarially distilled (SD-Turbo, SDXL-Turbo): Euler a in 1-4 steps, no CFG (CFG 1 = one UNet pass).
    "turbo": {"sampler": "Euler a", "schedule_type": "Automatic", "steps": 4, "cfg_scale": 1.0},
}


class ModelSettings:
    """Per-checkpoint settings a user chose (precision, distillation), kept in a small JSON file."""

    def __init__(self, path: Path | None):
        self.path = path

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path or not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _write(self, name: str, key: str, value: str | int) -> None:
        if not self.path:
            return
        data = self._read()
        data.setdefault(name, {})[key] = value
        write_atomic(self.path, json.dumps(data, indent=1))

    def precision(self, name: str) -> str:
        return self._read().get(name, {}).get("precision", Precision.AUTO.value)

    def set_precision(self, name: str, precision: str) -> None:
        try:
            Precision(precision)
        except ValueError:
            raise RequestError("precision", f"must be one of {', '.join(p.value for p in Precision)}, got {precision!r}") from None
        self._write(name, "precision", precision)

    def backend(self, name: str) -> str:
        return self._read().get(name, {}).get("backend", "auto")

    def set_backend(self, name: str, backend: str) -> None:
        if backend not in BACKENDS:
            raise RequestError("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._write(name, "backend", backend)

    def distillation(self, name: str) -> str:
        return self._read().get(name, {}).get("distillation", "auto")

    def set_distillation(self, name: str, distillation: str) -> None:
        if distillation not in DISTILLATIONS:
            raise RequestError("distilled", f"must be one of {', '.join(DISTILLATIONS)}, got {distillation!r}")
        self._write(name, "distillation", distillation)

    def clip_skip(self, name: str) -> int:
        """The CLIP skip chosen for a checkpoint (1: the text encoder's last layer)."""
        value = self._read().get(name, {}).get("clip_skip", 1)
        low, high = RANGES["clip_skip"]
        return value if type(value) is int and low <= value <= high else 1

    def set_clip_skip(self, name: str, clip_skip: Any) -> int:
        low, high = RANGES["clip_skip"]
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, float)) or clip_skip != int(clip_skip) \
                or not low <= clip_skip <= high:
            raise RequestError("clip_skip", f"must be a whole number between {low} and {high}, got {clip_skip!r}")
        self._write(name, "clip_skip", int(clip_skip))
        return int(clip_skip)

    def vae(self, name: str) -> str:
        """The VAE chosen for a checkpoint: "Automatic" (its own) or a name in models/VAE."""
        return self._read().get(name, {}).get("vae", "Automatic")

    def set_vae(self, name: str, vae: str) -> None:
        """Checked against models/VAE by the caller (engine.vae.resolve_vae), who knows the library."""
        if not isinstance(vae, str) or not vae.strip():
            raise RequestError("vae", f"must be Automatic or a file name from models/VAE, got {vae!r}")
        self._write(name, "vae", vae.strip())


def distillation_of(entry: ModelEntry, said: str, unet_config: Mapping | None = None) -> tuple[str, str]:
    """(kind, why): kind is "lcm", "turbo" or "none". Turbo models have their base model's weights
    layout, so only the user's word or the file name can tell; the user's word wins."""
    if unet_config is not None and unet_config.get("time_cond_proj_dim") is not None:
        return "lcm", "its UNet takes a guidance embedding (LCM)"
    if said != "auto":
        return said, "as set with `app.py models --set-distilled`"
    if "turbo" in entry.stem.lower():
        return "turbo", "its file name says turbo; `app.py models --set-distilled NAME none` if it is not"
    return "none", ""


@dataclass(frozen=True)
class ModelFacts:
    """What validating a request needs to know about a checkpoint, read from its header and config
    files only (no weights are loaded): its family, its VAE's scale factor, and its distillation."""
    family: Family
    vae_scale_factor: int
    distillation: str  # "lcm", "turbo" or "none": see distillation_of
    distillation_why: str

    @property
    def info(self) -> FamilyInfo:
        return FAMILIES[self.family]

    def default_fields(self) -> dict:
        """Request defaults that suit this model better than A1111's, for fields the user left out."""
        return dict(FEW_STEP_DEFAULTS.get(self.distillation, {}))


@dataclass
class LoadedModel:
    entry: ModelEntry
    family: Family
    plan: DevicePlan
    pipe: Any
    hash: str
    encoder: PromptEncoder
    scheduler_config: dict
    distillation: str = "none"  # "lcm", "turbo" or "none": see distillation_of
    _pipelines: dict = field(default_factory=dict)  # other modes' pipelines, sharing `pipe`'s modules
    notes: list[str] = field(default_factory=list)
    loras: dict = field(default_factory=dict)  # peft adapter name -> its file's key (engine.lora)
    lora_weights: tuple = ()                   # ((adapter, te weight, unet weight), ...) now set
    openvino: Any = None  # engine.openvino_backend.OpenVINOUNet when the plan's backend is OpenVINO
    own_vae: Any = None          # the checkpoint's own VAE, kept (on the CPU while another is used)
    vae_name: str = "Automatic"  # the VAE in use: "Automatic" or its name in models/VAE
    vae_hash: str | None = None  # A1111's "VAE hash" of that file
    vae_key: tuple = ()          # (path, size, mtime) of the VAE file in use; () for Automatic

    @property
    def info(self) -> FamilyInfo:
        return FAMILIES[self.family]

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def name(self) -> str:
        return self.entry.stem

    @property
    def few_step(self) -> bool:
        """A distilled model (LCM, turbo) that needs only a few steps and no separate CFG pass."""
        return self.distillation != "none"

    def default_fields(self) -> dict:
        """Request defaults that suit this model better than A1111's, for fields the user left out."""
        return dict(FEW_STEP_DEFAULTS.get(self.distillation, {}))

    def pipeline(self, mode: str):
        """The pipeline for "txt2img", "img2img" or "inpaint" (masked img2img: the family's inpaint
        pipeline, which also runs 4-channel UNets, blending the unmasked latents back each step)."""
        if mode == "txt2img":
            return self.pipe
        if mode not in self._pipelines:
            import diffusers

            name = self.info.img2img_pipeline
            if mode == "inpaint" and not self.info.inpaint_unet:
                name = INPAINT_PIPELINES[self.info.pipeline]
            cls = getattr(diffusers, name)
            # from_pipe shares the loaded modules: no second copy of the weights.
            made = self.pipe if cls is type(self.pipe) else cls.from_pipe(self.pipe)
            made.set_progress_bar_config(disable=True)
            self._pipelines[mode] = made
        return self._pipelines[mode]


def _cast_unet_inputs(unet: torch.nn.Module) -> None:
    """Let a bf16/fp16 UNet sit in an fp32 pipeline: inputs are cast to the UNet's dtype and its
    output back to the latents' dtype, so the sampler's arithmetic stays in fp32. Not while
    OpenVINO runs the forward (engine.openvino_backend sets `_easel_openvino_pass`): its graph takes
    f32, and rounding the latents to bf16 on the way would only lose precision."""

    def before(module, args, kwargs):
        module._easel_out_dtype = args[0].dtype if args else kwargs.get("sample").dtype
        if getattr(module, "_easel_openvino_pass", False):
            return args, kwargs
        return cast_floating(args, module.dtype), cast_floating(kwargs, module.dtype)

    def after(module, args, kwargs, output):
        out_dtype = module._easel_out_dtype
        if isinstance(output, tuple):
            return tuple(o.to(out_dtype) if torch.is_tensor(o) else o for o in output)
        if hasattr(output, "sample"):
            output.sample = output.sample.to(out_dtype)
        return output

    unet.register_forward_pre_hook(before, with_kwargs=True)
    unet.register_forward_hook(after, with_kwargs=True)


def _prompt_encoder(pipe, plan: DevicePlan) -> PromptEncoder:
    encoders = [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    # SDXL base conditions an empty negative prompt on zeros (its config says so), as A1111 does.
    zero_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    return PromptEncoder(tokenizers, encoders, device=plan.torch_device, dtype=plan.text_encoder_dtype,
                         zero_empty_negative=zero_empty)


def place(pipe, plan: DevicePlan) -> None:
    """Move and cast the pipeline's parts as the plan says."""
    wanted = {"text_encoder": plan.text_encoder_dtype, "text_encoder_2": plan.text_encoder_dtype,
              "unet": plan.unet_dtype, "vae": plan.vae_dtype}
    for name, dtype in wanted.items():
        module = getattr(pipe, name, None)
        if module is not None and module.dtype != dtype:
            module.to(dtype=dtype)
    if plan.cpu_offload:
        pipe.enable_model_cpu_offload(device=plan.torch_device)
    else:
        pipe.to(plan.torch_device)
    if plan.attention_slicing:
        pipe.enable_attention_slicing()
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    if plan.upcast_attention:
        # Softmax in fp32: SD 2.x's attention logits overflow fp16. (SDPA kernels already
        # accumulate in fp32; this covers the sliced, non-SDPA path.)
        for module in pipe.unet.modules():
            if hasattr(module, "upcast_softmax"):
                module.upcast_softmax = True
                module.upcast_attention = True
    # Weights in channels-last make every conv's output channels-last too, so the layout
    # propagates through the network; the latents the sampler keeps stay in their own layout.
    layout = torch.channels_last if plan.channels_last else torch.contiguous_format
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=layout)
    if plan.device == "cpu" and plan.threads:
        torch.set_num_threads(plan.threads)


T = TypeVar("T")

OUT_OF_MEMORY_ON_CPU = "out of memory even on the CPU: try a smaller size or batch"


_OOM_WORDS = ("can't allocate memory", "out of memory", "ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's allocators raise torch.OutOfMemoryError; others a plain RuntimeError: the CPU's
    ("DefaultCPUAllocator: can't allocate memory"), cuBLAS ("CUBLAS_STATUS_ALLOC_FAILED"), a kernel
    launch ("CUDA error: out of memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in _OOM_WORDS)


class ModelManager:
    def __init__(self, library: ModelLibrary, hardware: Hardware, *, device: str = "auto",
                 precision: str = "auto", settings: ModelSettings | None = None, cache_dir: Path | None = None,
                 backend: str = "auto"):
        self.library = library
        self.hardware = hardware
        self.device = device
        self.precision = precision
        self.backend = backend
        self.settings = settings or ModelSettings(None)
        self.cache_dir = cache_dir
        self.current: LoadedModel | None = None
        self._families: dict[tuple, Family] = {}
        self._configs: dict[tuple, tuple] = {}
        self._lock = threading.RLock()
        # Fail at start-up on a bad --device/--precision/--backend, not at the first image.
        plan_for(FAMILIES[Family.SD1], hardware, device, precision, backend)

    def plan(self, entry: ModelEntry, family: Family) -> DevicePlan:
        precision = self.precision
        if precision == Precision.AUTO.value:
            precision = self.settings.precision(entry.name)
        backend = self.backend if self.backend != "auto" else self.settings.backend(entry.name)
        if not FAMILIES[family].generates:
            backend = "torch"  # the SD x4 upscaler's UNet takes a noise level the conversion does not cover
        return plan_for(FAMILIES[family], self.hardware, self.device, precision, backend)

    def identify(self, entry: ModelEntry) -> Family:
        """Cached by path, size and mtime: an SD 2.x file without a sidecar needs a UNet run to tell
        eps from v-prediction, too slow to repeat each time the model list is shown."""
        key = self._file_key(entry)
        if key not in self._families:
            self._families[key] = identify_model(entry.path)
        return self._families[key]

    def facts(self, entry: ModelEntry) -> ModelFacts:
        """The checkpoint's ModelFacts, from its header and config files (cached like identify);
        the distillation the user stated is read fresh, since they may change it any time."""
        key = self._file_key(entry)
        if key not in self._configs:
            family = self.identify(entry)
            self._configs[key] = (family, *read_model_configs(entry.path, family))
        family, vae_scale_factor, unet_config = self._configs[key]
        kind, why = distillation_of(entry, self.settings.distillation(entry.name), unet_config)
        return ModelFacts(family, vae_scale_factor, kind, why)

    @staticmethod
    def _file_key(entry: ModelEntry) -> tuple:
        try:
            stat = entry.path.stat()
        except FileNotFoundError:
            raise EaselError(f"model: {entry.name} is no longer on disk; refresh the model list") from None
        return str(entry.path), stat.st_size, stat.st_mtime_ns

    @staticmethod
    def _check_purpose(entry: ModelEntry, family: Family, purpose: str) -> None:
        """A generating checkpoint for "generate", the SD x4 upscaler for "upscale"."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
        info = FAMILIES[family]
        if purpose == "generate" and not info.generates:
            raise EaselError(f"model: {entry.name} is the {info.label}; it upscales images and "
                             "cannot generate them")
        if purpose == "upscale" and not info.upscaler:
            raise EaselError(f"model: {entry.name} is a {info.label} checkpoint; it generates images and is "
                             "not an upscaler")

    def load(self, name: str, purpose: str = "generate", on_status: Callable[[str], None] | None = None) -> LoadedModel:
        """The model `name`, loaded and placed; `purpose` "generate" (any generating family) or
        "upscale" (only the SD x4 upscaler, whose family cannot generate). `on_status` hears about
        a long step the user should know of (OpenVINO preparing the model the first time)."""
        with self._lock:
            entry = self.library.resolve(name)
            if self.current and self.current.entry == entry:
                self._check_purpose(entry, self.current.family, purpose)
                return self.current
            facts = self.facts(entry)
            family = facts.family
            self._check_purpose(entry, family, purpose)
            plan = self.plan(entry, family)
            self.unload()
            try:
                pipe = load_pipeline(entry.path, family, torch_dtype=plan.load_dtype)
            except OSError as error:
                # Deleted or changed on disk after it was listed.
                if not entry.path.exists():
                    raise EaselError(f"model: {entry.name} is no longer on disk; refresh the model list") from None
                lines = str(error).strip().splitlines()
                detail = error.strerror or (lines[0] if lines else type(error).__name__)
                raise EaselError(f"model: {entry.name} could not be read: {detail}") from None
            pipe.set_progress_bar_config(disable=True)
            scheduler_config = dict(pipe.scheduler.config)
            hash_cache = self.cache_dir / "hashes.json" if self.cache_dir else None
            checkpoint_hash = model_hash(entry.path, hash_cache)
            notes = list(plan.notes)  # what the plan could not honour (e.g. int8 without OpenVINO): said on the first job
            openvino = None
            if plan.backend == "openvino":  # before place(): the UNet is still in f32
                openvino, plan = self._prepare_openvino(pipe, checkpoint_hash, plan, notes, on_status)
            _cast_unet_inputs(pipe.unet)
            place(pipe, plan)
            encoder = _prompt_encoder(pipe, plan)
            self.current = LoadedModel(entry, family, plan, pipe, checkpoint_hash, encoder, scheduler_config,
                                       facts.distillation, notes=notes, own_vae=pipe.vae, openvino=openvino)
            return self.current

    def _openvino_cache(self):
        from engine.openvino_backend import OpenVINOCache

        # No data folder (a bare ModelManager): a cache in the system's temp folder, shared by such runs.
        return OpenVINOCache(self.cache_dir / "openvino" if self.cache_dir else
                             Path(tempfile.gettempdir()) / "easel-openvino")

    def _prepare_openvino(self, pipe, checkpoint_hash: str, plan: DevicePlan, notes: list[str],
                          on_status: Callable[[str], None] | None = None):
        """(the UNet compiled by OpenVINO, plan), or (None, the plan on torch) when converting or
        compiling it fails: the model still runs, on torch, and the first job's notes say why. The
        VAE and text encoders are hooked onto OpenVINO too (engine.openvino_parts), each on its own:
        one that fails stays on torch with a note, whatever the UNet did. On an Intel GPU, any
        failure moves the whole model to OpenVINO on the CPU, with a note."""
        if plan.on_intel_gpu:
            gpu_notes: list[str] = []
            try:
                compiled, gpu_plan = self._prepare_openvino_on(pipe, checkpoint_hash, plan, gpu_notes, on_status)
                failed = [n for n in gpu_notes if n.startswith("OpenVINO could not")]
                if compiled is not None and not failed:
                    notes.extend(gpu_notes)
                    return compiled, gpu_plan
                why = failed[0] if failed else "it did not compile"
            except Exception as error:  # noqa: BLE001 - the CPU is still there to run it
                why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            note = f"the Intel GPU could not run this model ({why}); OpenVINO runs it on the CPU"
            logger.warning("%s", note)
            notes.append(note)
            plan = replace(plan, openvino_device="CPU", notes=plan.notes + (note,))
        return self._prepare_openvino_on(pipe, checkpoint_hash, plan, notes, on_status)

    def _prepare_openvino_on(self, pipe, checkpoint_hash: str, plan: DevicePlan, notes: list[str],
                             on_status: Callable[[str], None] | None = None):
        """_prepare_openvino on the plan's OpenVINO device."""
        from engine.openvino_backend import prepare_unet
        from engine.openvino_parts import prepare_parts, text_encoder_parts, vae_parts

        cache = self._openvino_cache()
        device = plan.openvino_device
        compiled = None
        try:
            compiled = prepare_unet(pipe.unet, checkpoint_hash, cache, precision=plan.openvino_precision,
                                    threads=plan.threads, device=device, torch_dtype=plan.unet_dtype,
                                    on_convert=on_status, compression="int8" if plan.int8_weights else None)
        except Exception as error:  # noqa: BLE001 - any failure here must leave a model that runs
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            note = f"OpenVINO could not prepare this model ({type(error).__name__}: {detail}); running on torch"
            logger.warning("%s", note)
            notes.append(note)
            plan = replace(plan, backend="torch", int8_weights=False, notes=plan.notes + (note,))
        # f32, as the plan keeps these parts on the CPU (engine.openvino_parts says why).
        parts = prepare_parts(vae_parts(pipe.vae) + text_encoder_parts(pipe), checkpoint_hash, cache, notes,
                              threads=plan.threads, device=device, on_convert=on_status)
        prepared = [p for p in (compiled, *parts.values()) if p is not None]
        if any(not p.from_cache for p in prepared):
            weights = " with int8 weights" if compiled is not None and compiled.compression else ""
            where = "Intel GPU" if plan.on_intel_gpu else "CPU"
            notes.append(f"prepared this model for your {where} with OpenVINO{weights} in {sum(p.seconds for p in prepared):.0f} s; "
                         "cached, so later loads skip it")
        return compiled, plan

    def apply_vae(self, loaded: LoadedModel, name: str | None) -> None:
        """Decode with the VAE `name` ("Automatic"/None: the checkpoint's own, else a file in
        models/VAE, see engine.vae); nothing happens when it is already the one in use. The new VAE
        is placed as the model's plan says (device, dtype incl. an fp32-VAE fallback, tiling, offload)."""
        from engine.vae import AUTOMATIC, check_vae_kind, load_vae, resolve_vae

        with self._lock:
            choice = resolve_vae(self.library, name)
            key = () if choice is None else self._file_key(ModelEntry(choice.name, choice.path, False))
            if key == loaded.vae_key:
                return
            if choice is None:
                module, vae_name, vae_hash = loaded.own_vae, AUTOMATIC, None
            else:
                if loaded.info.upscaler:
                    raise RequestError("vae", f"the {loaded.info.label} keeps its own VAE")
                check_vae_kind(choice, loaded.family, loaded.info.label)
                module = load_vae(choice, loaded.own_vae)
                hash_cache = self.cache_dir / "hashes.json" if self.cache_dir else None
                vae_name, vae_hash = choice.name, model_hash(choice.path, hash_cache)
                self._openvino_vae(loaded, module, vae_hash)
            pipe = loaded.pipe
            if loaded.plan.cpu_offload:
                pipe.remove_all_hooks()  # place() below offloads again, the new VAE included
            if pipe.vae is loaded.own_vae:
                loaded.own_vae.to("cpu")  # kept for Automatic, off the accelerator meanwhile
            pipe.register_modules(vae=module)
            loaded._pipelines.clear()  # made with from_pipe: they hold the old VAE
            place(pipe, loaded.plan)
            loaded.vae_name, loaded.vae_hash, loaded.vae_key = vae_name, vae_hash, key
            if self.hardware.cuda:
                torch.cuda.empty_cache()

    def _openvino_vae(self, loaded: LoadedModel, module, vae_hash: str) -> None:
        """A chosen VAE runs on OpenVINO when the checkpoint's own does: converted from its own
        weights and cached under its file's hash (never the checkpoint's graph). One that fails
        stays on torch, and the next job's notes say so."""
        from engine.openvino_parts import attached, prepare_parts, vae_parts

        own = loaded.own_vae
        if own is None or (attached(own.decoder) is None and attached(own.encoder) is None):
            return
        parts = prepare_parts(vae_parts(module), vae_hash, self._openvino_cache(), loaded.notes,
                              threads=loaded.plan.threads, device=loaded.plan.openvino_device)
        if any(not p.from_cache for p in parts.values()):
            loaded.notes.append(f"prepared the VAE for your CPU with OpenVINO in "
                                f"{sum(p.seconds for p in parts.values()):.0f} s; cached, so later uses skip it")

    @contextmanager
    def use(self, name: str, purpose: str = "generate",
            on_status: Callable[[str], None] | None = None) -> Iterator[LoadedModel]:
        """The model `name`, loaded, for the duration of one job: nothing else loads, unloads or
        re-plans it until the job ends (other threads wait on the manager's lock). `purpose` and
        `on_status`: see load."""
        with self._lock:
            yield self.load(name, purpose, on_status)

    def unload(self) -> None:
        with self._lock:
            self.current = None
            if self.hardware.cuda:
                torch.cuda.empty_cache()

    def replan(self, loaded: LoadedModel, plan: DevicePlan) -> None:
        """Apply a new plan (a rung of the OOM ladder, or the fp32 VAE fix) to the loaded model.
        The pipeline ends up as the plan says, whichever plan it had before."""
        with self._lock:
            before = loaded.plan
            if before.cpu_offload and not plan.cpu_offload:
                loaded.pipe.remove_all_hooks()
            if before.attention_slicing and not plan.attention_slicing:
                loaded.pipe.disable_attention_slicing()
            if before.vae_tiling and not plan.vae_tiling:
                loaded.pipe.vae.disable_tiling()
            loaded.plan = plan
            if plan.backend != "openvino":
                loaded.openvino = None
            place(loaded.pipe, plan)
            embeddings = loaded.encoder.embeddings
            loaded.encoder = _prompt_encoder(loaded.pipe, plan)
            loaded.encoder.set_embeddings(embeddings)  # the job's textual inversions stay known
            if self.hardware.cuda:
                torch.cuda.empty_cache()

    def use_fp32_vae(self, loaded: LoadedModel) -> str:
        """The VAE gave NaN/inf in half precision (A1111's black images): keep it in fp32 for this
        model from now on, and say so."""
        self.replan(loaded, loaded.plan.with_fp32_vae())
        return loaded.plan.notes[-1]

    def step_down(self, loaded: LoadedModel) -> str:
        """After an out-of-memory error: move the loaded model one rung down the plan's ladder and
        say what was done; EaselError when the CPU is already the last rung."""
        lower = loaded.plan.step_down(self.hardware, loaded.info)
        if lower is None:
            raise EaselError(OUT_OF_MEMORY_ON_CPU)
        self.replan(loaded, lower)
        return lower.notes[-1]

    def with_fallback(self, loaded: LoadedModel, attempt: Callable[[], T], notes: list[str]) -> T:
        """Run attempt(); on out of memory step down (see step_down), note it and run it again.
        `attempt` must read the model's state afresh each time: a step down moves and recasts it."""
        while True:
            try:
                return attempt()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
            # Outside the except block: the failed attempt's frames, and the tensors they hold, are gone.
            notes.append(self.step_down(loaded))
