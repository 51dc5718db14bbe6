"""A ControlNet unit of a request: its fields as sd-webui-controlnet's API takes them, validated
once at the edge (`units_from`), and its infotext entry (`ControlNet 0: "Module: canny, ..."`).

A unit that is disabled, or whose weight is 0, is dropped here: it changes nothing, so the job runs
exactly as a plain one (same pixels). Every refusal names the field, as `controlnet[0].weight`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from engine.errors import RequestError
from engine.images import MAX_INPUT_PIXELS, open_image
from engine.networks.preprocessors import NEEDS_WEIGHTS, PREPROCESSORS

MAX_UNITS = 3
# sd-webui-controlnet's names and numbers; the API's older aliases map onto them.
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RANGES = {"weight": (0.0, 2.0), "guidance_start": (0.0, 1.0), "guidance_end": (0.0, 1.0),
          "processor_res": (64, 2048), "threshold": (0.0, 255.0)}
# Older names the extension still reads (its legacy_field_alias).
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
FIELDS = ("enabled", "image", "input_image", "guidance", "lowvram", "module", "model", "weight", "guidance_start", "guidance_end",
          "control_mode", "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b",
          # sent by sd-webui-controlnet's own clients and the plugins; Easel has no use for them
          "low_vram", "mask", "guessmode", "is_ui", "input_mode", "batch_images", "output_dir", "loopback",
          "save_detected_map", "hr_option", "union_control_type", "advanced_weighting", "inpaint_crop_input_image",
          "effective_region_mask", "ipadapter_input", "pulid_mode", "animatediff_batch", "batch_mask_dir",
          "batch_input_gallery", "batch_mask_gallery", "generated_image", "mask_image", "use_preview_as_input")


@dataclass(frozen=True)
class ControlUnit:
    image: Image.Image          # the unit's picture, RGB, before its preprocessor
    module: str                 # a key of engine.networks.preprocessors.PREPROCESSORS
    model: str                  # a ControlNet's name as the engine lists it ("name [hash8]" or its stem)
    weight: float = 1.0
    guidance_start: float = 0.0  # the fraction of the pass's steps where it starts and ends acting
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = 512
    threshold_a: float | None = None  # None: the preprocessor's default
    threshold_b: float | None = None

    def infotext(self, model_title: str) -> str:
        """The unit's infotext value, sd-webui-controlnet's order and spelling (the infotext writer
        quotes it as a whole, as A1111 quotes any value holding a comma)."""
        p = PREPROCESSORS[self.module]
        pairs = [("Module", self.module), ("Model", model_title), ("Weight", _num(self.weight)),
                 ("Resize Mode", self.resize_mode), ("Processor Res", str(self.processor_res)),
                 ("Threshold A", _threshold_text(self.threshold_a, p.threshold_a)),
                 ("Threshold B", _threshold_text(self.threshold_b, p.threshold_b)),
                 ("Guidance Start", _num(self.guidance_start)), ("Guidance End", _num(self.guidance_end)),
                 ("Pixel Perfect", str(self.pixel_perfect)), ("Control Mode", self.control_mode)]
        return ", ".join(f"{k}: {v}" for k, v in pairs)


def _num(value: float) -> str:
    return repr(float(value))


def _threshold_text(given: float | None, spec) -> str:
    """A threshold as the extension writes it: one sent as a float, a default as its slider has it,
    -1 for a preprocessor without that slider."""
    if given is not None:
        return _num(given)
    return str(spec[1]) if spec else "-1"


_INFOTEXT_PAIR = re.compile(r"\s*([A-Za-z ]+):\s*([^,]*)")


def parse_infotext(value: str) -> dict[str, str]:
    """A `ControlNet N` infotext value back into its pairs ({"Module": "canny", ...})."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    # The model title holds "name [hash]" and no comma; every pair is "Key: value".
    return {m.group(1).strip(): m.group(2).strip() for m in _INFOTEXT_PAIR.finditer(value)}


def units_from(raw: Any) -> tuple[ControlUnit, ...]:
    """The request's units from a list of unit mappings (the API's `alwayson_scripts.controlnet.args`,
    the page's accordion, the CLI's flags), the active ones only."""
    if raw is None or raw == ():
        return ()
    if isinstance(raw, dict):
        raw = raw.get("args", [])
    if not isinstance(raw, (list, tuple)):
        raise RequestError("controlnet", f"must be a list of units, got {type(raw).__name__}")
    if len(raw) > MAX_UNITS and sum(1 for u in raw if isinstance(u, dict) and _enabled(u)) > MAX_UNITS:
        raise RequestError("controlnet", f"at most {MAX_UNITS} enabled units, got {len(raw)}")
    units = []
    for i, unit in enumerate(raw):
        if isinstance(unit, ControlUnit):
            units.append(unit)
            continue
        if not isinstance(unit, dict):
            raise RequestError(f"controlnet[{i}]", f"must be an object of unit fields, got {type(unit).__name__}")
        parsed = _unit(unit, f"controlnet[{i}]")
        if parsed is not None:
            units.append(parsed)
    return tuple(units)


def _enabled(unit: dict) -> bool:
    # A unit that does not say is on: sd-webui-controlnet's default until v1.1.448 (its later
    # default, off, would drop an older client's unit without a word).
    return unit.get("enabled", True) not in (False, 0, "false", "False")


def _unit(raw: dict, where: str) -> ControlUnit | None:
    raw = {ALIASES.get(k, k) if ALIASES.get(k, k) not in raw else k: v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise RequestError(f"{where}.{unknown[0]}", f"unknown unit field; known: {', '.join(FIELDS[:14])}")
    if not _flag(raw.get("enabled", True), f"{where}.enabled"):
        return None
    weight = _number(raw.get("weight", 1.0), f"{where}.weight", RANGES["weight"])
    module = raw.get("module", "none")
    module = "none" if module in (None, "None") else module
    if module not in PREPROCESSORS:
        needs = " (it needs annotator weights Easel cannot fetch yet)" if module in NEEDS_WEIGHTS else ""
        raise RequestError(f"{where}.module", f"{module!r} is not a preprocessor here{needs}; "
                                              f"available: {', '.join(PREPROCESSORS)}")
    model = raw.get("model")
    if not isinstance(model, str) or model.strip() in ("", "None") or len(model) > 255 or not model.isprintable():
        raise RequestError(f"{where}.model", f"must name a ControlNet from models/ControlNet, got {model!r}")
    start = _number(raw.get("guidance_start", 0.0), f"{where}.guidance_start", RANGES["guidance_start"])
    end = _number(raw.get("guidance_end", 1.0), f"{where}.guidance_end", RANGES["guidance_end"])
    if end < start:
        raise RequestError(f"{where}.guidance_end", f"must be at least guidance_start ({start:g}), got {end:g}")
    p = PREPROCESSORS[module]
    res = raw.get("processor_res", -1)
    res = p.default_res if res in (None, -1) else int(_number(res, f"{where}.processor_res", RANGES["processor_res"]))
    image = raw.get("image")
    if isinstance(image, dict):  # sd-webui-controlnet's {"image": ..., "mask": ...}
        image = image.get("image")
    if image is None:
        raise RequestError(f"{where}.image", "the unit needs an image (base64 PNG/JPEG)")
    if not isinstance(image, (Image.Image, bytes, bytearray)):
        raise RequestError(f"{where}.image", f"must be an image, got {type(image).__name__}")
    if weight == 0:  # nothing to add: the job is the plain one, pixel for pixel
        return None
    return ControlUnit(
        image=open_image(image, f"{where}.image", max_pixels=MAX_INPUT_PIXELS),
        module=module, model=model.strip(), weight=weight, guidance_start=start, guidance_end=end,
        control_mode=_mode(raw.get("control_mode", 0), f"{where}.control_mode"),
        resize_mode=_resize(raw.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode"),
        pixel_perfect=_flag(raw.get("pixel_perfect", False), f"{where}.pixel_perfect"),
        processor_res=res,
        threshold_a=_threshold(raw.get("threshold_a"), f"{where}.threshold_a", p.threshold_a),
        threshold_b=_threshold(raw.get("threshold_b"), f"{where}.threshold_b", p.threshold_b))


def _number(value: Any, name: str, bounds: tuple[float, float]) -> float:
    low, high = bounds
    try:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
    except (TypeError, ValueError):
        raise RequestError(name, f"must be a number between {low:g} and {high:g}, got {value!r}") from None
    if not (math.isfinite(result) and low <= result <= high):
        raise RequestError(name, f"must be between {low:g} and {high:g}, got {value!r}")
    return result


def _threshold(value: Any, name: str, spec) -> float | None:
    if value is None or value == -1 or spec is None:  # -1: the preprocessor's default, as the extension reads it
        return None
    _label, _default, low, high = spec
    return _number(value, name, (low, high))


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(name, f"must be true or false, got {value!r}")


def _mode(value: Any, name: str) -> str:
    if type(value) is int and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if value in CONTROL_MODES:
        return value
    raise RequestError(name, f"must be one of {', '.join(CONTROL_MODES)} (or 0-2), got {value!r}")


def _resize(value: Any, name: str) -> str:
    if type(value) is int and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    value = RESIZE_ALIASES.get(value, value)
    if value in RESIZE_MODES:
        return value
    raise RequestError(name, f"must be one of {', '.join(RESIZE_MODES)} (or 0-2), got {value!r}")


def detect_map(module: Any, image: Image.Image, processor_res: Any = -1, threshold_a: Any = -1,
               threshold_b: Any = -1, prefix: str = "controlnet_") -> Image.Image:
    """/controlnet/detect: one picture's control map at processor_res, the fields validated as a
    unit's are (named `controlnet_module`, ... as the extension's body names them)."""
    from engine.networks.preprocessors import preprocess

    module = "none" if module in (None, "None") else module
    if module not in PREPROCESSORS:
        needs = " (it needs annotator weights Easel cannot fetch yet)" if module in NEEDS_WEIGHTS else ""
        raise RequestError(f"{prefix}module", f"{module!r} is not a preprocessor here{needs}; "
                                              f"available: {', '.join(PREPROCESSORS)}")
    p = PREPROCESSORS[module]
    res = p.default_res if processor_res in (None, -1) else \
        int(_number(processor_res, f"{prefix}processor_res", RANGES["processor_res"]))
    a = _threshold(threshold_a, f"{prefix}threshold_a", p.threshold_a)
    b = _threshold(threshold_b, f"{prefix}threshold_b", p.threshold_b)
    return preprocess(module, image, res, a, b)
