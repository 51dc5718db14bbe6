"""The prompt's LoRAs as one of a job's networks: `<lora:NAME:W>` tags put on the model (and the
last job's taken off) before anything is encoded or sampled, by engine.lora's Loras; their
infotext pair is A1111's `Lora hashes`. A step-distilled LoRA (LCM-LoRA, ...) marks the run, which
then decodes as such a job does (engine.generator). How the OpenVINO UNet takes the set is the
backend's business (engine.openvino_lora), chosen per pass by the generator."""
from __future__ import annotations

import contextlib

from engine.errors import EaselError
from engine.lora import strip_loras
from engine.networks import JobPart


class LoraKind:
    name = "lora"

    def __init__(self, loras):
        self.loras = loras  # engine.lora.Loras: the models folder's LoRAs; None: tags are refused

    @contextlib.contextmanager
    def for_job(self, run):
        request = run.request
        if self.loras is None:
            if strip_loras(request.prompt) != request.prompt:
                raise EaselError("lora: this engine has no LoRA folder; <lora:...> tags cannot be used")
            yield None
            return
        pairs = self.loras.apply(run.model, request.prompt)
        step = self.loras.step_lora(request.prompt, run.model.info.label)
        if step is not None and run.model.distillation == "none":  # as Engine.lora_defaults
            run.step_lora = step.kind
        yield JobPart(pairs)
