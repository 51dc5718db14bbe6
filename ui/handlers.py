"""What the page's buttons do, as plain methods on `Studio` (no Gradio components here).

Values travel by field name (the names of `GenerationRequest`), never by position, so adding a
widget cannot shift the others. `app_ui.py` maps widgets to these names and turns `EaselError`
into a readable message in the page.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageChops

from engine.errors import CancelledError, EaselError, RequestError
from engine.infotext import values_from_params
from engine.jobs import Job
from engine.images import open_image
from engine.inpaint import mask_from_image
from ui.progress import describe, preview_every, progress_html
from ui.settings import SettingsStore

WATERMARK_WORDS = {True: "Easel watermark found", False: "no Easel watermark found", None: "image too small to tell"}


@dataclass(frozen=True)
class GenerationView:
    """One refresh of a generation tab while its job runs, and the final one with the images."""
    progress: str                      # HTML from ui.progress
    preview: Image.Image | None = None
    images: tuple | None = None        # (image, caption) pairs, set once done
    infotexts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpscaleView:
    """One refresh of the Upscale tab: progress while it runs; at the end (before, after) and the
    saved image's parameters."""
    progress: str
    images: tuple | None = None  # (the uploaded file, the saved file or image), once done
    infotext: str = ""
    notes: tuple[str, ...] = ()


class JobBoard:
    """Jobs by (session, tab): Cancel on a page stops that page's jobs and nobody else's.

    Each Generate click gets its own job (and token), so a second click while the first job runs
    cannot hide the first from Cancel.
    """

    def __init__(self):
        self._jobs: dict[tuple[str, str], dict[str, Job]] = {}
        self._lock = threading.Lock()

    def open(self, key: tuple[str, str]) -> tuple[str, Job]:
        token, job = uuid.uuid4().hex, Job()
        with self._lock:
            self._jobs.setdefault(key, {})[token] = job
        return token, job

    def get(self, key: tuple[str, str], token: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(key, {}).get(token)

    def cancel(self, key: tuple[str, str]) -> bool:
        with self._lock:
            jobs = list(self._jobs.get(key, {}).values())
        for job in jobs:
            job.cancel()
        return bool(jobs)

    def finish(self, key: tuple[str, str], token: str) -> None:
        with self._lock:
            jobs = self._jobs.get(key, {})
            jobs.pop(token, None)
            if not jobs:
                self._jobs.pop(key, None)

    def drop_session(self, session: str) -> None:
        """The page was closed: stop its jobs and forget them."""
        with self._lock:
            gone = [self._jobs.pop(k) for k in [k for k in self._jobs if k[0] == session]]
        for jobs in gone:
            for job in jobs.values():
                job.cancel()


_DONE = object()


def watch(job, work, outcome: dict[str, Any]) -> Iterator[list]:
    """Run `work()` in a worker thread (so progress can be shown while it works), yielding the
    progress updates that arrived since the last yield (the page only shows the newest, and the
    newest preview among them); its result ends up in outcome["result"], its
    error is raised here. If the caller stops listening (the page went away: this generator
    is closed), the job is cancelled. `job`: anything with `on_progress`, `cancelled` (an Event)
    and `cancel()` (engine.jobs.Job, engine.downloads.DownloadJob)."""
    updates: queue.Queue = queue.Queue()
    job.on_progress = updates.put

    def run():
        try:
            if job.cancelled.is_set():
                raise CancelledError("cancelled before it started")
            outcome["result"] = work()
        except BaseException as e:  # handed to the page's thread, which reports it
            outcome["error"] = e
        finally:
            updates.put(_DONE)

    worker = threading.Thread(target=run, name="easel-job", daemon=True)
    worker.start()
    try:
        while True:
            batch = [updates.get()]
            while not updates.empty():
                batch.append(updates.get())
            steps = [u for u in batch if u is not _DONE]
            if steps:
                yield steps
            if _DONE in batch:
                break
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
    finally:
        if worker.is_alive():
            job.cancel()


class Studio:
    def __init__(self, engine, settings: SettingsStore, *, listen: bool = False):
        self.engine = engine
        self.settings = settings
        self.listen = listen  # others on the network can reach the page: no server paths from it
        self.jobs = JobBoard()

    # --- models ---------------------------------------------------------------------------------
    def banner(self) -> str:
        if getattr(self.engine, "is_demo", False):
            return ("**Demo mode:** the only model is a tiny random-weight network, so every image it makes is "
                    "noise. Start without `--demo` to use your own checkpoints.")
        if not self.engine.model_names():
            return (f"**No model found.** Download one below (the list says which suit this machine), or put a "
                    f"Stable Diffusion checkpoint (`.safetensors`) in `{self.engine.checkpoint_dir}` and press "
                    f"*Refresh* on the Models tab, or run `python app.py download` in a terminal.")
        return ""

    def default_model(self) -> str | None:
        names = self.engine.model_names()
        saved = self.settings.load().last_model
        if saved in names:
            return saved
        current = self.engine.current_model
        return current if current in names else (names[0] if names else None)

    def model_rows(self, refresh: bool = False) -> list[list[str]]:
        statuses = self.engine.refresh_models() if refresh else self.engine.models()
        return [[s.name, s.family or "", s.plan or "", s.error or "", "yes" if s.loaded else ""] for s in statuses]

    def model_fields(self, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Widget changes a model asks for, by field name: the size step of its VAE, and its own
        defaults (an LCM model wants the LCM sampler, few steps, low CFG). Empty with no model."""
        if not (name or self.engine.model_names()):
            return {}
        step = self.engine.size_step(name)
        changes: dict[str, dict[str, Any]] = {"width": {"step": step}, "height": {"step": step}}
        for field, value in self.engine.model_defaults(name).items():
            changes.setdefault(field, {})["value"] = value
        return changes

    def select_model(self, name: str | None) -> Iterator[str]:
        """The model picker: loads `name`, yielding what the banner shows meanwhile (a first load
        on OpenVINO prepares the model for the CPU, which takes a minute), then what was loaded."""
        if not name:
            yield self.banner()
            return
        outcome: dict[str, Any] = {}
        job = Job()
        for updates in watch(job, lambda: self.engine.load_model(name, job), outcome):
            yield f"Loading **{name}**: {updates[-1].status}"
        loaded = outcome["result"]
        self.settings.update(last_model=name)
        plan = getattr(loaded, "plan", None)
        yield f"Loaded **{name}**" + (f" ({plan.describe()})" if hasattr(plan, "describe") else "")

    def model_vae(self, name: str | None) -> str:
        """The VAE remembered for a checkpoint, for the picker ("Automatic" when there is no model)."""
        if not (name or self.engine.model_names()):
            return "Automatic"
        return self.engine.model_vae(name)

    def select_vae(self, model: str | None, vae: str | None) -> str:
        """The VAE picker: remember the choice for the checkpoint; its next job decodes with it."""
        if not (model or self.engine.model_names()):
            return self.banner()
        self.engine.set_model_vae(model, vae or "Automatic")
        return f"VAE for **{model or self.engine.current_model}**: {vae or 'Automatic'} (used from the next image on)"

    def model_clip_skip(self, name: str | None) -> int:
        """The CLIP skip remembered for a checkpoint, for the header's slider (1 with no model)."""
        if not (name or self.engine.model_names()):
            return 1
        return self.engine.model_clip_skip(name)

    def select_clip_skip(self, model: str | None, clip_skip) -> str:
        """The Clip skip slider: remember it for the checkpoint; its next job uses it."""
        if not (model or self.engine.model_names()):
            return self.banner()
        value = int(clip_skip) if isinstance(clip_skip, float) and clip_skip.is_integer() else clip_skip
        if value != self.engine.model_clip_skip(model):
            self.engine.set_model_clip_skip(model, value)
        return f"Clip skip for **{model or self.engine.current_model}**: {value} (used from the next image on)"

    # --- prompt styles --------------------------------------------------------------------------
    def style_names(self) -> list[str]:
        return self.engine.style_names()

    def apply_styles(self, prompt: str | None, negative_prompt: str | None, styles) -> tuple[str, str]:
        """The prompts with the chosen styles applied in order (RequestError naming `styles`)."""
        return self.engine.apply_styles(prompt or "", negative_prompt or "", list(styles or []))

    def save_style(self, name: str | None, prompt: str | None, negative_prompt: str | None) -> str:
        """Save the tab's prompts as a style (an existing name is overwritten)."""
        from engine.styles import check_name

        name = check_name(name or "")
        existed = name in self.engine.style_names()
        self.engine.save_style(name, prompt or "", negative_prompt or "")
        return f"Style **{name}** {'overwritten' if existed else 'saved'}."

    def delete_style(self, name: str | None) -> str:
        from engine.styles import check_name

        name = check_name(name or "")
        self.engine.delete_style(name)
        return f"Style **{name}** deleted."

    # --- generation -----------------------------------------------------------------------------
    def prepare(self, key: tuple[str, str]) -> str:
        """Called the moment Generate is clicked, so Cancel works while the job still waits in the
        queue; returns the job's token for `generate`."""
        return self.jobs.open(key)[0]

    def cancel(self, key: tuple[str, str]) -> bool:
        return self.jobs.cancel(key)

    def generate(self, key: tuple[str, str], fields: dict[str, Any], model: str | None,
                 token: str | None = None) -> Iterator[GenerationView]:
        """Run one request, yielding progress views, then a last view with the images.

        Raises the engine's EaselError (CancelledError when cancelled). The engine runs in a worker
        thread so progress can be shown while it works; if the page goes away mid-job (this
        generator is closed), the job is cancelled.
        """
        job = self.jobs.get(key, token)
        if job is None:  # called without prepare (e.g. through the API)
            token, job = self.jobs.open(key)
        job.preview_every = preview_every(fields.get("steps"))
        model = model or None

        def work():
            request = self.engine.make_request(self._with_init_image(self._with_styles(fields)), model=model)
            return self.engine.generate(request, job, model=model)

        outcome: dict[str, Any] = {}
        last = None
        try:
            yield GenerationView(progress_html("Loading the model…" if self.engine.current_model != model
                                               else "Starting…"))
            preview = None
            with contextlib.closing(watch(job, work, outcome)) as watched:
                for updates in watched:
                    for last in updates:
                        preview = last.preview or preview
                    yield GenerationView(progress_html(describe(last), last.fraction), preview)
        except CancelledError:
            if last is not None:
                raise CancelledError(f"cancelled at step {last.step}/{last.steps}") from None
            raise
        finally:
            self.jobs.finish(key, token)
        yield self._done_view(outcome["result"])

    def _with_styles(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`styles` (the tab's Styles picker, not a request field) applied to the prompt and the
        negative prompt, by name, before the request is made."""
        if "styles" not in fields:
            return fields
        fields = dict(fields)
        styles = fields.pop("styles")
        if styles:
            fields["prompt"], fields["negative_prompt"] = self.apply_styles(
                fields.get("prompt"), fields.get("negative_prompt"), styles)
        return fields

    @staticmethod
    def _with_init_image(fields: dict[str, Any]) -> dict[str, Any]:
        """An uploaded init image arrives as the upload's file path (Gradio's type="filepath", so
        Gradio itself never decodes it): open it with the safe opener, which refuses a huge, bomb,
        corrupt or non-image file before decoding it. An already decoded image (callers that are
        not the page) is checked by the request's validation."""
        init = fields.get("init_image")
        if isinstance(init, (str, Path)):
            fields = {**fields, "init_image": open_image(init, "init_image")}
        return {**fields, "mask": Studio._mask(fields.get("mask"))} if "mask" in fields else fields

    @staticmethod
    def _mask(mask: Any) -> Any:
        """The page's mask: an uploaded mask file, or the strokes painted in the editor (its layers'
        files, each opened with the safe opener, transparency kept: a stroke is its alpha). No
        strokes: no mask, plain img2img."""
        if isinstance(mask, (str, Path)):
            return open_image(mask, "mask", keep_alpha=True)
        if not isinstance(mask, dict):
            return mask
        painted = None
        for path in mask.get("layers") or []:
            layer = mask_from_image(open_image(path, "mask", keep_alpha=True))
            painted = layer if painted is None else ImageChops.lighter(painted, layer)
        return painted if painted is not None and painted.getextrema()[1] > 0 else None

    @staticmethod
    def _done_view(result) -> GenerationView:
        # The saved files carry the infotext; opened from disk, the gallery's copies keep it too.
        # When some could not be saved (disk full, read-only folder), show the images in memory.
        saved = bool(result.paths) and len(result.paths) == len(result.images)
        images = [Image.open(p) for p in result.paths] if saved else list(result.images)
        captions = [f"Seed {s}" for s in result.seeds]
        n = len(images)
        return GenerationView(
            progress_html(f"Done: {n} image{'s' if n != 1 else ''}", 1.0, "done"),
            images=tuple(zip(images, captions)), infotexts=result.infotexts, seeds=result.seeds, notes=result.notes)

    # --- upscaling ------------------------------------------------------------------------------
    def upscale(self, key: tuple[str, str], path, upscaler: str, scale, tile, *, prompt: str | None = None,
                noise_level=None, cfg_scale=None, token: str | None = None) -> Iterator[UpscaleView]:
        """Upscale an uploaded image (opened with the safe opener) and publish it in outputs/upscale,
        yielding progress views (tiles done, ETA), then a last one with (before, after) for the
        page's slider (the saved file, or the image when saving failed) and its parameters.
        `prompt`, `noise_level` and `cfg_scale` are the SD x4 upscaler's (the others ignore them).
        Raises the engine's EaselError (CancelledError when cancelled between tiles)."""
        if not path:
            raise RequestError("image", "drop an image to upscale first")
        job = self.jobs.get(key, token)
        if job is None:
            token, job = self.jobs.open(key)
        image = open_image(path, "image")
        outcome: dict[str, Any] = {}
        last = None

        def work():
            return self.engine.upscale(image, upscaler, scale, tile, job, prompt=prompt or None,
                                       noise_level=noise_level, cfg_scale=cfg_scale)

        try:
            yield UpscaleView(progress_html("Starting…"))
            with contextlib.closing(watch(job, work, outcome)) as watched:
                for updates in watched:
                    last = updates[-1]
                    yield UpscaleView(progress_html(describe(last, unit="Tile"), last.fraction))
        except CancelledError:
            if last is not None:
                raise CancelledError(f"cancelled after tile {last.step}/{last.steps}") from None
            raise
        finally:
            self.jobs.finish(key, token)
        result = outcome["result"]
        after = str(result.paths[0]) if result.paths else result.images[0]
        yield UpscaleView(progress_html(f"Done: {result.images[0].width}x{result.images[0].height}", 1.0, "done"),
                          (str(path), after), result.infotexts[0], result.notes)

    # --- PNG info -------------------------------------------------------------------------------
    def png_info(self, path) -> tuple[str, str, dict]:
        """(parameters text, watermark status in words, parsed A1111 fields)."""
        if not path:
            return "", "", {}
        info = self.engine.png_info(path)
        text = info.parameters or "(no generation parameters found in this image)"
        return text, WATERMARK_WORDS[info.watermark], dict(info.fields)

    def fields_from_infotext(self, parsed: dict) -> dict[str, Any]:
        """Request field values from parsed A1111 parameters (the two-way table in engine.infotext);
        values that do not parse, and names this Easel does not know, are left out. `vae` is the
        VAE picker's name for the file the image was made with, when models/VAE has it."""
        values = values_from_params(parsed)
        known = {"sampler": self.engine.samplers, "schedule_type": self.engine.schedule_types,
                 "speed": self.engine.limits.speeds}
        values = {k: v for k, v in values.items() if k not in known or v in known[k]}
        if "vae" in values:
            vae = self.engine.find_vae(str(values.pop("vae")))
            if vae is not None:
                values["vae"] = vae
        return values

    # --- output settings ------------------------------------------------------------------------
    def apply_saved_outputs(self, keep_command_line: frozenset[str] = frozenset()) -> None:
        """Use the output folder / watermark saved from the Settings tab, except those given on the
        command line this time (named in keep_command_line: "outdir", "watermark")."""
        saved = self.settings.load()
        self.engine.set_outputs(
            outdir=Path(saved.outdir) if saved.outdir and "outdir" not in keep_command_line else None,
            watermark=saved.watermark if saved.watermark is not None and "watermark" not in keep_command_line else None)

    def output_settings(self) -> tuple[str, bool]:
        outputs = self.engine.outputs
        return str(outputs.outdir), bool(outputs.watermark)

    def save_output_settings(self, outdir: str, watermark: bool) -> str:
        current = self.engine.outputs
        folder = Path(str(outdir or "").strip()).expanduser() if str(outdir or "").strip() else current.outdir
        if folder.resolve() != Path(current.outdir).resolve():
            if self.listen:
                raise EaselError("output folder: can only be changed on the computer running Easel "
                                 "(the page is shared with --listen); use --outdir there")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EaselError(f"output folder: cannot create {folder}: {e.strerror or e}") from None
        self.engine.set_outputs(outdir=folder, watermark=bool(watermark))
        self.settings.update(outdir=str(folder), watermark=bool(watermark))
        return f"Saved: images go to `{folder}`, watermark {'on' if watermark else 'off'}."
