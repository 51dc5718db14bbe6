"""The ControlNet accordion of the txt2img and img2img tabs: up to three units, each in its own
tab (A1111's "ControlNet Unit 0/1/2"), with its picture, preprocessor, model, weight, guidance
window, control mode, resize mode, pixel perfect and the preprocessor's own sliders, and a
"Preview map" button that shows what the preprocessor makes of the picture before generating.

`ControlNetPanel.units(values)` turns the widgets' values (Gradio's {component: value} dict) into
the request's `controlnet` field, a unit per enabled tab, by name; the engine validates them
(engine/networks/control_units.py). No torch here.
"""
from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from engine.errors import RequestError
from engine.images import open_image
from engine.networks.control_units import CONTROL_MODES, MAX_UNITS, RANGES, RESIZE_MODES, parse_infotext
from engine.networks.preprocessors import PREPROCESSORS

NO_MODEL = "None"  # the model picker's value with no ControlNet on disk (A1111's word)
UNIT_FIELDS = ("enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode",
               "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")


def _slider_update(spec) -> dict:
    """A threshold slider as the preprocessor `spec` has it (label, default, range), or hidden."""
    if spec is None:
        return gr.update(visible=False)
    label, default, low, high = spec
    return gr.update(visible=True, label=label, value=default, minimum=low, maximum=high,
                     step=1 if float(default).is_integer() else 0.01)


class ControlNetPanel:
    """The accordion's widgets: `widgets[i][field]` for unit i."""

    def __init__(self, engine, mode: str, uploaded_image):
        self.engine, self.mode = engine, mode
        self.widgets: list[dict[str, Any]] = []
        self.previews: list[tuple[gr.Button, gr.Image]] = []
        self.uploads: list[gr.Image] = []  # each unit's picture input (its path goes to w["image"])
        models = engine.controlnet_names()
        with gr.Accordion("ControlNet", open=False, elem_id=f"{mode}-controlnet"):
            if not models:
                gr.Markdown("No ControlNet models yet: put them in models/ControlNet (A1111's folder), "
                            "e.g. lllyasviel's control_v11p_sd15_canny.", elem_id=f"{mode}-controlnet-empty")
            with gr.Tabs():
                for i in range(MAX_UNITS):
                    with gr.Tab(f"ControlNet Unit {i}", elem_id=f"{mode}-cn{i}-tab"):
                        self.widgets.append(self._unit(i, models, uploaded_image))

    def _unit(self, i: int, models: list[str], uploaded_image) -> dict[str, Any]:
        eid = f"{self.mode}-cn{i}"
        w: dict[str, Any] = {}
        w["enabled"] = gr.Checkbox(False, label="Enable", elem_id=f"{eid}-enabled")
        with gr.Row():
            upload = uploaded_image(label="Control picture", sources=["upload", "clipboard"],
                                    elem_id=f"{eid}-image", height=220)
            preview = gr.Image(label="Preprocessed map", interactive=False, height=220, elem_id=f"{eid}-map")
        # The upload's path reaches Generate through a State: an empty image input would otherwise be a
        # required parameter of the tab's API endpoint (gradio_client callers would have to send three).
        w["image"] = gr.State(None)
        self.uploads.append(upload)
        with gr.Row(equal_height=True):
            w["module"] = gr.Dropdown(list(PREPROCESSORS), value="none", label="Preprocessor", elem_id=f"{eid}-module")
            w["model"] = gr.Dropdown(models or [NO_MODEL], value=models[0] if models else NO_MODEL, label="Model",
                                     elem_id=f"{eid}-model")
            button = gr.Button("Preview map", size="sm", elem_id=f"{eid}-preview", min_width=110)
        with gr.Row():
            w["weight"] = gr.Slider(*RANGES["weight"], value=1.0, step=0.05, label="Control weight",
                                    elem_id=f"{eid}-weight")
            w["guidance_start"] = gr.Slider(*RANGES["guidance_start"], value=0.0, step=0.01,
                                            label="Starting control step", elem_id=f"{eid}-start")
            w["guidance_end"] = gr.Slider(*RANGES["guidance_end"], value=1.0, step=0.01,
                                          label="Ending control step", elem_id=f"{eid}-end")
        with gr.Row():
            w["processor_res"] = gr.Slider(*RANGES["processor_res"], value=512, step=8, label="Preprocessor resolution",
                                           elem_id=f"{eid}-res", visible=False)
            w["threshold_a"] = gr.Slider(0, 255, value=100, label="Threshold A", elem_id=f"{eid}-a", visible=False)
            w["threshold_b"] = gr.Slider(0, 255, value=200, label="Threshold B", elem_id=f"{eid}-b", visible=False)
        w["pixel_perfect"] = gr.Checkbox(False, label="Pixel perfect (the map at the picture's own resolution)",
                                         elem_id=f"{eid}-pixel-perfect")
        w["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode",
                                     elem_id=f"{eid}-control-mode")
        w["resize_mode"] = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize mode",
                                    elem_id=f"{eid}-resize-mode")
        self.previews.append((button, preview))
        return w

    def components(self) -> set:
        return {c for w in self.widgets for c in w.values()}

    def units(self, values: dict) -> list[dict]:
        """The enabled units' fields by name (their pictures opened within the image bounds)."""
        units = []
        for i, w in enumerate(self.widgets):
            unit = {name: values.get(w[name]) for name in UNIT_FIELDS}
            if not unit.pop("enabled"):
                continue
            if unit["image"] is None:
                raise RequestError(f"controlnet[{i}].image", f"ControlNet Unit {i} is enabled but has no picture")
            unit["image"] = open_image(unit["image"], f"controlnet[{i}].image")
            p = PREPROCESSORS.get(unit["module"])
            for name, spec in (("threshold_a", p and p.threshold_a), ("threshold_b", p and p.threshold_b)):
                if not spec:
                    unit.pop(name)  # a slider the preprocessor does not have: its default (-1)
            if p is None or not p.uses_resolution:
                unit.pop("processor_res")
            units.append(unit)
        return units

    def fill(self, parsed: dict) -> tuple[dict, list[str]]:
        """Updates that put an infotext's `ControlNet N` units into the tabs (their pictures are not
        in an infotext: the user drops them again), units the infotext lacks switched off; and warnings
        for what could not be taken (a model or preprocessor this Easel does not have)."""
        updates, warnings = {}, []
        titles = self.engine.controlnet_names()
        for i, w in enumerate(self.widgets):
            value = parsed.get(f"ControlNet {i}")
            if not isinstance(value, str):
                updates[w["enabled"]] = False
                continue
            pairs = parse_infotext(value)
            updates[w["enabled"]] = True
            model = pairs.get("Model", "")
            found = [t for t in titles if t == model] or [t for t in titles if t.split(" [")[0] == model.split(" [")[0]]
            if found:
                updates[w["model"]] = found[0]
            else:
                warnings.append(f"ControlNet {i}: model {model!r} is not in models/ControlNet")
            if pairs.get("Module") in PREPROCESSORS:
                updates[w["module"]] = pairs["Module"]
            elif pairs.get("Module"):
                warnings.append(f"ControlNet {i}: preprocessor {pairs['Module']!r} is not available here")
            for field, key in (("weight", "Weight"), ("guidance_start", "Guidance Start"),
                               ("guidance_end", "Guidance End"), ("processor_res", "Processor Res"),
                               ("threshold_a", "Threshold A"), ("threshold_b", "Threshold B")):
                number = _number(pairs.get(key))
                if number is not None and number >= 0:
                    updates[w[field]] = number
            if pairs.get("Control Mode") in CONTROL_MODES:
                updates[w["control_mode"]] = pairs["Control Mode"]
            if pairs.get("Resize Mode") in RESIZE_MODES:
                updates[w["resize_mode"]] = pairs["Resize Mode"]
            if pairs.get("Pixel Perfect") in ("True", "False"):
                updates[w["pixel_perfect"]] = pairs["Pixel Perfect"] == "True"
        return updates, warnings

    def wire(self, shows_errors) -> None:
        for w, upload, (button, preview) in zip(self.widgets, self.uploads, self.previews):
            upload.change(lambda path: path, upload, w["image"], queue=False, api_visibility="private")
            w["module"].change(_module_sliders, w["module"], [w["processor_res"], w["threshold_a"], w["threshold_b"]],
                               queue=False, api_visibility="private")
            button.click(shows_errors(functools.partial(_preview, self.engine)),
                         [upload, w["module"], w["processor_res"], w["threshold_a"], w["threshold_b"]], preview,
                         api_visibility="private")


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _module_sliders(module: str):
    p = PREPROCESSORS.get(module)
    if p is None:
        return gr.update(visible=False), gr.update(visible=False), gr.update(visible=False)
    return gr.update(visible=p.uses_resolution), _slider_update(p.threshold_a), _slider_update(p.threshold_b)


def _preview(engine, image, module, res, a, b):
    if image is None:
        raise gr.Error("image: drop a control picture first", print_exception=False)
    p = PREPROCESSORS.get(module)
    return engine.controlnet_detect(module, image, res if p and p.uses_resolution else -1,
                                    a if p and p.threshold_a else -1, b if p and p.threshold_b else -1)
