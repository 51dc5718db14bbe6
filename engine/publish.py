"""Publishing: what happens to an image once it exists, for every producer (txt2img, img2img, and
the upscaler and the HTTP API after them): watermark, then the infotext, then an atomic save, and
at the end a grid. No torch here.

The watermark goes in last, on the final pixels: the dwtDct mark does not survive resizing, so an
image that is resized (an upscale) must be marked after that, never before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engine.jobs import Job, check_cancelled
from engine.outputs import OutputSettings, SaveError, make_grid, save_grid, save_png
from engine.watermark import Watermarker


@dataclass(frozen=True)
class Published:
    images: tuple[Image.Image, ...]  # as shown and saved (watermarked when the settings say so)
    paths: tuple[Path, ...]
    grid_path: Path | None
    save_error: str | None  # why some images (count given) were not saved; they are still in `images`


class Publication:
    """One job's images on their way out: `add` each as it is made, then `finish`.

    A save that fails (disk full, read-only folder) stops the saving, never the job: the images are
    still handed back, and `save_error` says how many were not saved and why.
    """

    def __init__(self, outputs: OutputSettings, watermarker: Watermarker, mode: str, *, save: bool,
                 job: Job | None = None):
        self.outputs, self.watermarker, self.mode, self.save, self.job = outputs, watermarker, mode, save, job
        self.images: list[Image.Image] = []
        self.paths: list[Path] = []
        self._seeds: list[int] = []
        self._infotexts: list[str] = []
        self._error: str | None = None

    def add(self, image: Image.Image, seed: int, infotext: str) -> Image.Image:
        if self.outputs.watermark:
            image = self.watermarker.embed(image)
        self.images.append(image)
        self._seeds.append(seed)
        self._infotexts.append(infotext)
        if self.save and self._error is None:
            if self.job is not None:
                check_cancelled(self.job)  # cancelled: what is saved stays, nothing more is written
            try:
                self.paths.append(save_png(image, self.outputs.outdir, self.mode, seed, infotext))
            except SaveError as error:
                self._error = str(error)
        return image

    def finish(self, grid: bool = False) -> Published:
        grid_path = None
        if grid and self.save and self._error is None and len(self.images) > 1:
            sheet = make_grid(self.images)
            if self.outputs.watermark:
                sheet = self.watermarker.embed(sheet)  # a grid of marked tiles no longer reads as marked
            try:
                grid_path = save_grid(sheet, self.outputs.outdir, self.mode, self._seeds[0], self._infotexts[0])
            except SaveError as error:
                self._error = f"the grid was not saved: {error}"
        error = self._error
        if error is not None and len(self.paths) < len(self.images):
            n = len(self.images)
            error = f"{n - len(self.paths)} of {n} image{'s' if n != 1 else ''} not saved: {error}"
        return Published(tuple(self.images), tuple(self.paths), grid_path, error)


class Publisher:
    """Where and how images are published (output folder, watermark on/off): the settings the
    Settings tab and the command line change, shared by every producer of images."""

    def __init__(self, outputs: OutputSettings, watermarker: Watermarker | None = None):
        self.outputs = outputs
        self.watermarker = watermarker or Watermarker()

    def begin(self, mode: str, *, save: bool = True, job: Job | None = None) -> Publication:
        return Publication(self.outputs, self.watermarker, mode, save=save, job=job)
