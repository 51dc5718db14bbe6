"""A job's handle and what it hands back: progress updates, cancel, the result. No torch here, so
the UI and the API can hold jobs and read progress without loading the engine's heavy parts."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from engine.errors import CancelledError


@dataclass(frozen=True)
class ProgressUpdate:
    step: int            # steps done in the current batch
    steps: int           # steps per batch
    batch: int           # 0-based index of the current batch
    batches: int
    elapsed: float       # seconds since the job started
    preview: Image.Image | None = None
    status: str = ""     # what the job does before its steps start (preparing a model for the CPU)

    @property
    def fraction(self) -> float:
        done = self.batch * self.steps + self.step
        return done / max(1, self.batches * self.steps)

    @property
    def eta(self) -> float | None:
        f = self.fraction
        return None if f <= 0 else self.elapsed * (1 - f) / f


@dataclass
class Job:
    """A running job's handle: progress goes out through `on_progress`; `cancel()` stops it."""
    on_progress: Callable[[ProgressUpdate], None] | None = None
    preview_every: int = 0  # 0: no previews
    cancelled: threading.Event = field(default_factory=threading.Event)
    # What cancel means. False (the page): stop, no picture. True (A1111's API, whose clients expect
    # an answer with images to interrupt): no further step, and the pictures as far as they got.
    keep_partial: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    def say(self, status: str) -> None:
        """Tell whoever watches what the job is doing before its first step (a long model load)."""
        if self.on_progress:
            self.on_progress(ProgressUpdate(0, 0, 0, 1, 0.0, status=status))


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]
    infotexts: tuple[str, ...]
    paths: tuple[Path, ...]
    grid_path: Path | None
    notes: tuple[str, ...]  # what the engine had to do on its own (OOM step-down, fp32 VAE retry)
    save_error: str | None = None  # why some images (count given) were not saved; they are still in `images`


def check_cancelled(job: Job) -> None:
    """Raise CancelledError if the job was cancelled: called between the parts of a job."""
    if job.cancelled.is_set():
        raise CancelledError("cancelled")


def stopping_early(job: Job) -> bool:
    """True when the job was cancelled and wants its pictures as far as they got (`keep_partial`);
    cancelled without it, CancelledError; else False. Called between the parts of a job."""
    if job.cancelled.is_set() and job.keep_partial:
        return True
    check_cancelled(job)
    return False
