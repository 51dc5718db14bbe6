"""The page: `create_ui(engine)` builds the Gradio Blocks and wires widgets to `Studio`.

Each generation tab keeps its widgets in a dict {request field name: component}; handlers get
the values back as a dict by the same names (Gradio passes a {component: value} dict when the
inputs are given as a set), so nothing depends on widget order.

Generation and model loading share one concurrency id with limit 1: one job at a time on the
device, the rest wait in Gradio's bounded queue, which shows each page its position.
"""
from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from engine.errors import CancelledError, EaselError
from engine.prompt_syntax import add_lora_tag
from ui.controlnet_panel import ControlNetPanel
from ui.downloads_tab import DownloadsPanel, cancel_look, wire_downloads
from ui.handlers import Studio
from ui.progress import progress_html
from ui.settings import SettingsStore

log = logging.getLogger(__name__)

GENERATION = "generation"  # concurrency id shared by every event that uses the device
SIZE_STEP_WITHOUT_MODEL = 8  # only shown while no model exists; a model's own VAE scale factor replaces it


def uploaded_image(**kwargs) -> gr.Image:
    """An image input that hands the handler the uploaded file's path, unopened.

    gr.Image opens every upload with Pillow before the handler runs, so a zero-byte file, a
    non-image or a header claiming 20000x20000 pixels would fail inside Gradio with a bare "Error".
    Here the handler gets the path and `engine.images.open_image` checks size, header and pixel
    budget before decoding, and says what is wrong in one line naming the field. (A per-instance
    preprocess, not a subclass: Gradio writes a .pyi stub beside the module of every component
    subclass at import time, which fails where the install is read-only.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    component.preprocess = functools.partial(_unopened_upload, component.GRADIO_CACHE)
    return component


def _unopened_upload(cache_dir: str, payload):
    if payload is None:
        return None
    if payload.path is not None:
        return str(payload.path)
    if payload.url and payload.url.startswith("data:"):  # a pasted image: its bytes, still undecoded
        try:
            data = base64.b64decode(payload.url.partition(",")[2], validate=False)
        except (binascii.Error, ValueError):
            data = payload.url.encode()  # the opener will say it is not an image
        os.makedirs(cache_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="pasted-", suffix=".img", dir=cache_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path
    return None


def mask_editor(**kwargs) -> gr.ImageMask:
    """A mask painted over the init image. Like `uploaded_image`, the handler gets files, unopened
    (Gradio's own preprocess decodes every layer with Pillow): `Studio` opens the painted layers
    with the safe opener, which bounds them before decoding."""
    component = gr.ImageMask(type="filepath", image_mode="RGBA", layers=False, transforms=(),
                             brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24), **kwargs)
    component.preprocess = functools.partial(_unopened_layers, component)
    return component


def _unopened_layers(component, payload):
    """{"layers": [file path, ...]} of the painted layers. The editor sends them as files or, in
    Gradio 6, as blobs kept under the payload's id: those are written to Gradio's cache, undecoded."""
    if payload is None:
        return None
    layers = []
    if payload.id is not None:
        cached = component.blob_storage.get(payload.id)
        for data in (cached.layers if cached else None) or []:
            if data:
                os.makedirs(component.GRADIO_CACHE, exist_ok=True)
                fd, path = tempfile.mkstemp(prefix="mask-", suffix=".img", dir=component.GRADIO_CACHE)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                layers.append(path)
    else:
        layers = [str(layer.path) for layer in payload.layers or [] if layer is not None and layer.path is not None]
    return {"layers": layers}


def inpaint_fields(limits) -> tuple[dict[str, Any], gr.Image]:
    """The img2img tab's Inpaint accordion: request fields by name, and the mask upload (used
    instead of the painted mask when given)."""
    with gr.Accordion("Inpaint", open=False, elem_id="img2img-inpaint"):
        f = {"mask": mask_editor(label="Paint the area to redraw (white)", elem_id="img2img-mask", height=280)}
        upload = uploaded_image(label="…or upload a mask (white: redraw, black: keep)", sources=["upload"],
                                elem_id="img2img-mask-upload", height=160)
        with gr.Row():
            f["mask_blur"] = gr.Slider(*limits.ranges["mask_blur"], value=4, step=1, label="Mask blur",
                                       elem_id="img2img-mask-blur")
            f["inpainting_mask_invert"] = gr.Checkbox(False, label="Inpaint not masked (invert the mask)",
                                                      elem_id="img2img-mask-invert")
        f["inpainting_fill"] = gr.Radio(list(limits.masked_content), value="original", label="Masked content",
                                        elem_id="img2img-inpainting-fill")
        with gr.Row():
            f["inpaint_full_res"] = gr.Checkbox(False, label="Inpaint area: only masked (else the whole picture)",
                                                elem_id="img2img-inpaint-full-res")
            f["inpaint_full_res_padding"] = gr.Slider(*limits.ranges["inpaint_full_res_padding"], value=32, step=4,
                                                      label="Only masked padding, pixels",
                                                      elem_id="img2img-inpaint-padding")
    return f, upload


def _readable(error: EaselError) -> gr.Error:
    return gr.Error(str(error).splitlines()[0] if str(error) else type(error).__name__, print_exception=False)


def shows_errors(handler):
    """An EaselError from `handler` becomes the page's one-line error message. (functools.wraps keeps
    the signature Gradio inspects.)"""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except EaselError as e:
            raise _readable(e) from None
    return wrapped


def hires_fields(limits, upscalers: tuple[str, ...]) -> dict[str, Any]:
    """The txt2img tab's Hires. fix accordion, as request fields by name; `upscalers`: Latent,
    Lanczos and the upscaler models (`Engine.hires_upscaler_names`)."""
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img-hires"):
        f = {"enable_hr": gr.Checkbox(False, label="Hires. fix: generate at this size, enlarge, then refine with a "
                                                   "second pass", elem_id="txt2img-enable-hr")}
        with gr.Row():
            f["hr_upscaler"] = gr.Dropdown(list(upscalers), value=upscalers[0],
                                           label="Upscaler", elem_id="txt2img-hr-upscaler")
            f["hr_scale"] = gr.Slider(*limits.ranges["hr_scale"], value=2.0, step=0.05, label="Upscale by",
                                      elem_id="txt2img-hr-scale")
        with gr.Row():
            f["hr_second_pass_steps"] = gr.Slider(*limits.ranges["hr_second_pass_steps"], value=0, step=1,
                                                  label="Hires steps (0: same as Steps)", elem_id="txt2img-hr-steps")
            f["denoising_strength"] = gr.Slider(*limits.ranges["denoising_strength"], value=0.7, step=0.01,
                                                label="Denoising strength", elem_id="txt2img-denoising-strength")
    return f


def idle_cancel_button(elem_id: str, **kwargs) -> gr.Button:
    """A Cancel button as the page first shows it: idle until a job starts (`cancel_look`)."""
    return gr.Button("Cancel", variant="secondary", interactive=False, elem_id=elem_id, **kwargs)


class GenerationTab:
    """Widgets and events of one generation tab (txt2img or img2img)."""

    vae = None  # the page's VAE picker, set by create_ui: its value goes into each request as `vae`
    clip_skip = None  # the page's Clip skip slider, set by create_ui: remembered per checkpoint, not sent
    mask_upload = None  # img2img: an uploaded mask, used instead of the painted one

    def __init__(self, studio: Studio, mode: str, model: gr.Dropdown, demo: bool, model_fields: dict):
        self.studio, self.mode, self.model = studio, mode, model
        self.fields: dict[str, Any] = {}
        self._prompt_row()
        with gr.Row():
            with gr.Column():
                self._settings_column(demo, model_fields)
            with gr.Column():
                self._results_column()
        self.selected = gr.State(0)  # the gallery image last clicked: what "Send to upscale" sends
        self.last_seed = gr.State(None)
        self.infotexts = gr.State(())
        self.job_token = gr.State(None)  # this click's job, set when Generate is clicked

    def _prompt_row(self) -> None:
        f, mode, engine = self.fields, self.mode, self.studio.engine
        with gr.Row():
            with gr.Column(scale=4):
                f["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{mode}-prompt",
                                         placeholder="what to draw; (word:1.2) to weigh a word")
                f["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{mode}-negative-prompt",
                                                  placeholder="what to avoid")
                with gr.Row(equal_height=True):
                    # Not a request field: the button writes <lora:NAME:1> into the prompt, as A1111's cards do.
                    self.lora = gr.Dropdown(engine.lora_names(), value=None, label="LoRA (models/Lora, models/LyCORIS)",
                                            elem_id=f"{mode}-lora", scale=4)
                    self.add_lora = gr.Button("Add to prompt", elem_id=f"{mode}-add-lora", scale=1, min_width=120)
                self._edit_styles_accordion()
            with gr.Column(scale=1, min_width=160):
                self.generate_button = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                self.cancel_button = idle_cancel_button(f"{mode}-cancel")
                # Not a request field: applied to the prompts, in order, when Generate is clicked (A1111's styles).
                self.styles = gr.Dropdown(engine.style_names(), value=[], multiselect=True, label="Styles",
                                          elem_id=f"{mode}-styles", info=f"{STYLES_INFO}")
                self.apply_styles = gr.Button("Apply styles", size="sm", elem_id=f"{mode}-apply-styles")

    def _edit_styles_accordion(self) -> None:
        """Save this tab's prompt and negative prompt as a named style (a name in use is overwritten), or
        delete one; wired with the other tab's picker by `wire_styles`."""
        mode = self.mode
        with gr.Accordion("Edit styles", open=False, elem_id=f"{mode}-edit-styles"):
            with gr.Row(equal_height=True):
                self.style_name = gr.Textbox(label="Style name", max_lines=1, elem_id=f"{mode}-style-name", scale=3,
                                             info="Save: this tab's prompt and negative prompt under this name "
                                                  "(put {prompt} where your prompt goes; a name in use is overwritten)")
                self.save_style = gr.Button("Save style", elem_id=f"{mode}-save-style", scale=1, min_width=100)
                self.delete_style = gr.Button("Delete style", variant="stop", elem_id=f"{mode}-delete-style",
                                              scale=1, min_width=100)
            self.style_note = gr.Markdown("", elem_id=f"{mode}-style-note")

    def _settings_column(self, demo: bool, model_fields: dict) -> None:
        f, mode, engine = self.fields, self.mode, self.studio.engine
        limits = engine.limits  # every range and choice below comes from the engine's request limits
        side = 128 if demo else 512
        if mode == "img2img":
            f["init_image"] = uploaded_image(label="Init image", sources=["upload", "clipboard"],
                                             elem_id="img2img-init-image", height=280)
            f["denoising_strength"] = gr.Slider(*limits.ranges["denoising_strength"], value=0.75, step=0.01,
                                                label="Denoising strength", elem_id="img2img-denoising-strength")
            f["resize_mode"] = gr.Radio(list(limits.resize_modes), value=limits.resize_modes[0],
                                        label="Resize mode", elem_id="img2img-resize-mode")
            inpaint, self.mask_upload = inpaint_fields(limits)
            f.update(inpaint)
        with gr.Row():
            f["sampler"] = gr.Dropdown(list(engine.samplers), value=engine.samplers[0], label="Sampler",
                                       elem_id=f"{mode}-sampler")
            f["schedule_type"] = gr.Dropdown(list(engine.schedule_types), value="Automatic", label="Schedule type",
                                             elem_id=f"{mode}-schedule-type")
        f["steps"] = gr.Slider(*limits.ranges["steps"], value=model_fields.get("steps", {}).get("value", 4 if demo else 20), step=1,
                               label="Steps", elem_id=f"{mode}-steps")
        f["cfg_scale"] = gr.Slider(*limits.ranges["cfg_scale"], value=model_fields.get("cfg_scale", {}).get("value", 7.0), step=0.5,
                                   label="CFG scale", elem_id=f"{mode}-cfg-scale")
        with gr.Row():
            step = model_fields.get("width", {}).get("step", SIZE_STEP_WITHOUT_MODEL)
            f["width"] = gr.Slider(limits.min_side, limits.max_side, value=side, step=step, label="Width", elem_id=f"{mode}-width")
            f["height"] = gr.Slider(limits.min_side, limits.max_side, value=side, step=step, label="Height", elem_id=f"{mode}-height")
        with gr.Row(equal_height=True):
            f["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{mode}-seed", scale=4)
            # Words, not emoji: without an emoji font (Debian's Chromium) a 🎲 is an empty box.
            self.random_seed = gr.Button("Random", elem_id=f"{mode}-random-seed", scale=0, min_width=80)
            self.reuse_seed = gr.Button("Reuse last", elem_id=f"{mode}-reuse-seed", scale=0, min_width=136)
        if mode == "txt2img":
            f.update(hires_fields(limits, engine.hires_upscaler_names()))
        with gr.Row(equal_height=True):
            f["speed"] = gr.Radio(list(limits.speeds), value=limits.speeds[0], label="Speed", elem_id=f"{mode}-speed",
                                  info="fast: reuses the model's deep features between steps; about 2.5-3x faster "
                                       "from 10 steps up, a slightly different image", scale=3)
            f["tiling"] = gr.Checkbox(False, label="Tiling", info="seamless: the picture repeats without seams",
                                      elem_id=f"{mode}-tiling", scale=1)
        with gr.Row(equal_height=True):
            f["restore_faces"] = gr.Checkbox(False, label="Restore faces", elem_id=f"{mode}-restore-faces", scale=1,
                                             info="redraws each face found (GFPGAN or CodeFormer, from the Models tab)")
            f["face_restorer"] = gr.Dropdown(["Automatic", *limits.face_restorers], value="Automatic",
                                             label="Face restorer", elem_id=f"{mode}-face-restorer", scale=1,
                                             info="Automatic: the first on disk")
            f["codeformer_weight"] = gr.Slider(*limits.ranges["codeformer_weight"], value=0.5, step=0.05,
                                               label="CodeFormer weight", elem_id=f"{mode}-codeformer-weight",
                                               info="0: restores the most; 1: closest to the face as drawn", scale=2)
        with gr.Row():
            f["batch_count"] = gr.Slider(*limits.ranges["batch_count"], value=1, step=1, label="Batch count", elem_id=f"{mode}-batch-count")
            f["batch_size"] = gr.Slider(*limits.ranges["batch_size"], value=1, step=1, label="Batch size", elem_id=f"{mode}-batch-size")
        self.controlnet = ControlNetPanel(engine, mode, uploaded_image)  # not request fields: a list of units

    def _results_column(self) -> None:
        mode = self.mode
        self.progress = gr.HTML(progress_html("Ready", 0.0, "idle"), elem_id=f"{mode}-progress")
        self.preview = gr.Image(label="Live preview", interactive=False, height=160, elem_id=f"{mode}-preview")
        # interactive=False: results are shown here, not uploaded (no "Drop Media Here", no file input)
        self.gallery = gr.Gallery(label="Results", format="png", columns=2, height=360, interactive=False,
                                  elem_id=f"{mode}-gallery")
        self.infotext = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id=f"{mode}-infotext")
        self.send_upscale = gr.Button("Send to upscale", size="sm", elem_id=f"{mode}-send-upscale")

    def wire(self) -> None:
        self._wire_generate()
        self._wire_helpers()
        self.controlnet.wire(shows_errors)

    def _run(self, values: dict, request: gr.Request):
        """The Generate event: the widgets' values (a {component: value} dict) turned into the request's
        fields by name, and the job's views turned into the tab's outputs."""
        names = {component: name for name, component in self.fields.items()}
        fields = {names[c]: v for c, v in values.items() if c in names}
        fields["mode"] = self.mode
        if self.vae is not None:
            fields["vae"] = values.get(self.vae)
        fields["styles"] = values.get(self.styles) or []  # applied to the prompts by Studio.generate
        if self.mask_upload is not None and values.get(self.mask_upload):
            fields["mask"] = values[self.mask_upload]
        key = (request.session_hash, self.mode)
        try:
            fields["controlnet"] = self.controlnet.units(values)
        except EaselError as e:
            raise _readable(e) from None
        # Every yield gives each shown output (progress, preview, gallery, infotext) a plain value, never
        # leaving one out: Gradio fills a left-out output with gr.skip(), an update that builds a new copy
        # of that component for the session, and the next plain value files the copy under its own new id
        # in the session's config, where it stays as long as the session (Gradio keeps sessions until 10000
        # newer ones push them out, closed or not): about 50 KiB per job. See gradio/blocks.py
        # postprocess_data and tests/test_load.py's memory test. The first yield clears the last job's
        # results; gr.State outputs (infotexts, last_seed) may be left out, they take another path.
        # (The Cancel button only ever gets updates, each replacing the last copy: no growth.)
        shown = {self.preview: None, self.gallery: [], self.infotext: ""}
        try:
            for view in self.studio.generate(key, fields, values.get(self.model), values.get(self.job_token)):
                out = {self.progress: view.progress}
                if view.preview is not None:
                    shown[self.preview] = view.preview
                if view.images is not None:
                    shown.update({self.gallery: list(view.images),
                                  self.infotext: view.infotexts[0] if view.infotexts else ""})
                    out.update({self.infotexts: view.infotexts, self.last_seed: view.seeds[0] if view.seeds else None})
                    for note in view.notes:
                        gr.Info(note)
                yield {**out, **shown}
        except CancelledError as e:
            message = str(e)[:1].upper() + str(e)[1:]  # "Cancelled at step 3/20"
            gr.Warning(message)
            yield {self.progress: progress_html(message, 0.0, "cancelled"), **shown}
        except EaselError as e:
            yield {self.progress: progress_html(f"Failed: {e}", 0.0, "failed"), **shown}
            raise _readable(e) from None
        except Exception as e:  # a bug: the page gets one line, the server's log the traceback
            log.exception("generation failed")
            first_line = (str(e).splitlines() or [""])[0]
            message = f"unexpected error ({type(e).__name__}: {first_line}); details are in the server's log"
            yield {self.progress: progress_html(f"Failed: {message}", 0.0, "failed"), **shown}
            raise gr.Error(message, print_exception=False) from None

    def _wire_generate(self) -> None:
        """Generate: `prepare` (unqueued, so Cancel works while the job waits) arms Cancel, the job runs
        in the shared queue, then Cancel goes idle again unless a later click's job is still open."""
        studio, mode, model = self.studio, self.mode, self.model

        def prepare(request: gr.Request):
            token = studio.prepare((request.session_hash, mode))
            return progress_html("Waiting for its turn…", 0.0, "waiting"), token, cancel_look(True)

        def generate(values: dict, request: gr.Request):  # by name: adding a widget cannot shift the others
            yield from self._run(values, request)

        def settle(token, request: gr.Request):
            return cancel_look(studio.jobs.get((request.session_hash, mode), token) is not None)

        def cancel(request: gr.Request):
            if studio.cancel((request.session_hash, mode)):
                gr.Info("Cancelling…")

        inputs = set(self.fields.values()) | {model, self.job_token, self.styles} | {c for c in (self.vae, self.mask_upload)
                                                                                       if c}
        inputs |= self.controlnet.components()
        outputs = [self.progress, self.preview, self.gallery, self.infotext, self.infotexts, self.last_seed]
        self.generate_button.click(prepare, None, [self.progress, self.job_token, self.cancel_button], queue=False,
                                   api_visibility="private").then(
            generate, inputs, outputs, concurrency_id=GENERATION, concurrency_limit=1, show_progress="full",
            show_progress_on=[self.gallery], api_name=mode).then(
            settle, self.job_token, self.cancel_button, queue=False, api_visibility="private")
        self.cancel_button.click(cancel, None, None, queue=False, api_visibility="private")

    def _wire_helpers(self) -> None:
        """The mask follows the init image; the seed buttons, the LoRA picker, and a click on a result."""
        studio, mode, model = self.studio, self.mode, self.model
        if "mask" in self.fields:  # the mask is painted over the init image
            self.fields["init_image"].change(lambda path: path, self.fields["init_image"], self.fields["mask"],
                                             queue=False, api_visibility="private")
        self.random_seed.click(lambda: -1, None, self.fields["seed"], queue=False, api_visibility="private")
        lcm_fields = [self.fields[name] for name in LORA_DEFAULT_FIELDS]
        self.add_lora.click(shows_errors(functools.partial(add_lora, studio.engine)), [self.fields["prompt"], self.lora, model],
                            [self.fields["prompt"], *lcm_fields], queue=False, api_name=f"{mode}_add_lora",
                            api_visibility="private")
        self.reuse_seed.click(lambda seed: -1 if seed is None else seed, self.last_seed, self.fields["seed"],
                              queue=False, api_visibility="private")

        def show_infotext(infotexts, evt: gr.SelectData):
            if evt.index is not None and evt.index < len(infotexts):
                return infotexts[evt.index], evt.index
            return gr.update(), gr.update()

        self.gallery.select(show_infotext, self.infotexts, [self.infotext, self.selected], queue=False,
                            api_visibility="private")

    def fill(self, values: dict[str, Any]) -> dict:
        """Gradio updates that put the named values into this tab's widgets."""
        return {self.fields[name]: value for name, value in values.items() if name in self.fields}


STYLES_INFO = "applied to the prompts, in order, on Generate; styles.csv in the data folder"


def wire_styles(studio: Studio, tabs: list[GenerationTab]) -> None:
    """Each tab's Apply styles button, and its Edit styles accordion: saving or deleting a style
    refreshes every tab's Styles picker (a deleted style leaves their choice)."""
    pickers = [tab.styles for tab in tabs]

    def refreshed(*chosen) -> list:
        names = studio.style_names()
        return [gr.update(choices=names, value=[n for n in (picked or []) if n in names]) for picked in chosen]

    for tab in tabs:
        prompt, negative = tab.fields["prompt"], tab.fields["negative_prompt"]

        @shows_errors
        def save(name, prompt_text, negative_text, *chosen):
            return [studio.save_style(name, prompt_text, negative_text), *refreshed(*chosen)]

        @shows_errors
        def delete(name, *chosen):
            return [studio.delete_style(name), *refreshed(*chosen)]

        @shows_errors
        def apply(prompt_text, negative_text, chosen):  # A1111's button: styles into the boxes, picker cleared
            return [*studio.apply_styles(prompt_text, negative_text, chosen), []]

        # Queued (not on the device's concurrency id): an unqueued event's gr.Error shows as a bare
        # "Error" on its outputs, a queued one as the one-line message.
        tab.save_style.click(save, [tab.style_name, prompt, negative, *pickers], [tab.style_note, *pickers],
                             api_visibility="private")
        tab.delete_style.click(delete, [tab.style_name, *pickers], [tab.style_note, *pickers],
                               api_visibility="private")
        tab.apply_styles.click(apply, [prompt, negative, tab.styles], [prompt, negative, tab.styles],
                               api_visibility="private")


# What an LCM-LoRA changes on the page when the picker adds it (engine.lora_defaults).
LORA_DEFAULT_FIELDS = ("sampler", "schedule_type", "steps", "cfg_scale")


def add_lora(engine, prompt: str | None, name: str | None, model: str | None) -> list:
    """The LoRA picker's button: the prompt with `<lora:NAME:1>` added; an LCM-LoRA also sets the
    sampler, steps and CFG it needs (unless the model is itself few-step)."""
    if not name:
        gr.Warning("Choose a LoRA first.")
        return [gr.update()] * (1 + len(LORA_DEFAULT_FIELDS))
    prompt = add_lora_tag(prompt or "", name)
    defaults = engine.lora_defaults(prompt, engine.model_facts(model)) if (model or engine.model_names()) else {}
    return [prompt, *(gr.update(value=defaults[f]) if f in defaults else gr.update() for f in LORA_DEFAULT_FIELDS)]


def extra_rows(engine) -> list[list]:
    """The Models tab's other files (VAE, upscalers, LoRA, embeddings): kind, name, tensors, why unusable."""
    return [[kind, s.name, "" if s.tensors is None else s.tensors, s.error or ""]
            for kind, statuses in engine.extra_models().items() for s in statuses]


class UpscaleTab:
    """The Upscale tab's widgets and events (built inside its gr.Tab); `image` takes what the
    other tabs send to it."""

    def __init__(self, studio: Studio):
        self.studio = studio
        with gr.Row():
            with gr.Column():
                self.image = uploaded_image(label="Image to upscale", sources=["upload", "clipboard"],
                                            elem_id="upscale-image", height=320)
                upscalers = studio.engine.upscaler_names()
                # The last ESRGAN-family file (else Lanczos): the SD x4 upscaler is much slower, chosen on purpose.
                plain = [n for n in upscalers if not studio.engine.is_sd_upscaler(n)]
                name = gr.Dropdown(upscalers, value=plain[-1] if plain else upscalers[0], label="Upscaler",
                                   elem_id="upscale-upscaler",
                                   info="Lanczos needs no model; ESRGAN-family files go in models/ESRGAN; an SD x4 "
                                        "upscaler checkpoint in models/Stable-diffusion is listed as 'SD x4: NAME'")
                scale = gr.Radio([2, 3, 4], value=4, label="Scale", elem_id="upscale-scale")
                chosen = plain[-1] if plain else upscalers[0]
                tile = gr.Slider(0, 1024, value=studio.engine.default_upscale_tile(chosen), step=32,
                                 label="Tile size (0: the whole image at once)", elem_id="upscale-tile",
                                 info="Memory follows the tile, not the image; picking an upscaler sets its own")
                prompt = gr.Textbox(label="Prompt (SD x4 upscaler only)", lines=2, elem_id="upscale-prompt",
                                    info="What the image shows; used only by the SD x4 upscaler, ignored by the others")
                noise_level = gr.Slider(0, 350, value=20, step=1, label="Noise level (SD x4 upscaler only)",
                                        elem_id="upscale-noise-level",
                                        info="Noise added to the input before upscaling: more lets the model invent "
                                             "more detail; used only by the SD x4 upscaler, ignored by the others")
                cfg_scale = gr.Slider(0, 30, value=9, step=0.5, label="CFG scale (SD x4 upscaler only)",
                                      elem_id="upscale-cfg-scale",
                                      info="How closely to follow the prompt; ignored by the other upscalers")
                with gr.Row():
                    self.button = gr.Button("Upscale", variant="primary", elem_id="upscale-run")
                    self.cancel_button = idle_cancel_button("upscale-cancel")
            with gr.Column():
                self.progress = gr.HTML(progress_html("Ready", 0.0, "idle"), elem_id="upscale-progress")
                self.result = gr.ImageSlider(label="Before / after (drag the line)", interactive=False,
                                             type="filepath", format="png", elem_id="upscale-result")
                self.infotext = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="upscale-infotext")
        self.fields = {"path": self.image, "upscaler": name, "scale": scale, "tile": tile, "prompt": prompt,
                       "noise_level": noise_level, "cfg_scale": cfg_scale}
        self.job_token = gr.State(None)

    def wire(self) -> None:
        studio, names = self.studio, {component: name for name, component in self.fields.items()}

        def prepare(request: gr.Request):
            token = studio.prepare((request.session_hash, "upscale"))
            return progress_html("Waiting for its turn…", 0.0, "waiting"), token, cancel_look(True)

        def upscale(values: dict, request: gr.Request):  # by name: adding a widget cannot shift the others
            fields = {names[c]: v for c, v in values.items() if c in names}
            shown = {self.result: None, self.infotext: ""}  # every output, every time (see GenerationTab.wire)
            try:
                for view in studio.upscale((request.session_hash, "upscale"), token=values.get(self.job_token),
                                           **fields):
                    if view.images is not None:
                        shown = {self.result: view.images, self.infotext: view.infotext}
                        for note in view.notes:
                            gr.Info(note)
                    yield {self.progress: view.progress, **shown}
            except CancelledError as e:
                message = str(e)[:1].upper() + str(e)[1:]
                gr.Warning(message)
                yield {self.progress: progress_html(message, 0.0, "cancelled"), **shown}
            except EaselError as e:
                yield {self.progress: progress_html(f"Failed: {e}", 0.0, "failed"), **shown}
                raise _readable(e) from None

        def settle(token, request: gr.Request):  # Cancel goes idle unless a later click's job is still open
            return cancel_look(studio.jobs.get((request.session_hash, "upscale"), token) is not None)

        def cancel(request: gr.Request):
            if studio.cancel((request.session_hash, "upscale")):
                gr.Info("Cancelling…")

        self.button.click(prepare, None, [self.progress, self.job_token, self.cancel_button], queue=False,
                          api_visibility="private").then(
            upscale, {*self.fields.values(), self.job_token}, [self.progress, self.result, self.infotext],
            concurrency_id=GENERATION, concurrency_limit=1, api_visibility="private").then(
            settle, self.job_token, self.cancel_button, queue=False, api_visibility="private")
        self.cancel_button.click(cancel, None, None, queue=False, api_visibility="private")
        # A plain value, not gr.update(): see GenerationTab.wire on component copies.
        self.fields["upscaler"].input(shows_errors(studio.engine.default_upscale_tile), self.fields["upscaler"],
                                      self.fields["tile"], queue=False, api_visibility="private")


def settings_tab(studio: Studio, settings: SettingsStore, listen: bool) -> None:
    """The Settings tab's widgets and its one event (built inside its gr.Tab)."""
    outdir, watermark = studio.output_settings()
    out_box = gr.Textbox(outdir, label="Output folder", interactive=not listen, elem_id="settings-outdir",
                         info="Read-only when the page is shared with --listen." if listen else None)
    mark_box = gr.Checkbox(watermark, label="Embed the invisible watermark", elem_id="settings-watermark")
    save = gr.Button("Save settings", elem_id="settings-save")
    saved_note = gr.Markdown(f"Saved in `{settings.path}`; kept across restarts "
                             "(`--outdir` / `--no-watermark` given on the command line win for that run).")

    @shows_errors
    def save_settings(folder, mark):
        message = studio.save_output_settings(folder, mark)
        return message, studio.output_settings()[0]

    save.click(save_settings, [out_box, mark_box], [saved_note, out_box], queue=False, api_visibility="private")


class Header:
    """The top of the page: the title, the model and VAE pickers and the banner under them."""

    def __init__(self, studio: Studio):
        engine = studio.engine
        with gr.Row(equal_height=True):
            gr.Markdown("## Easel", elem_id="easel-title")
            self.model = gr.Dropdown(engine.model_names(), value=studio.default_model(), label="Model", scale=3,
                                     elem_id="model-select")
            self.vae = gr.Dropdown(engine.vae_names(), value=studio.model_vae(studio.default_model()),
                                   label="SD VAE", scale=2, elem_id="vae-select",
                                   info="Automatic: the checkpoint's own; remembered for each checkpoint")
            low, high = studio.engine.limits.ranges["clip_skip"]
            self.clip_skip = gr.Slider(low, high, value=studio.model_clip_skip(studio.default_model()), step=1,
                                       label="Clip skip", scale=2, elem_id="clip-skip",
                                       info="Stop the text encoder this many layers from its end; remembered "
                                            "for each checkpoint")
        self.banner = gr.Markdown(studio.banner(), elem_id="easel-banner")

    def wire(self, studio: Studio, tabs: list[GenerationTab]) -> None:
        """Choosing a model loads it (the banner says how it goes) and sets each generation tab's
        size, sampler, steps and CFG for it; the VAE picker shows and remembers each model's VAE."""
        engine, model, vae, banner = studio.engine, self.model, self.vae, self.banner
        tab_fields = [(tab, name) for tab in tabs for name in ("width", "height", "sampler", "steps", "cfg_scale")]

        def select_model(name):
            # A generator (the banner says what a long first load is doing), so shows_errors, which
            # wraps plain functions, is done here by hand.
            try:
                message = ""
                for message in studio.select_model(name):
                    yield [message, *(gr.update() for _ in tab_fields)]
                changes = studio.model_fields(name)
            except EaselError as e:
                raise _readable(e) from None
            yield [message, *(gr.update(**changes.get(field, {})) for _, field in tab_fields)]

        model.input(select_model, model, [banner, *(tab.fields[field] for tab, field in tab_fields)],
                    concurrency_id=GENERATION, concurrency_limit=1, api_visibility="private")
        # The picker shows the VAE remembered for the chosen checkpoint; choosing one remembers it.
        model.input(lambda name: gr.update(choices=engine.vae_names(), value=studio.model_vae(name)), model, vae,
                    queue=False, api_visibility="private")
        vae.input(shows_errors(studio.select_vae), [model, vae], banner, queue=False, api_visibility="private")
        # Likewise the Clip skip slider (a plain value, not gr.update(): see GenerationTab.wire).
        model.input(shows_errors(studio.model_clip_skip), model, self.clip_skip, queue=False, api_visibility="private")
        self.clip_skip.input(shows_errors(studio.select_clip_skip), [model, self.clip_skip], banner, queue=False,
                             api_visibility="private")


class PngInfoTab:
    """The PNG info tab: an image's parameters and watermark, and buttons that send them on."""

    def __init__(self, studio: Studio):
        self.studio = studio
        with gr.Row():
            self.image = uploaded_image(label="Drop a PNG here", sources=["upload", "clipboard"],
                                        elem_id="pnginfo-image", height=320)
            with gr.Column():
                self.text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo-parameters")
                self.mark = gr.Textbox(label="Watermark", interactive=False, elem_id="pnginfo-watermark")
                with gr.Row():
                    self.send_txt = gr.Button("Send to txt2img", elem_id="pnginfo-send-txt2img")
                    self.send_img = gr.Button("Send to img2img", elem_id="pnginfo-send-img2img")
                    self.send_upscale = gr.Button("Send to upscale", elem_id="pnginfo-send-upscale")
        self.parsed = gr.State({})

    def wire(self, tabs: gr.Tabs, txt2img: GenerationTab, img2img: GenerationTab) -> None:
        studio, engine = self.studio, self.studio.engine
        self.image.change(shows_errors(studio.png_info), self.image, [self.text, self.mark, self.parsed],
                          api_name="png_info")

        def send_to(tab: GenerationTab, with_image: bool):
            def send(parsed, path, model):
                values = studio.fields_from_infotext(parsed or {})
                if with_image and path:
                    values["init_image"] = path
                if not values:
                    gr.Warning("No generation parameters to send: drop an image made by Easel or A1111 first.")
                # The page's one VAE picker (its choices again: the file may be newer than the page).
                picked = {tab.vae: gr.update(choices=engine.vae_names(), value=values["vae"])} if "vae" in values else {}
                if (parsed or {}).get("VAE") and not picked:
                    gr.Warning(f"VAE {parsed['VAE']!r} is not in models/VAE; the VAE picker keeps its choice.")
                picked.update(self._send_clip_skip(tab, model, values.get("clip_skip")))
                units, warnings = tab.controlnet.fill(parsed or {})  # A1111's `ControlNet N` entries
                for warning in warnings:
                    gr.Warning(warning)
                return {**tab.fill(values), **picked, **units, tabs: gr.Tabs(selected=tab.mode)}
            return send

        for button, tab, with_image in ((self.send_txt, txt2img, False), (self.send_img, img2img, True)):
            button.click(send_to(tab, with_image), [self.parsed, self.image, tab.model],
                         [tabs, tab.vae, tab.clip_skip, *tab.fields.values(), *tab.controlnet.components()], queue=False,
                         api_visibility="private")

    def _send_clip_skip(self, tab: GenerationTab, model, clip_skip) -> dict:
        """An infotext's Clip skip (1 when it has none) on the header's slider, remembered for the
        chosen checkpoint as moving the slider does; one out of range is left, with a warning."""
        if clip_skip is None or tab.clip_skip is None:
            return {}
        try:
            self.studio.select_clip_skip(model, clip_skip)
        except EaselError as e:
            gr.Warning(f"Clip skip from the image not used: {e}")
            return {}
        return {tab.clip_skip: clip_skip}


class ModelsTab:
    """The Models tab: the checkpoints, the other model files, and the download panel."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.table = gr.Dataframe(headers=["Name", "Family", "Device / precision", "Error", "Loaded"],
                                  value=studio.model_rows(), interactive=False, wrap=True, elem_id="models-table")
        self.refresh = gr.Button("Refresh", elem_id="models-refresh")
        self.extra_table = gr.Dataframe(headers=["Kind", "File", "Tensors", "Error"], value=extra_rows(studio.engine),
                                        interactive=False, wrap=True, label="LoRA, embeddings, VAE and upscaler files",
                                        elem_id="models-extra-table")
        self.catalogue = DownloadsPanel(studio, "models-downloads", heading="Download models")

    def wire(self, tab: gr.Tab, header: Header, txt2img: GenerationTab, img2img: GenerationTab,
             upscale: UpscaleTab) -> None:
        """Opening the tab shows the models' state; Refresh looks at the folders again, for the
        pickers on every tab too."""
        studio, engine = self.studio, self.studio.engine

        def refresh_models():
            rows = studio.model_rows(refresh=True)
            return (rows, gr.update(choices=engine.model_names(), value=studio.default_model()), studio.banner(),
                    gr.update(choices=list(engine.hires_upscaler_names())),
                    gr.update(choices=engine.upscaler_names()))

        tab.select(lambda: studio.model_rows(), None, self.table, queue=False, api_visibility="private")
        self.refresh.click(refresh_models, None, [self.table, header.model, header.banner,
                                                  txt2img.fields["hr_upscaler"], upscale.fields["upscaler"]],
                           concurrency_id=GENERATION, concurrency_limit=1, api_visibility="private")

        def refresh_files():
            names = engine.lora_names()
            return extra_rows(engine), gr.update(choices=names), gr.update(choices=names)

        self.refresh.click(refresh_files, None, [self.extra_table, txt2img.lora, img2img.lora], queue=False,
                           api_visibility="private")


def wire_send_to_upscale(tabs: gr.Tabs, upscale: UpscaleTab, sources: list[tuple[gr.Button, Any, Any]]) -> None:
    """Each "Send to upscale" button: (button, gallery or image, index of the clicked result)."""

    def send_to_upscale(images, index):
        """The clicked (else the first) result of a generation tab, or the PNG info image."""
        if isinstance(images, list):  # a gallery: [(path, caption), ...]
            images = images[index if isinstance(index, int) and 0 <= index < len(images) else 0][0] if images else None
        if not images:
            gr.Warning("Nothing to send: generate an image, or drop one, first.")
            return gr.update(), gr.update()
        return images, gr.Tabs(selected="upscale")

    for button, images, index in sources:
        button.click(send_to_upscale, [images, index], [upscale.image, tabs], queue=False, api_visibility="private")


def start_fields(studio: Studio) -> dict:
    """The default model's sizes, steps and CFG for the generation tabs' first values."""
    try:
        return studio.model_fields(studio.default_model())
    except Exception:  # noqa: BLE001 - the page must come up whatever the default model does
        return {}  # it cannot load: choosing it or the first Generate says why, in one line


def create_ui(engine, settings: SettingsStore | None = None, *, listen: bool = False,
              keep_command_line: frozenset[str] = frozenset()) -> gr.Blocks:
    """The whole page for `engine`. Settings live in `<data_dir>/settings.json` unless another
    store is given; `listen` makes server-side paths read-only from the page."""
    settings = settings or SettingsStore(Path(engine.config.data_dir) / "settings.json")
    studio = Studio(engine, settings, listen=listen)
    studio.apply_saved_outputs(keep_command_line)
    demo = bool(getattr(engine, "is_demo", False))
    fields = start_fields(studio)

    with gr.Blocks(title="Easel", analytics_enabled=False) as page:
        page.studio = studio  # for tests and the server
        header = Header(studio)
        first_run = DownloadsPanel(studio, "first-run", visible=not demo and not engine.model_names())
        with gr.Tabs(elem_id="easel-tabs") as tabs:
            with gr.Tab("Text to image", id="txt2img", elem_id="tab-txt2img"):
                txt2img = GenerationTab(studio, "txt2img", header.model, demo, fields)
            with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img"):
                img2img = GenerationTab(studio, "img2img", header.model, demo, fields)
            with gr.Tab("Upscale 4x", id="upscale", elem_id="tab-upscale"):
                upscale = UpscaleTab(studio)
            with gr.Tab("PNG info", id="pnginfo", elem_id="tab-pnginfo"):
                png_info = PngInfoTab(studio)
            with gr.Tab("Models", id="models", elem_id="tab-models") as models_tab:
                models = ModelsTab(studio)
            with gr.Tab("Settings", id="settings", elem_id="tab-settings"):
                settings_tab(studio, settings, listen)

        txt2img.vae = img2img.vae = header.vae
        txt2img.clip_skip = img2img.clip_skip = header.clip_skip
        wire_downloads(studio, [first_run, models.catalogue], model=header.model, banner=header.banner,
                       models_table=models.table, hires_upscaler=txt2img.fields["hr_upscaler"],
                       upscaler=upscale.fields["upscaler"])
        for tab in (txt2img, img2img, upscale):
            tab.wire()
        header.wire(studio, [txt2img, img2img])
        models.wire(models_tab, header, txt2img, img2img, upscale)
        png_info.wire(tabs, txt2img, img2img)
        wire_styles(studio, [txt2img, img2img])
        # A reload shows what is remembered now, not what was when the page was built.
        page.load(shows_errors(studio.model_clip_skip), header.model, header.clip_skip, queue=False,
                  api_visibility="private")
        wire_send_to_upscale(tabs, upscale, [(txt2img.send_upscale, txt2img.gallery, txt2img.selected),
                                             (img2img.send_upscale, img2img.gallery, img2img.selected),
                                             (png_info.send_upscale, png_info.image, gr.State(0))])

        def forget_session(request: gr.Request):
            studio.jobs.drop_session(request.session_hash)

        page.unload(forget_session)
    return page
