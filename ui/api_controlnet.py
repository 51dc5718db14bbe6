"""sd-webui-controlnet's API, for `ui.api.Api` (a base class of it, as ui/api_lists.py is): the
units of `alwayson_scripts.controlnet.args` in txt2img/img2img bodies (`controlnet_units`), and
/controlnet/version, /controlnet/model_list, /controlnet/module_list, /controlnet/detect.

The units' fields go to the engine by the extension's names; the engine validates them once
(engine/networks/control_units.py). A refusal names the field as the client sent it:
`alwayson_scripts.controlnet.args[0].weight`. No torch here.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, SkipValidation

from engine.errors import RequestError
from engine.images import decode_base64_image
from engine.networks.preprocessors import PREPROCESSORS

API_VERSION = 3  # what the extension's /controlnet/version answers since v1.1.448
ENGINE_FIELD = "controlnet"


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    controlnet_module: Annotated[str, SkipValidation] = "none"
    controlnet_input_images: Annotated[list, SkipValidation] = []
    controlnet_processor_res: Annotated[int, SkipValidation] = -1
    controlnet_threshold_a: Annotated[float, SkipValidation] = -1
    controlnet_threshold_b: Annotated[float, SkipValidation] = -1


def script_key(scripts: Any) -> str | None:
    """The key the body's alwayson_scripts gives ControlNet ("controlnet" or "ControlNet": clients
    spell it both ways, A1111 matches it case-insensitively)."""
    if not isinstance(scripts, dict):
        return None
    return next((k for k in scripts if isinstance(k, str) and k.lower() == ENGINE_FIELD), None)


def controlnet_units(scripts: Any) -> tuple[list | None, list[str]]:
    """(the engine's `controlnet` field: the units with their images decoded, or None; the other
    always-on scripts, which Easel ignores, as `alwayson_scripts.NAME`)."""
    if scripts in (None, {}):
        return None, []
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts", f"must be an object of script names, got {type(scripts).__name__}")
    key = script_key(scripts)
    ignored = [f"alwayson_scripts.{k}" for k in scripts if k != key]
    if key is None:
        return None, ignored
    value = scripts[key]
    args = value.get("args") if isinstance(value, dict) else value
    where = f"alwayson_scripts.{key}.args"
    if args is None:
        return None, ignored
    if not isinstance(args, list):
        raise RequestError(where, f"must be a list of units, got {type(args).__name__}")
    units = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise RequestError(f"{where}[{i}]", f"must be an object of unit fields, got {type(unit).__name__}")
        unit = dict(unit)
        for name in ("image", "input_image"):
            if name in unit and unit[name] not in (None, ""):
                unit[name] = _unit_image(unit[name], f"{where}[{i}].{name}")
            elif name in unit:
                del unit[name]
        units.append(unit)
    return units, ignored


def _unit_image(value: Any, field: str):
    """A unit's image as the extension takes it: base64, {"image": b64, "mask": b64} or [image, mask]
    (the mask is for inpaint modules, which Easel does not run yet)."""
    if isinstance(value, dict):
        value = value.get("image")
    elif isinstance(value, list) and value:
        value = value[0]
    return decode_base64_image(value, field)


def api_field(field: str, key: str = ENGINE_FIELD) -> str:
    """An engine refusal's field as the API client spelled it."""
    if field == ENGINE_FIELD or field.startswith(ENGINE_FIELD + "["):
        return f"alwayson_scripts.{key}.args{field[len(ENGINE_FIELD):]}"
    return field


class ControlNetRoutes:
    """The /controlnet/* handlers; `self.engine` is the Engine (see ui.api.Api)."""

    engine: Any

    def controlnet_version(self):
        return {"version": API_VERSION}

    def controlnet_model_list(self, update: bool = True):
        return {"model_list": self.engine.controlnet_names()}

    def controlnet_module_list(self, alias_names: bool = False):
        detail = {}
        for name, p in PREPROCESSORS.items():
            sliders = []
            if p.uses_resolution:
                sliders.append({"name": "Resolution", "value": p.default_res, "min": 64, "max": 2048, "step": 8})
            for spec in (p.threshold_a, p.threshold_b):
                if spec:
                    label, default, low, high = spec
                    sliders.append({"name": label, "value": default, "min": low, "max": high,
                                    "step": 1 if float(default).is_integer() else 0.01})
            detail[name] = {"model_free": True, "sliders": sliders}
        return {"module_list": list(PREPROCESSORS), "module_detail": detail}

    def controlnet_detect(self, body: DetectRequest):
        """The preprocessor's maps of the images, at processor_res (not fitted to a picture)."""
        import base64
        import io

        module = body.controlnet_module
        images = body.controlnet_input_images
        if not isinstance(images, list) or not images:
            raise RequestError("controlnet_input_images", "No image selected: give one or more base64 images")
        maps = []
        for i, b64 in enumerate(images):
            image = decode_base64_image(b64, f"controlnet_input_images[{i}]")
            maps.append(self.engine.controlnet_detect(module, image, body.controlnet_processor_res,
                                                      body.controlnet_threshold_a, body.controlnet_threshold_b))
        encoded = []
        for m in maps:
            out = io.BytesIO()
            m.save(out, format="PNG")
            encoded.append(base64.b64encode(out.getvalue()).decode("ascii"))
        return {"images": encoded, "info": "Success"}

