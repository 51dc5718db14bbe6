"""OpenVINO for the rest of the pipeline: the VAE's decoder and encoder and the text encoder(s),
converted from the loaded modules and cached like the UNet (engine/openvino_backend.py: the same
cache, one entry per part, f32 graphs compiled with OpenVINO's blob cache).

Why: with the UNet on OpenVINO, the VAE decode is the next largest cost of a job on the CPU (a
512² decode takes about as long as a UNet step), and the text encoder runs once per prompt.

How each part plugs in: its torch submodule stays where it is and a diffusers `ModelHook` (the
mechanism the UNet uses) makes its forward run the compiled model. Unlike the UNet's hook, which
is lent for one sampling pass, these stay on for the model's life, since every caller of these
modules can use them: the pipelines' init-image encode (img2img, inpaint, hires fix), Easel's own
decode (`generator._vae_decode`) and the prompt encoder (`engine.prompts`). A call the graph does
not cover runs the torch forward instead.

- VAE decoder: `vae.decoder` (what `vae.decode` runs after the 1x1 `post_quant_conv`, kept in
  torch). Tiled decoding calls it per tile, which dynamic sizes cover.
- VAE encoder: `vae.encoder` only. `quant_conv` (1x1) and the seeded sampling from the latent
  distribution stay in torch, so an init image gives the same latents for a seed as on torch.
- Text encoder(s): the whole CLIP model except its token-embedding lookup, which stays in torch
  and whose output goes in as an input. That is where textual-inversion embeddings write their
  vectors (`engine.embeddings.embeddings_in_place` hooks the token embedding), so prompts with an
  embedding run on OpenVINO too, with no second graph and no torch fallback for them. A LoRA puts
  peft layers into the encoder; their deltas are fused into a compiled copy of the graph, once per
  set of LoRAs and weights (engine.openvino_lora, as the UNet's), and a set that cannot be fused
  runs on torch.

A user-chosen VAE (engine/vae.py) is another module with other weights: `ModelManager.apply_vae`
converts it too, keyed by its own file's hash; the checkpoint's VAE keeps its hooks for when
Automatic is chosen again. Each part is converted and compiled on its own: one that fails stays
on torch and says so, the others keep OpenVINO.

Precision: f32, as the plan keeps the text encoder and VAE in fp32 on the CPU. Measured with
bench/openvino_parts.py on a quiet Zen 4 EPYC with native bf16 (docs/benchmarks.md): a 512² decode
took 9.9 s on torch, 5.5 s in OpenVINO f32 (identical 8-bit pixels) and 2.9 s in bf16, but bf16 was
up to 11 levels off; the text encoder's chunk took 0.15 s on torch and 0.07 s in f32, too little
to trade any precision for. The one exception is a step LoRA's few-step job on a CPU with native
bf16 (engine.generator's _decoder_precision, with a note): there the decode is a third of the job,
and `compiled_in` runs the same graph compiled with the bf16 hint, as FastSD CPU's OpenVINO mode does.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers
from diffusers.hooks import HookRegistry, ModelHook
from engine.openvino_backend import (CompiledPart, OpenVINOCache, _array, cache_key, compile_entry, convert_model,
                                     load_or_convert, park_weights)
from engine.openvino_lora import FuseError, LoraVariant, active_lora_layers, fused_compile

logger = logging.getLogger(__name__)

HOOK_NAME = "easel_openvino_part"
TEXT_PREFIX = "self.encoder."  # the text encoder graph's weight names: _TextTraceable's attribute, then the module path

# Part name -> what users read in notes.
LABELS = {"vae_decoder": "VAE decoder", "vae_encoder": "VAE encoder",
          "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


class OpenVINOPart:
    """One compiled part; `calls` counts the forwards it ran (the rest ran on torch)."""

    def __init__(self, name: str, compiled, from_cache: bool, seconds: float):
        self.name = name
        self.compiled = compiled
        self.from_cache = from_cache  # False: converted by this load
        self.seconds = seconds        # converting (or reading) plus compiling
        self.calls = 0
        self.failed = False           # compiling again after unload() failed: warned once
        self._loras = LoraVariant()   # the last LoRA set's fused graph (text encoders: engine.openvino_lora)
        self.precision: str | None = None  # a compile hint other than the part's own, set by compiled_in
        self._other: tuple[str, CompiledPart] | None = None  # (hint, the part compiled with it)

    @property
    def running(self) -> CompiledPart:
        """What a call runs: the part as compiled, or its variant in `precision` while one is asked for.
        One of the two is loaded at a time: switching unloads the other (compiled again from its
        blob when asked for again: ~0.2 s for SD 1.5's VAE decoder)."""
        own = self.compiled
        if self.precision is None or self.precision == own.config.get("INFERENCE_PRECISION_HINT"):
            if self._other is not None:
                self._other[1].unload()
            return own
        if self._other is None or self._other[0] != self.precision:
            config = {**own.config, "INFERENCE_PRECISION_HINT": self.precision}
            xml, cache = own.folder / "model.xml", OpenVINOCache(own.folder.parent)  # the entry's own cache
            self._other = (self.precision, CompiledPart(lambda: cache.compile(xml, own.device, config),
                                                        own.folder, own.device, config))
        own.unload()
        return self._other[1]

    def for_loras(self, module: torch.nn.Module, prefix: str) -> "OpenVINOPart | None":
        """This part compiled with `module`'s active LoRAs fused in, or None when they cannot be
        (then the module runs on torch, as it did before LoRAs reached OpenVINO)."""
        part = self.compiled

        def build(deltas, key):
            compile_fused = functools.partial(fused_compile, part.folder / "model.xml", prefix, deltas(),
                                              part.device, part.config)
            return OpenVINOPart(self.name, CompiledPart(compile_fused, part.folder, part.device, part.config),
                                True, 0.0)

        try:
            variant, built = self._loras.get(module, build)
        except Exception as error:  # noqa: BLE001 - compiling failed: torch still has the LoRA layers
            logger.warning("OpenVINO could not fuse the LoRAs into the %s (%s); it runs on torch", LABELS[self.name], error)
            return None
        if isinstance(variant, FuseError):
            if built:
                logger.warning("The LoRAs run on torch in the %s: %s", LABELS[self.name], variant)
            return None
        if built:
            logger.info("LoRAs fused into the OpenVINO %s in %.1f s", LABELS[self.name], self._loras.seconds)
        return variant

    def ready(self) -> bool:
        """Whether the compiled model can run: compiled again here if it was unloaded. A part that
        cannot be (its cache entry removed meanwhile) runs on torch: warned once, never a failed job."""
        try:
            self.running.load()
            return True
        except Exception as error:  # noqa: BLE001 - the torch module is still there to run it
            if not self.failed:
                logger.warning("OpenVINO could not compile the %s again (%s); it runs on torch",
                               LABELS[self.name], error)
            self.failed = True
            return False

    def unload(self) -> None:
        self.compiled.unload()
        if self._other is not None:
            self._other[1].unload()

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        compiled = self.running
        try:
            results = compiled([_array(t) if t.is_floating_point() else t.detach().cpu().numpy() for t in tensors])
            return [torch.from_numpy(results[port].copy()) for port in compiled.outputs]
        finally:
            # A part runs once or twice a job: its activations (a 512² decode's ~1 GB) are not
            # kept while the UNet runs. Allocating them again costs <1% of a decode (benchmarks.md).
            compiled.release_memory()


# --- the VAE's encoder and decoder: one image tensor in, one out -----------------------------------
class _ConvNetTraceable(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, sample):
        return self.net(sample)


def convert_vae_part(net: torch.nn.Module, channels: int):
    """vae.decoder (channels = latent channels) or vae.encoder (3) as an openvino.Model with dynamic
    batch and size. The example size is odd so nothing size-specific is baked in.

    The example must not be too small for the net, or tracing fails in torch ("Couldn't get
    TorchScript module by tracing", OpenVINO's words for it) and the part stays on torch with a
    note (issue 20). 9x11 traces for every SD VAE: the encoder of SD 1.5's (block_out_channels
    128-512, three downsamples) needs a side of 8 (below, a 3x3 conv meets a 1x1 map padded to
    2x2), and the tests' tiny VAE (engine.tiny: 32 channels in 32 GroupNorm groups) one of 4
    (at 3, F.group_norm gets one value per group on the 1x1 map after its downsample: "Expected
    more than 1 value per channel"). Only those smaller examples trip it, on either VAE; measured
    with bench/openvino_vae_encoder.py (docs/benchmarks.md): SD 1.5's encoder converts in 1.7 s
    and, at 512², its output is within 7e-6 of torch's (tiny VAE: 0.6-1.3 s, 2e-6)."""
    example = torch.randn(1, channels, 9, 11)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = convert_model(_ConvNetTraceable(net).eval(), example_input=(example,))
    model.inputs[0].get_tensor().set_names({"sample"})
    return model


class _RunConvNet(ModelHook):
    """vae.decoder / vae.encoder's forward on the compiled model (Decoder's `latent_embeds`, used
    by no SD VAE, would run on torch)."""

    def __init__(self, part: OpenVINOPart):
        super().__init__()
        self.part = part
        self.on_torch = False  # set by `parts_on_torch`

    def new_forward(self, module, *args, **kwargs):
        if self.on_torch:
            return self.fn_ref.original_forward(*args, **kwargs)
        sample = args[0] if args else kwargs.get("sample")
        extra = [v for k, v in kwargs.items() if k != "sample" and v is not None] + [a for a in args[1:] if a is not None]
        if extra or not torch.is_tensor(sample) or sample.dim() != 4 or not self.part.ready():
            return self.fn_ref.original_forward(*args, **kwargs)
        (out,) = self.part(sample)
        return out.to(dtype=sample.dtype, device=sample.device)


# --- the text encoders: token embeddings in (looked up in torch), hidden states out ----------------
class _TextTraceable(torch.nn.Module):
    """The CLIP text model with its token embedding's output replaced by an input (see the module
    docstring). Out: last hidden state, the penultimate layer's (SDXL uses it), and the pooled
    output (projected for CLIPTextModelWithProjection)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, token_embeds):
        # input_ids still go in: the pooled output is taken at each row's EOS token.
        handle = self.encoder.get_input_embeddings().register_forward_hook(lambda m, a, out: token_embeds)
        try:
            out = self.encoder(input_ids, output_hidden_states=True)
        finally:
            handle.remove()
        pooled = out.text_embeds if hasattr(self.encoder, "text_projection") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


def convert_text_encoder(encoder: torch.nn.Module):
    config = encoder.config
    ids = torch.full((2, config.max_position_embeddings), config.pad_token_id, dtype=torch.long)
    ids[:, 0], ids[:, 1:5], ids[:, 5] = config.bos_token_id, 320, config.eos_token_id
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        token_embeds = encoder.get_input_embeddings()(ids)
        model = convert_model(_TextTraceable(encoder).eval(), example_input=(ids, token_embeds))
    for port, name in zip(model.inputs, ("input_ids", "token_embeds")):
        port.get_tensor().set_names({name})
    return model


@contextlib.contextmanager
def parts_on_torch(*modules: torch.nn.Module):
    """Inside the block, these modules' compiled parts (text encoder, VAE encoder/decoder) run their
    own torch forward: for what the compiled graph cannot give (a layer further back than CLIP skip
    2; circular padding for tiling). Nothing changes for a module not compiled."""
    hooks = []
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if registry is not None else None
        if hasattr(hook, "on_torch"):
            hooks.append(hook)
    for hook in hooks:
        hook.on_torch = True
    try:
        yield
    finally:
        for hook in hooks:
            hook.on_torch = False


@contextlib.contextmanager
def compiled_in(module: torch.nn.Module, precision: str):
    """Inside the block, the module's compiled part (the VAE decoder for a step LoRA's few-step
    job: engine.generator) runs compiled with the compile hint `precision` ("bf16") instead of its
    own; yields that part, or None when the module has none on the CPU (nothing changes then).
    The same cached graph: only OpenVINO's compile differs, and its blob is cached beside the f32 one."""
    part = attached(module)
    if part is None or part.compiled.device != "CPU":
        yield None
        return
    part.precision = precision
    try:
        yield part
    finally:
        part.precision = None


_TEXT_KWARGS = {"input_ids", "output_hidden_states", "return_dict"}


class _RunTextEncoder(ModelHook):
    """The CLIP model's forward on the compiled model: the token embedding runs in torch first, so
    a textual inversion's hook on it works. hidden_states holds only the last two layers' (the
    penultimate is the one SDXL uses; indexing further back fails loudly rather than being wrong)."""

    def __init__(self, part: OpenVINOPart):
        super().__init__()
        self.part = part
        self.on_torch = False  # set by `parts_on_torch`

    def new_forward(self, module, *args, **kwargs):
        if self.on_torch:
            return self.fn_ref.original_forward(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        others = {k: v for k, v in kwargs.items() if k not in _TEXT_KWARGS and v is not None and v is not False}
        part = self.part
        if active_lora_layers(module):  # the job's LoRAs, fused into a graph of their own
            part = part.for_loras(module, TEXT_PREFIX)
        if len(args) > 1 or others or kwargs.get("return_dict") is False or not torch.is_tensor(ids) or \
                ids.dim() != 2 or part is None or not part.ready():
            return self.fn_ref.original_forward(*args, **kwargs)
        token_embeds = module.get_input_embeddings()(ids)
        last, penultimate, pooled = part(ids, token_embeds)
        dtype, device = token_embeds.dtype, token_embeds.device
        last, penultimate, pooled = (t.to(dtype=dtype, device=device) for t in (last, penultimate, pooled))
        hidden = (penultimate, last) if kwargs.get("output_hidden_states") else None
        if hasattr(module, "text_projection"):
            from transformers.models.clip.modeling_clip import CLIPTextModelOutput

            return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


# --- preparing and attaching -----------------------------------------------------------------------
@dataclass(frozen=True)
class PartPlan:
    """One part to prepare: what is hooked, what its key is made of, how it is converted."""
    name: str                         # a key of LABELS
    target: torch.nn.Module           # the module whose forward the compiled model replaces
    keyed_by: torch.nn.Module         # the module whose config goes into the cache key
    inputs: tuple[str, ...]
    convert: Callable[[], object]
    hook: type


def vae_parts(vae) -> list[PartPlan]:
    return [
        PartPlan("vae_decoder", vae.decoder, vae, ("sample",),
                 lambda: convert_vae_part(vae.decoder, vae.config.latent_channels), _RunConvNet),
        PartPlan("vae_encoder", vae.encoder, vae, ("sample",),
                 lambda: convert_vae_part(vae.encoder, vae.config.in_channels), _RunConvNet),
    ]


def text_encoder_parts(pipe) -> list[PartPlan]:
    plans = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            plans.append(PartPlan(name, encoder, encoder, ("input_ids", "token_embeds"),
                                  lambda encoder=encoder: convert_text_encoder(encoder), _RunTextEncoder))
    return plans


def prepare_part(plan: PartPlan, weights_hash: str, cache: OpenVINOCache, *, threads: int | None = None,
                 device: str = "CPU",
                 on_convert: Callable[[str], None] | None = None) -> OpenVINOPart:
    """The part compiled (read from the cache, else converted and cached) and hooked onto its
    module. Raises whatever converting or compiling raises; the module then stays on torch.

    The torch module's weights are parked (openvino_backend.park_weights: memory-mapped from its
    entry) as the UNet's are: they are still needed (the token lookup, a LoRA, an uncovered call)
    but then cost RAM only for the pages those touch, not a second copy beside OpenVINO's
    (SDXL's second text encoder alone is 2.8 GB in f32)."""
    started = time.monotonic()
    if plan.keyed_by.dtype != torch.float32:
        raise TypeError(f"its weights are {plan.keyed_by.dtype}; OpenVINO converts it from f32 weights")
    key = cache_key(weights_hash, plan.name, plan.keyed_by, plan.inputs)
    message = f"Preparing the {LABELS[plan.name]} for your CPU with OpenVINO: once"
    xml, from_cache = load_or_convert(cache, key, plan.target, plan.convert, message, on_convert=on_convert)
    park_weights(plan.target, cache.entry(key), torch.float32)
    compiled = compile_entry(cache, key, xml, "f32", threads, device)
    part = OpenVINOPart(plan.name, compiled, from_cache, time.monotonic() - started)
    registry = HookRegistry.check_if_exists_or_initialize(plan.target)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(plan.hook(part), HOOK_NAME)
    return part


def prepare_parts(plans: list[PartPlan], weights_hash: str, cache: OpenVINOCache, notes: list[str], *,
                  threads: int | None = None, device: str = "CPU",
                  on_convert: Callable[[str], None] | None = None) -> dict[str, OpenVINOPart]:
    """Each part compiled and hooked; one that fails stays on torch with a note in `notes` (one
    note per reason: parts that failed alike, e.g. all short of memory, are named together).
    `on_convert` hears what is being converted (the page shows it while the model loads)."""
    parts, failed = {}, {}
    for plan in plans:
        try:
            parts[plan.name] = prepare_part(plan, weights_hash, cache, threads=threads, device=device,
                                            on_convert=on_convert)
        except Exception as error:  # noqa: BLE001 - any failure must leave a part that runs (on torch)
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            failed.setdefault(f"{type(error).__name__}: {detail}", []).append(LABELS[plan.name])
    for reason, labels in failed.items():
        names = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
        note = f"OpenVINO could not prepare the {names} ({reason}); {'it runs' if len(labels) == 1 else 'they run'} on torch"
        logger.warning("%s", note)
        notes.append(note)
    return parts


def attached(module: torch.nn.Module) -> OpenVINOPart | None:
    """The compiled part hooked onto `module`, if any."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.part if hook is not None else None


def unload_before_steps(pipe) -> None:
    """Unload the compiled parts that run before the sampling steps (the text encoders and the VAE
    encoder): called when the steps begin. They are idle from then to the job's end, and their
    repacked weights would stay in RAM through the steps and the decode, when the UNet's and the
    decoder's are there too (SD 1.5's f32 text encoder: 0.33 GB; SDXL's two: 3.3 GB). The next
    call compiles them again from the cache's blob: ~0.3 s for SD 1.5's text encoder, per job
    (docs/benchmarks.md, `openvino-memory`). Parts on an Intel GPU stay: their weights are in its
    memory, and what compiling there again costs is not measured."""
    vae = getattr(pipe, "vae", None)
    modules = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None),
               getattr(vae, "encoder", None)]
    for module in modules:
        part = attached(module) if module is not None else None
        if part is not None and part.compiled.device == "CPU":
            part.unload()
