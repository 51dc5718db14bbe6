"""The generation request: one frozen dataclass, validated once at the edge.

CLI flags, UI widgets and HTTP JSON all arrive as a mapping of field name -> raw value.
`GenerationRequest.validate` coerces and range-checks each field and raises `RequestError` naming
the field and the allowed range. Inside the engine a request is trusted as-is.
"""
from __future__ import annotations

import dataclasses
import types
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from engine.errors import RequestError
from engine.images import MAX_INPUT_PIXELS, open_image
from engine.inpaint import MASKED_CONTENT, check_mask, mask_from_image
from engine.networks.control_units import units_from
from engine.prompt_syntax import weight_problem
from engine.samplers import DEFAULT_SAMPLER, check_sampler, split_legacy_name

MODES = ("txt2img", "img2img")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
# "exact": every step runs the whole UNet (the default, the reference image). "fast": reuse the
# UNet's deep features across steps (engine.feature_cache), ~2.5-3x faster, a slightly different image.
SPEEDS = ("exact", "fast")
MAX_SIDE = 3072  # a long side for panoramas; the area is what the pixel budget bounds
BUDGET_SIDE = 2048
MAX_PIXELS = BUDGET_SIDE * BUDGET_SIDE  # the pixel budget: a 2048x2048 image, or a wider one of the same area
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 20000

# field: (low, high) for numbers, inclusive
RANGES = {
    "steps": (1, 150),
    "cfg_scale": (0.0, 30.0),
    "batch_size": (1, 8),
    "batch_count": (1, 100),
    "denoising_strength": (0.0, 1.0),
    "seed": (-1, MAX_SEED),
    "hr_scale": (1.0, 4.0),
    "hr_second_pass_steps": (0, 150),
    "mask_blur": (0, 64),
    "inpaint_full_res_padding": (0, 256),
    "clip_skip": (1, 12),  # A1111's CLIP_stop_at_last_layers slider
    "codeformer_weight": (0.0, 1.0),  # A1111's code_former_weight: 0 restores the most
}
FACE_RESTORERS = ("GFPGAN", "CodeFormer")  # A1111's names (engine.faces finds their files)
MAX_VAE_NAME = 255
# Hires fix's built-in ways to enlarge the first pass (A1111's names). "Latent" enlarges the latents
# themselves (no decode in between); "Lanczos" decodes, resizes the picture, encodes again. The
# engine adds the ESRGAN-family models of its models folder (`Engine.hires_upscaler_names`).
HIRES_UPSCALERS = ("Latent", "Lanczos")
# diffusers' StableDiffusion(XL)Pipeline.check_inputs refuse a width or height not divisible by 8,
# whatever the VAE's scale factor (`if height % 8 != 0 or width % 8 != 0: raise ValueError`); the
# inpainting pipelines ask for the VAE's scale factor instead.
PIPELINE_SIZE_CHECK = 8


def size_multiple(vae_scale_factor: int) -> int:
    """What width and height must be a multiple of for a model, so that every size validation
    accepts also runs: the VAE's scale factor (pixels per latent) and the pipeline's own check.
    The UNet's downsampling adds nothing: diffusers' UNet2DConditionModel upsamples to the skip
    connections' sizes (forward_upsample_size) when a latent does not divide evenly."""
    return math.lcm(int(vae_scale_factor), PIPELINE_SIZE_CHECK)


def hires_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """Hires fix's final size: the first pass's size times `scale`, snapped down to the size step."""
    w, h = int(width * scale), int(height * scale)
    return max(multiple, w - w % multiple), max(multiple, h - h % multiple)


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for, in one place: validation enforces it, the page's sliders and
    choices are built from it, so the two cannot drift apart."""
    ranges: Mapping[str, tuple[float, float]]
    min_side: int  # before the model's size step; the real minimum is the step itself
    max_side: int
    max_pixels: int
    max_prompt_chars: int
    modes: tuple[str, ...]
    resize_modes: tuple[str, ...]
    speeds: tuple[str, ...]
    hires_upscalers: tuple[str, ...]
    masked_content: tuple[str, ...] = MASKED_CONTENT
    face_restorers: tuple[str, ...] = FACE_RESTORERS


LIMITS = RequestLimits(types.MappingProxyType(RANGES), 64, MAX_SIDE, MAX_PIXELS, MAX_PROMPT_CHARS, MODES,
                       RESIZE_MODES, SPEEDS, HIRES_UPSCALERS)


@dataclass(frozen=True)
class GenerationRequest:
    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1  # -1: pick one at random when the job runs
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    schedule_type: str = "Automatic"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    init_image: Any = None  # PIL.Image for img2img
    denoising_strength: float = 0.75
    resize_mode: str = "just resize"
    save_images: bool = True
    save_grid: bool = False
    speed: str = "exact"
    # Hires fix (txt2img): generate at width x height, enlarge by hr_scale with hr_upscaler, then an
    # img2img pass at denoising_strength for hr_second_pass_steps (0: as many as `steps`).
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    # Inpainting (img2img with a mask, A1111's names): white in the mask is redrawn (engine.inpaint).
    mask: Any = None  # PIL "L" once validated
    mask_blur: int = 4
    inpainting_fill: str = "original"  # one of MASKED_CONTENT; A1111's API numbers 0-3 are taken too
    inpaint_full_res: bool = False     # inpaint area: False "Whole picture", True "Only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False  # True: redraw what the mask leaves black
    # The VAE: None for the one remembered for the checkpoint, "Automatic" for its own, or a file
    # name in models/VAE (the engine resolves it; engine.vae).
    vae: str | None = None
    # CLIP skip (A1111's "Clip skip"): None for the one remembered for the checkpoint (1 unless set,
    # anime SD 1.5 fine-tunes want 2); 1 the text encoder's last layer, n the n-th from the end.
    clip_skip: int | None = None
    # Seamless tiling (A1111's "Tiling"): every convolution of the UNet and the VAE pads circularly,
    # so the picture repeats without seams left/right and top/bottom.
    tiling: bool = False
    # Restore faces (A1111's): after decoding, each face found is redrawn by GFPGAN or CodeFormer and
    # blended back (engine.faces). face_restorer None (or "Automatic"): the first on disk (the engine fills
    # in the one that ran); codeformer_weight is CodeFormer's fidelity, ignored by GFPGAN.
    restore_faces: bool = False
    face_restorer: str | None = None
    codeformer_weight: float = 0.5
    # ControlNet units (engine.networks.control_units.ControlUnit), the active ones only: a disabled
    # unit or one at weight 0 is dropped when validated, so the job is the plain one.
    controlnet: tuple = ()

    @property
    def total_images(self) -> int:
        return self.batch_size * self.batch_count

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def validate(cls, fields: Mapping[str, Any], *, size_multiple: int,
                 hires_upscalers: tuple[str, ...] = HIRES_UPSCALERS) -> "GenerationRequest":
        """Build a request from raw values; `size_multiple` is the model's size step (see
        `size_multiple`), `hires_upscalers` the names hr_upscaler may take (the built-ins and the
        upscaler models on disk)."""
        unknown = sorted(set(fields) - set(cls.field_names()))
        if unknown:
            raise RequestError(unknown[0], f"unknown field; known fields: {', '.join(cls.field_names())}")
        for name in cls.field_names():  # any text field, before it is compared or echoed
            value = fields.get(name)
            problem = unpaired_surrogate(value) if isinstance(value, str) else None
            if problem:
                raise RequestError(name, problem)
        defaults = cls()
        raw = {name: fields.get(name) for name in cls.field_names()}
        raw = {k: (getattr(defaults, k) if v is None else v) for k, v in raw.items()}

        mode = _choice("mode", raw["mode"], MODES)
        values: dict[str, Any] = {"mode": mode}
        values["prompt"] = _text("prompt", raw["prompt"])
        values["negative_prompt"] = _text("negative_prompt", raw["negative_prompt"])
        for name in ("seed", "steps", "batch_size", "batch_count", "hr_second_pass_steps", "mask_blur",
                     "inpaint_full_res_padding"):
            values[name] = _int(name, raw[name])
        for name in ("cfg_scale", "denoising_strength", "hr_scale", "codeformer_weight"):
            values[name] = _float(name, raw[name])
        sampler, legacy_schedule = split_legacy_name(str(raw["sampler"]))
        schedule = str(raw["schedule_type"])
        if legacy_schedule and schedule == "Automatic":
            schedule = legacy_schedule
        check_sampler(sampler, schedule)
        values["sampler"], values["schedule_type"] = sampler, schedule
        values["resize_mode"] = _choice("resize_mode", raw["resize_mode"], RESIZE_MODES)
        values["speed"] = _choice("speed", raw["speed"], SPEEDS)
        values["save_images"] = _bool("save_images", raw["save_images"])
        values["save_grid"] = _bool("save_grid", raw["save_grid"])
        values["enable_hr"] = _bool("enable_hr", raw["enable_hr"])
        values["tiling"] = _bool("tiling", raw["tiling"])
        values["restore_faces"] = _bool("restore_faces", raw["restore_faces"])
        restorer = _choice("face_restorer", raw["face_restorer"] or "Automatic", ("Automatic", *FACE_RESTORERS))
        values["face_restorer"] = None if restorer == "Automatic" else restorer
        for name in ("inpaint_full_res", "inpainting_mask_invert"):  # A1111's API sends 0/1
            value = raw[name]
            values[name] = _bool(name, bool(value) if type(value) is int and value in (0, 1) else value)
        fill = raw["inpainting_fill"]
        if type(fill) is int and 0 <= fill < len(MASKED_CONTENT):
            fill = MASKED_CONTENT[fill]
        values["inpainting_fill"] = _choice("inpainting_fill", fill, MASKED_CONTENT)
        values["vae"] = _vae_name(raw["vae"])
        values["clip_skip"] = None if raw["clip_skip"] is None else _int("clip_skip", raw["clip_skip"])
        values["hr_upscaler"] = _choice("hr_upscaler", raw["hr_upscaler"], tuple(hires_upscalers))
        if values["enable_hr"] and mode != "txt2img":
            raise RequestError("enable_hr", "hires fix is for txt2img; img2img sets its size directly")

        values["controlnet"] = units_from(raw["controlnet"])
        values["init_image"] = _init_image(raw["init_image"], mode)
        values["mask"] = _mask(raw["mask"], mode, values["init_image"], values["inpainting_mask_invert"])
        width_given = fields.get("width") is not None or fields.get("height") is not None
        values.update(_sizes(raw, values, width_given, size_multiple))
        return cls(**values)


def _init_image(init: Any, mode: str) -> Image.Image | None:
    """img2img's init image, opened and checked (RGB); no other mode takes one."""
    if mode == "img2img":
        if init is None:
            raise RequestError("init_image", "img2img needs an init image")
        if not isinstance(init, (Image.Image, bytes, bytearray)):
            # Never a path: over HTTP that would read the server's files. Doors that take a file
            # open it with engine.images.open_image; JSON sends base64 (decode_base64_image).
            raise RequestError("init_image", f"must be an image, got {type(init).__name__}")
        return open_image(init, "init_image", max_pixels=MAX_INPUT_PIXELS)
    if init is not None:
        raise RequestError("init_image", "only img2img takes an init image")
    return None


def _sizes(raw: Mapping[str, Any], values: Mapping[str, Any], width_given: bool,
           size_multiple: int) -> dict[str, int]:
    """width and height (img2img without them: the init image's, fitted), inside the pixel budget,
    and for hires fix the enlarged size inside it too."""
    if values["mode"] == "img2img" and not width_given:
        width, height = fit_size(values["init_image"].size, size_multiple)
    else:
        width = _size("width", raw["width"], size_multiple)
        height = _size("height", raw["height"], size_multiple)
    if width * height > MAX_PIXELS:
        raise RequestError("width", f"{width}x{height} is over the pixel budget "
                                    f"of {MAX_PIXELS} pixels ({BUDGET_SIDE}x{BUDGET_SIDE})")
    if values["enable_hr"]:
        w, h = hires_size(width, height, values["hr_scale"], size_multiple)
        if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
            raise RequestError("hr_scale", f"{values['hr_scale']:g} makes {w}x{h}, over the pixel budget of "
                                           f"{MAX_PIXELS} pixels ({BUDGET_SIDE}x{BUDGET_SIDE}, sides up to {MAX_SIDE})")
    return {"width": width, "height": height}


def _mask(mask: Any, mode: str, init: Image.Image | None, invert: bool) -> Image.Image | None:
    """An inpainting mask: an image the init image's size (opened like it, keeping transparency),
    as "L" (engine.inpaint.mask_from_image)."""
    if mask is None:
        return None
    if mode != "img2img":
        raise RequestError("mask", "only img2img takes a mask (inpainting)")
    if not isinstance(mask, (Image.Image, bytes, bytearray)):
        raise RequestError("mask", f"must be an image, got {type(mask).__name__}")
    mask = mask_from_image(open_image(mask, "mask", max_pixels=MAX_INPUT_PIXELS, keep_alpha=True))
    check_mask(mask, init, invert)
    return mask


def _vae_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_VAE_NAME or not value.isprintable():
        raise RequestError("vae", f"must be Automatic or a file name from models/VAE, got {value!r}")
    return value.strip()


def fit_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """An init image's size, shrunk into the pixel budget and snapped down to the size step."""
    w, h = size
    scale = min(1.0, math.sqrt(MAX_PIXELS / max(1, w * h)), MAX_SIDE / max(w, h))
    w, h = int(w * scale), int(h * scale)
    return max(multiple, w - w % multiple), max(multiple, h - h % multiple)


def _range_error(name: str, value: Any) -> RequestError:
    low, high = RANGES[name]
    return RequestError(name, f"must be between {low} and {high}, got {value!r}")


def _int(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError
        result = int(as_float)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(name, f"must be a whole number between {RANGES[name][0]} and {RANGES[name][1]}, got {value!r}") from None
    low, high = RANGES[name]
    if not low <= result <= high:
        raise _range_error(name, value)
    return result


def a1111_count(value: Any) -> Any:
    """A step count as A1111's API reads it: a finite fractional number cut toward zero (pydantic's
    int() of a JSON 20.7 is 20); anything else, text included, as given, for validation to judge.
    Only the API uses it: the page and the CLI refuse a fractional count, naming the field."""
    if type(value) is float and math.isfinite(value) and not value.is_integer():
        return math.trunc(value)
    return value


def _float(name: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
    except (TypeError, ValueError):
        raise RequestError(name, f"must be a number between {RANGES[name][0]} and {RANGES[name][1]}, got {value!r}") from None
    low, high = RANGES[name]
    if not (math.isfinite(result) and low <= result <= high):
        raise _range_error(name, value)
    return result


def _size(name: str, value: Any, multiple: int) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        result = int(value) if float(value).is_integer() else None
    except (TypeError, ValueError, OverflowError):
        result = None
    if result is None or not multiple <= result <= MAX_SIDE or result % multiple:
        raise RequestError(name, f"must be a multiple of {multiple} between {multiple} and {MAX_SIDE}, got {value!r}")
    return result


_SURROGATE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(value: str) -> str | None:
    """Why `value` is not valid Unicode text (one phrase), or None. A lone UTF-16 surrogate
    (U+D800-U+DFFF) reaches a str through JSON's "\\ud800" escape or argv's surrogateescape
    (a byte that is not UTF-8); it cannot be encoded, so tokenizers, PNG text chunks and JSON
    answers all fail on it. Positions count from 1, as the other text refusals do."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (f"contains an unpaired surrogate U+{ord(found.group()):04X} at position {found.start() + 1}; "
            f"text must be valid Unicode")


def _text(name: str, value: Any) -> str:
    """A prompt: text of at most MAX_PROMPT_CHARS characters, valid Unicode (no lone surrogate),
    line ends made "\n", no control characters but tab and newline (they would be stored in the
    PNG and reach whoever prints its parameters in a terminal), weights in range (see
    engine.prompts.weight_problem)."""
    if not isinstance(value, str):
        raise RequestError(name, f"must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"is {len(value)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    surrogate_problem = unpaired_surrogate(value)
    if surrogate_problem:
        raise RequestError(name, surrogate_problem)
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    for position, char in enumerate(value):
        if char not in "\t\n" and unicodedata.category(char) == "Cc":
            raise RequestError(name, f"contains the control character U+{ord(char):04X} at position {position + 1}; "
                                     f"only tab and newline are allowed")
    problem = weight_problem(value)
    if problem:
        raise RequestError(name, problem)
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RequestError(name, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(name, f"must be true or false, got {value!r}")
