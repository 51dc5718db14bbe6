"""What a job adds to the model for its run, one kind per file: LoRAs (lora.py), textual inversions
(embeddings.py), ControlNet units (controlnet.py, their request fields in control_units.py, their
preprocessors in preprocessors.py, their OpenVINO graphs in controlnet_openvino.py).

Each kind is a `JobNetwork`: `for_job(run)` is a context manager that resolves and loads what the
request names, once per job, and yields a `JobPart` (or None when the request uses none of it): the
infotext pairs it ran, and `on_pass(unet)`, a context manager that puts its hooks on the UNet for
one sampling pass, outermost, so they see each call before the OpenVINO backend decides whether it
can take it; and `late(run)`, pairs known only once the prompts are encoded (`TI hashes`).
`JobNetworks` runs them all, in order (LoRAs first: they change the text encoder): the generator
makes one call per job and one per pass, and a new kind (a T2I-Adapter, a regional prompt) is a new
file here plus one entry where the engine builds its `JobNetworks` (engine/engine.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Protocol


@dataclass(frozen=True)
class JobPart:
    infotext: dict[str, str]
    on_pass: Callable[[object], ContextManager] | None = None  # unet -> its hooks for one pass
    late: Callable[[object], dict] | None = None  # run -> pairs known once the prompts are encoded


class JobNetwork(Protocol):
    name: str

    def for_job(self, run) -> ContextManager[JobPart | None]: ...


@dataclass(frozen=True)
class JobNetworks:
    kinds: tuple = ()  # JobNetwork objects, attached in this order

    @staticmethod
    def late_infotext(run) -> dict[str, str]:
        """The job's parts' late pairs, for one picture's infotext."""
        return {k: v for p in getattr(run, "network_parts", ()) if p.late for k, v in p.late(run).items()}

    @contextlib.contextmanager
    def for_job(self, run) -> Iterator[dict[str, str]]:
        """Every kind attached for the job; yields their infotext pairs, in order."""
        with contextlib.ExitStack() as stack:
            parts = [stack.enter_context(kind.for_job(run)) for kind in self.kinds]
            run.network_parts = [p for p in parts if p is not None]
            try:
                yield {k: v for p in run.network_parts for k, v in p.infotext.items()}
            finally:
                run.network_parts = []

    @staticmethod
    @contextlib.contextmanager
    def on_pass(run, unet):
        """The job's hooks on `unet` for one sampling pass."""
        with contextlib.ExitStack() as stack:
            for part in getattr(run, "network_parts", ()):
                if part.on_pass is not None:
                    stack.enter_context(part.on_pass(unet))
            yield
