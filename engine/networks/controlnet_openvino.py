"""ControlNet units on OpenVINO (the CPU backend): the ControlNet converted once per file and the
UNet once more with the residuals as graph inputs, both cached like the UNet (engine.openvino_backend)
and compiled with the UNet's own settings (precision hint, threads).

Why a second UNet graph: the plain graph has no inputs for the residuals, and the residuals enter
in the middle of the network, so they cannot be added outside it. Converting takes as long as the
plain UNet's conversion, once per checkpoint; the plain graphs are unloaded while the ControlNet
graph runs, so memory holds one compiled UNet. A job with LoRAs and ControlNet units runs its UNet
steps on torch for now (the LoRA's fused graphs have no residual inputs): the job's notes say so.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONVERTING = "Preparing this model's UNet for ControlNet with OpenVINO: about a minute, once"


class _TraceableControlNet(torch.nn.Module):
    """A ControlNet's forward as positional tensors in, its residuals out (the skip connections'
    then the middle block's), for tracing."""

    def __init__(self, controlnet: torch.nn.Module, sdxl: bool):
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if self.sdxl else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, return_dict=False, **kwargs)
        return (*down, mid)


def controlnet_input_names(sdxl: bool) -> tuple[str, ...]:
    return ("sample", "timestep", "encoder_hidden_states", "controlnet_cond",
            *(("text_embeds", "time_ids") if sdxl else ()))


def convert_controlnet(controlnet: torch.nn.Module, unet: torch.nn.Module, factor: int):
    """The ControlNet as an openvino.Model with dynamic batch, size and prompt length, traced at the
    UNet's odd example size (engine.openvino_backend.example_inputs: the downsampling's rounding is
    then the general one), the hint at that size times `factor`."""
    from engine.openvino_backend import _named, _quiet_trace, convert_model, example_inputs, input_names

    names = input_names(unet.config)
    example = dict(zip(names, example_inputs(unet, names)))
    sample = example["sample"][:, :4]
    sdxl = "text_embeds" in names
    hint = torch.rand(sample.shape[0], controlnet.config.conditioning_channels,
                      sample.shape[2] * factor, sample.shape[3] * factor)
    inputs = (sample, example["timestep"], example["encoder_hidden_states"], hint,
              *((example["text_embeds"], example["time_ids"]) if sdxl else ()))
    with _quiet_trace():
        model = convert_model(_TraceableControlNet(controlnet.float(), sdxl), example_input=inputs)
    n = len(model.outputs)
    return _named(model, controlnet_input_names(sdxl), (*(f"down_{i}" for i in range(n - 1)), "mid"))


@dataclass
class OpenVINOControl:
    """What a ControlNet job's UNet calls run on: the controlled UNet graph and each unit's compiled ControlNet."""
    unet: object          # engine.openvino_backend.OpenVINOUNet (its feed and names)
    controlled: object    # CompiledPart: the UNet graph taking residuals
    nets: list            # CompiledPart per active unit, in the units' order
    sdxl: bool

    def residuals(self, index: int, latents, timestep, inputs: dict, hint) -> list[np.ndarray]:
        feed = {"sample": _array(latents), "timestep": _array(_timesteps(timestep, latents.shape[0])),
                "encoder_hidden_states": _array(inputs["encoder_hidden_states"]), "controlnet_cond": _array(hint)}
        if self.sdxl:
            feed.update(text_embeds=_array(inputs["text_embeds"]), time_ids=_array(inputs["time_ids"]))
        result = self.nets[index](feed)
        return [result[i] for i in range(len(result))]

    def noise(self, inputs: dict, down: list[np.ndarray], mid: np.ndarray) -> torch.Tensor:
        feed = self.unet._feed(inputs)
        feed.update({f"control_down_{i}": r for i, r in enumerate(down)}, control_mid=mid)
        return torch.from_numpy(self.controlled(feed)[0])


def _timesteps(timestep, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32)
    return t.expand(batch) if t.dim() == 0 else t


def _array(tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def controlled_unet(compiled, unet: torch.nn.Module, notes: list[str]):
    """The OpenVINOUNet `compiled`'s graph with residual inputs: read from the cache, else converted
    (from the torch UNet, in f32 for the conversion) and cached; compiled with the plain graph's config."""
    from engine.openvino_backend import (CONTROL_PART, CompiledPart, OpenVINOCache, cache_key,
                                         check_memory_for_conversion, control_input_names, convert_unet_control,
                                         park_weights, residual_shapes, stored_weights)

    if compiled.control is not None:
        return compiled.control
    cache = OpenVINOCache(compiled.compiled.folder.parent)
    n_down = len(residual_shapes(unet.config, (1, unet.config.in_channels, 9, 9))) - 1
    names = control_input_names(compiled.names, n_down)
    stored = stored_weights(compiled.precision)
    key = cache_key(compiled.checkpoint_hash, CONTROL_PART, unet, names, stored)
    xml = cache.load(key)
    if xml is None:
        started = time.monotonic()
        logger.warning(CONVERTING)
        check_memory_for_conversion(unet)
        dtype = compiled.parked_dtype
        try:
            unet.float()  # the conversion traces in f32, as the plain graph's did
            model = convert_unet_control(unet)
        finally:
            if dtype is not None:  # its memory-mapped weights back (engine.openvino_backend.park_weights)
                park_weights(unet, compiled.compiled.folder, dtype)
        xml = cache.store(key, model, stored)
        del model
        notes.append(f"ControlNet: converted this model's UNet with residual inputs for OpenVINO in "
                     f"{time.monotonic() - started:.0f} s, once (cached)")
    config = compiled.compiled.config
    compiled.control = CompiledPart(lambda: cache.compile(xml, compiled.device, config), xml.parent,
                                    compiled.device, config)
    return compiled.control


def controlnet_entry(controlnet: torch.nn.Module, file_hash: str, unet: torch.nn.Module, factor: int,
                     compiled, notes: list[str]):
    """The model.xml of a ControlNet's graph in the UNet `compiled`'s cache: read, else converted
    (from the torch ControlNet, in f32) and cached. Compiled by `compile_controlnet`, after the torch
    ControlNet is dropped (its weights and OpenVINO's copy are never both held)."""
    from engine.openvino_backend import OpenVINOCache, cache_key, stored_weights

    cache = OpenVINOCache(compiled.compiled.folder.parent)
    sdxl = unet.config.addition_embed_type == "text_time"
    stored = stored_weights(compiled.precision)
    key = cache_key(file_hash, "controlnet", controlnet, controlnet_input_names(sdxl), stored)
    xml = cache.load(key)
    if xml is None:
        started = time.monotonic()
        dtype = controlnet.dtype
        try:
            model = convert_controlnet(controlnet, unet, factor)
        finally:
            controlnet.to(dtype)
        xml = cache.store(key, model, stored)
        del model
        notes.append(f"ControlNet: converted {file_hash[:8]} for OpenVINO in {time.monotonic() - started:.0f} s, "
                     "once (cached)")
    return xml


def compile_controlnet(xml, compiled):
    """A ControlNet's cached graph compiled like the UNet `compiled` (its device and config)."""
    from engine.openvino_backend import CompiledPart, OpenVINOCache

    cache = OpenVINOCache(compiled.compiled.folder.parent)
    config = compiled.compiled.config
    return CompiledPart(lambda: cache.compile(xml, compiled.device, config), xml.parent, compiled.device, config)
