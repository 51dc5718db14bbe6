"""Getting models from the page: the catalogue with what suits this machine, a Download button with
a progress bar (bytes, speed, time left) and Cancel, and a box for an https link to a .safetensors
file. One panel under the "No model found" banner (until a model exists) and one on the Models
tab; both are `DownloadsPanel`s, wired to the model picker by `wire_downloads`.

The work is the engine's (`engine.downloads`): it runs in a worker thread, its progress comes back
through a queue, and when it is done the model list is refreshed and the new checkpoint selected.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import gradio as gr

from engine.downloads import DownloadJob
from engine.errors import CancelledError, EaselError
from ui.handlers import watch
from ui.progress import progress_html

log = logging.getLogger(__name__)

HEADERS = ["Model", "Name", "Size", "This machine", "Why", "Good for", "Licence", "Status"]


def cancel_look(active: bool) -> dict:
    """A Cancel button's look: grey and unclickable while there is nothing to cancel, the red stop
    style while a job can be cancelled (here and on the generation tabs). An update, never a plain
    value: each replaces the button's one copy in the session (see GenerationTab._run)."""
    return gr.update(variant="stop" if active else "secondary", interactive=active)


class DownloadsPanel:
    """The catalogue and download widgets, built where it is called (inside a tab or the page)."""

    def __init__(self, studio, prefix: str, *, visible: bool = True, heading: str = "Get a model"):
        self.studio, self.prefix = studio, prefix
        downloads = studio.engine.downloads
        with gr.Column(visible=visible, elem_id=prefix) as self.column:
            gr.Markdown(f"### {heading}\nFor this machine ({downloads.machine.describe()}). Files are checked "
                        "(sha256) before they appear in the models folder; an interrupted download resumes.")
            self.catalog = gr.Dataframe(headers=HEADERS, value=catalog_rows(studio), interactive=False, wrap=True,
                                        datatype=["str", "str", "str", "str", "str", "str", "markdown", "str"],
                                        elem_id=f"{prefix}-catalog")
            with gr.Row(equal_height=True):
                self.choice = gr.Dropdown(downloads.catalog.names(), value=first_choice(studio), label="Model to get",
                                          scale=3, elem_id=f"{prefix}-choice")
                self.download = gr.Button("Download", variant="primary", scale=1, elem_id=f"{prefix}-download")
                # Idle until a download runs: see `cancel_look`.
                self.cancel = gr.Button("Cancel", variant="secondary", interactive=False, scale=1,
                                        elem_id=f"{prefix}-cancel")
            with gr.Row(equal_height=True):
                self.link = gr.Textbox(label="Or an https link to a .safetensors file", scale=3,
                                       placeholder="https://huggingface.co/…/resolve/main/model.safetensors",
                                       elem_id=f"{prefix}-link")
                self.download_link = gr.Button("Download link", scale=1, elem_id=f"{prefix}-download-link")
            self.progress = gr.HTML(progress_html("", 0.0, "idle"), elem_id=f"{prefix}-progress")


def catalog_rows(studio) -> list[list[str]]:
    downloads = studio.engine.downloads
    offline = downloads.offline()
    return [[r.entry.title, r.entry.name, r.entry.size_text, r.advice.label, r.advice.why, r.entry.good_for,
             f"[{r.entry.licence}]({r.entry.licence_url})", r.status(offline)] for r in downloads.rows()]


def first_choice(studio) -> str | None:
    downloads = studio.engine.downloads
    try:
        return downloads.catalog.first_choice(downloads.machine).name
    except EaselError:
        return None


class Transfers:
    """The downloads running for each (page, panel), so that Cancel stops that one only."""

    def __init__(self):
        self._jobs: dict[tuple[str, str], DownloadJob] = {}
        self._lock = threading.Lock()

    def start(self, key) -> DownloadJob:
        job = DownloadJob()
        with self._lock:
            self._jobs[key] = job
        return job

    def cancel(self, key) -> bool:
        with self._lock:
            job = self._jobs.get(key)
        if job is not None:
            job.cancel()
        return job is not None

    def running(self, key) -> bool:
        with self._lock:
            return key in self._jobs

    def finish(self, key, job) -> None:
        with self._lock:
            if self._jobs.get(key) is job:
                del self._jobs[key]


def run_download(studio, job: DownloadJob, what: str, link: bool):
    """Fetch in a worker thread; yields DownloadProgress while it runs, then the file's Path.
    Raises the engine's EaselError (CancelledError when cancelled)."""
    if link and studio.listen:
        raise EaselError("link: models from links can only be added on the computer running Easel (the page is "
                         "shared with --listen); the catalogue works from here")
    outcome: dict = {}

    def work():
        downloads = studio.engine.downloads
        return downloads.fetch_link(what, job) if link else downloads.fetch(what or None, job)

    # watch: a worker thread; the page went away (this generator closed): the download stops and
    # its part is kept for next time
    with contextlib.closing(watch(job, work, outcome)) as watched:
        for updates in watched:
            yield updates[-1]
    yield outcome["result"]


def model_name_of(studio, path: Path) -> str | None:
    """The model-picker name of a downloaded checkpoint (None for other kinds of files)."""
    try:
        return Path(path).relative_to(studio.engine.checkpoint_dir).as_posix()
    except ValueError:
        return None


def wire_downloads(studio, panels: list[DownloadsPanel], *, model, banner, models_table,
                   hires_upscaler, upscaler) -> None:
    """Download and Cancel for each panel; when a download ends, every panel's catalogue, the model
    list, the banner and both upscaler pickers (hires fix's, the Upscale tab's) are refreshed, and a
    new checkpoint is selected in the picker."""
    transfers = Transfers()
    engine = studio.engine
    first_run = panels[0].column

    for panel in panels:
        outputs = [panel.progress, model, banner, models_table, first_run, panel.cancel, hires_upscaler, upscaler,
                   *(p.catalog for p in panels)]

        def fetch(what, request: gr.Request, panel=panel, link=False):
            key = (request.session_hash, panel.prefix)
            job = transfers.start(key)
            try:
                # Cancel can stop it from now on. (Left out of the later yields: a button gets no plain
                # values, so its copy in the session is replaced each time, never added to.)
                yield {panel.progress: progress_html("Starting…", 0.0, "running"), panel.cancel: cancel_look(True)}
                for item in run_download(studio, job, (what or "").strip(), link):
                    if isinstance(item, Path):
                        yield finished(item, panel)
                    else:
                        state = "running" if item.phase != "done" else "done"
                        yield {panel.progress: progress_html(item.describe(), item.fraction, state)}
            except CancelledError as e:
                yield {panel.progress: progress_html(str(e)[:1].upper() + str(e)[1:], 0.0, "cancelled")}
            except EaselError as e:
                yield {panel.progress: progress_html(f"Failed: {e}", 0.0, "failed")}
                raise gr.Error(str(e), print_exception=False) from None
            except Exception as e:  # a bug: one line on the page, the traceback in the server's log
                log.exception("download failed")
                message = f"unexpected error ({type(e).__name__}); details are in the server's log"
                yield {panel.progress: progress_html(f"Failed: {message}", 0.0, "failed")}
                raise gr.Error(message, print_exception=False) from None
            finally:
                transfers.finish(key, job)

        def finished(path: Path, panel: DownloadsPanel) -> dict:
            engine.refresh_models()
            name = model_name_of(studio, path)
            if name:
                studio.settings.update(last_model=name)  # the picker's choice, also after a reload
            names = engine.model_names()
            message = f"Downloaded {path.name}" + (" and selected it" if name else "")
            gr.Info(message)  # also seen when the first-run panel, done with, goes away
            return {panel.progress: progress_html(message, 1.0, "done"),
                    model: gr.update(choices=names, value=name or studio.default_model()),
                    banner: studio.banner(), models_table: studio.model_rows(),
                    first_run: gr.update(visible=not names),
                    hires_upscaler: gr.update(choices=list(engine.hires_upscaler_names())),
                    upscaler: gr.update(choices=engine.upscaler_names()),
                    **{p.catalog: catalog_rows(studio) for p in panels}}

        def fetch_link(url, request: gr.Request, panel=panel):
            yield from fetch(url, request, panel=panel, link=True)

        def cancel(request: gr.Request, panel=panel):
            if transfers.cancel((request.session_hash, panel.prefix)):
                gr.Info("Cancelling the download…")

        def settle(request: gr.Request, panel=panel):  # idle again, unless another download of this panel runs
            return cancel_look(transfers.running((request.session_hash, panel.prefix)))

        for button, handler, source in ((panel.download, fetch, panel.choice),
                                        (panel.download_link, fetch_link, panel.link)):
            button.click(handler, source, outputs, concurrency_id="download", concurrency_limit=2,
                         api_visibility="private").then(settle, None, panel.cancel, queue=False,
                                                        api_visibility="private")
        panel.cancel.click(cancel, None, None, queue=False, api_visibility="private")
