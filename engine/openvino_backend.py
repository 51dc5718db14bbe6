"""OpenVINO as the CPU backend for the UNet: converted once from the loaded diffusers UNet, cached
on disk, and run in place of torch's forward for the sampling passes that can use it.

Why: on a CPU, OpenVINO runs the same SD 1.5 UNet about 1.2x faster than torch fp32 at the same
quality (3.9e-6 relative RMS), and twice as fast in bf16 on CPUs with native bf16 (issue 14's
numbers; bench/openvino_unet.py measures it here). The UNet is ~all of a job's time; the VAE
and the text encoders are converted too, by engine/openvino_parts.py with this module's cache.
With `--device intel-gpu` the same cached graphs are compiled for an Intel GPU (engine.devices'
plan says where and in what precision; a GPU that fails to compile leaves the model on the CPU).

How it plugs in: the torch UNet stays the pipeline's `unet` (its config, dtype, device and LoRA
adapters all keep working), and for one sampling pass `OpenVINOUNet.running(unet)` replaces its
forward with the compiled model through diffusers' own `HookRegistry` (the mechanism
`engine.feature_cache` uses). Samplers, CFG, img2img, hires fix, previews and cancel live outside
the UNet's forward (the scheduler and the step-end callback), so they are unchanged. A call the
converted graph does not cover (class labels, a LoRA scale passed per call, ControlNet residuals
with a LoRA set) runs the torch forward instead, and the pass says so. A ControlNet job has a graph
of its own, the UNet with residual inputs (convert_unet_control; engine/networks/controlnet_openvino.py).

The `fast` speed (feature reuse, engine.feature_cache) runs here too, as two compiled parts: the
full graph, which also returns the deep features (the output of feature_cache.feature_part), and
the reuse step's graph, which takes them with the UNet's inputs and runs only the layers a reuse
step runs on torch (input conv, time embedding, the last layer, the output head). Each call is a
full or a reuse step by feature_cache's own rule (ReuseClock); the features stay in the pass's
hook between calls. The reuse graph is traced through diffusers' forward with feature_cache's
hooks in reuse mode, so the UNet's forward is never written out a second time.

Shapes: batch, latent height/width and prompt length are dynamic in the converted model, so any
size the request allows, batch size, CFG on or off (batch 1 or 2 per image) and long prompts
(77*k tokens) run on the one compiled model: no recompiling per size, no set of compiled shapes
that a request could fall outside of. The example input used for tracing has a latent size that
the UNet's downsampling does not divide, so diffusers takes its `forward_upsample_size` branch
(each upsampler sized from its skip connection) and that branch, which is right for every size,
is what the graph holds; a divisible example would bake in "double the size", wrong for others.

Cache: one entry per converted part ("unet", "unet_reuse") and (checkpoint hash, the part's
config, graph inputs, OpenVINO version, FORMAT), i.e. everything the converted graph depends on.
The precision (f32 or bf16) is a compile-time hint on the same f32 graph, so it is not part of
the key: one entry serves both. Int8 weights (`--precision int8`: NNCF's weight compression)
are other graphs, so entries of their own, with the compression (and NNCF's version) in the key;
each part is made from the model's f32 (or f16) entry when that is cached, else converted afresh
(no plain entry is written then: int8 is chosen to save room). An entry is a folder written under
a temp name and renamed into place (never seen half-written); its meta.json records the files' sizes and the xml's sha256, so
a truncated or damaged entry is found, removed and converted again. The least recently used
entries go once the cache is over its size limit.

Memory: OpenVINO's CPU plugin reads the weights memory-mapped from the entry and repacks them into
a copy of its own. `CompiledPart` hands the mapped pages back as it goes (engine.mapped_pages), the
UNet's activations are freed after each pass and the other parts' after each call, and the parts
that run before the steps are unloaded when the steps begin (engine.openvino_parts), so a cached
run holds one copy of each part's weights: its peak is below stock diffusers' (docs/benchmarks.md,
`openvino-memory`).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers
from diffusers.hooks import HookRegistry, ModelHook
from engine.devices import cast_floating
from engine.feature_cache import HOOK_NAME as REUSE_HOOK_NAME
from engine.feature_cache import FeatureReuse, ReuseClock, feature_part, step_key
from engine.mapped_pages import returning_pages
from engine.openvino_lora import FuseError, LoraVariant, fused_compile, stored_variant

logger = logging.getLogger(__name__)

# Bump when what is converted changes (the traced wrapper, the inputs): old entries stop matching.
FORMAT = 3
HOOK_NAME = "easel_openvino"
TRACED_PREFIX = "self.unet."  # the converted graph's weight names: the traced wrapper's attribute, then the module path
OUTPUTS = ("noise", "features")  # the full graph's outputs; the reuse graph has the first
# SD 1.5's UNet is 3.4 GB as an f32 graph, SDXL's 10 GB: room for a few of each.
DEFAULT_CACHE_LIMIT = 32 * 2**30
# Free memory converting needs beyond the loaded model, as a multiple of the UNet's f32 weights.
# Measured on SD 1.5's UNet (3.2 GB): converting and saving raised the peak RSS by 0.42 GB (0.13x),
# since the converted graph shares torch's weight memory instead of copying it; 0.5x leaves margin.
CONVERT_MEMORY_FACTOR = 0.5
PREPARING = "Preparing this model for your CPU with OpenVINO: about a minute, once"


def openvino_version() -> str:
    import openvino

    return openvino.__version__


def input_names(config) -> tuple[str, ...]:
    """The converted graph's inputs, in order, for a UNet with this config."""
    names = ["sample", "timestep", "encoder_hidden_states"]
    if config.get("time_cond_proj_dim") is not None:  # LCM: guidance goes in as an embedding
        names.append("timestep_cond")
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size conditioning
        names += ["text_embeds", "time_ids"]
    return tuple(names)


class _Traceable(torch.nn.Module):
    """The UNet's forward as positional tensors in, tensors out: what tracing needs. Its outputs
    are the noise prediction and the deep features (the output of `feature_cache.feature_part`,
    caught by a forward hook: tracing records the ops on tensors, so returning it makes it an
    output of the graph), which the `fast` speed's reuse steps are fed."""

    def __init__(self, unet: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.names = names

    def forward(self, *tensors):
        caught = []
        handle = feature_part(self.unet).register_forward_hook(lambda module, args, out: caught.append(_first(out)))
        try:
            noise = self.run_unet(tensors)
        finally:
            handle.remove()
        return noise, caught[-1]

    def run_unet(self, tensors) -> torch.Tensor:
        given = dict(zip(self.names, tensors))
        added = {k: given.pop(k) for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(given.pop("sample"), given.pop("timestep"), given.pop("encoder_hidden_states"),
                         added_cond_kwargs=added or None, return_dict=False, **given)[0]


class _TraceableReuse(_Traceable):
    """A reuse step as a graph: the UNet's inputs plus the deep features in, the noise prediction
    out. Traced with `FeatureReuse` attached in reuse mode, so every skipped part hands back what
    it remembered from one full run at the example inputs (constants the graph does not use, so
    OpenVINO drops them) and the feature part hands back the `features` input."""

    def __init__(self, unet: torch.nn.Module, names: tuple[str, ...], feed):
        super().__init__(unet, names)
        self.feed = feed  # the feature part's feature_cache._Remember hook

    def forward(self, *tensors):
        *inputs, features = tensors
        self.feed.output = _with_first(self.feed.output, features)
        return self.run_unet(inputs)


def _first(output):
    """The tensor of a block's output (attention blocks return a one-tensor tuple)."""
    return output if torch.is_tensor(output) else output[0]


def _with_first(output, tensor: torch.Tensor):
    """`output` with its tensor replaced by `tensor`, in the same structure."""
    if torch.is_tensor(output):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    raise TypeError(f"cannot feed features to a block that returns {type(output).__name__}")


def example_inputs(unet: torch.nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Small inputs to trace with: batch 2, prompt length 77, and a latent size the UNet's
    downsampling does not divide (see the module docstring)."""
    config = unet.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    height, width = 2 * factor + 1, 2 * factor + 3
    batch = 2
    made = {
        "sample": torch.randn(batch, config.in_channels, height, width),
        "timestep": torch.full((batch,), 999.0),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim),
    }
    if "timestep_cond" in names:
        made["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim)
    if "text_embeds" in names:
        time_ids = 6
        pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        made["text_embeds"] = torch.randn(batch, pooled)
        made["time_ids"] = torch.full((batch, time_ids), 512.0)
    return tuple(made[name] for name in names)


@contextmanager
def _quiet_trace() -> Iterator[None]:
    # diffusers' shape checks (asserts, the >= 64 batch contiguity rule) become constants in the
    # trace; none changes the result at the shapes Easel runs, so their warnings are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def convert_model(module: torch.nn.Module, example_input: tuple):
    """openvino.convert_model(module, example_input=...), leaving the root logger as it found it.

    OpenVINO's convert_model sets the root logger to ERROR (and may add a handler and a filter)
    while it converts, and restores them only when it succeeds (openvino/tools/ovc/convert.py,
    2026.4): after a failed conversion every warning in the process went unlogged, the note that
    the part or model now runs on torch included, and so did the rest of the session's warnings
    (found with issue 20's VAE encoder: a too-small example, traced in a test, silenced the
    next test's warning). Here the logger is restored either way and the error goes on up."""
    import openvino

    root = logging.getLogger()
    level, filters, handlers = root.level, list(root.filters), list(root.handlers)
    try:
        return openvino.convert_model(module, example_input=example_input)
    finally:
        root.setLevel(level)
        root.filters[:] = filters
        root.handlers[:] = handlers


def _named(model, names: tuple[str, ...], outputs: tuple[str, ...]):
    for port, name in zip(model.inputs, names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, outputs):
        port.get_tensor().set_names({name})
    return model


def convert_unet(unet: torch.nn.Module):
    """The UNet as an openvino.Model with dynamic batch, size and prompt length (f32 weights);
    outputs: the noise prediction, then the deep features (see _Traceable)."""
    names = input_names(unet.config)
    with _quiet_trace():
        model = convert_model(_Traceable(unet, names), example_input=example_inputs(unet, names))
    return _named(model, names, OUTPUTS)


def convert_unet_reuse(unet: torch.nn.Module):
    """The UNet's reuse step as an openvino.Model (see _TraceableReuse): inputs those of
    convert_unet's model plus "features", dynamic in the same way; output the noise prediction.
    Its weights are the few layers a reuse step runs (the input conv, the time embedding, the last
    layer and the output head)."""
    names = input_names(unet.config)
    example = example_inputs(unet, names)
    # An interval no pass reaches: after the one full run below, every call at this shape reuses.
    with _quiet_trace(), FeatureReuse(unet, interval=2**62):
        traceable = _Traceable(unet, names)
        _, features = traceable(*example)  # the full step whose outputs the skipped parts remember
        feed = HookRegistry.check_if_exists_or_initialize(feature_part(unet)).get_hook(REUSE_HOOK_NAME)
        model = convert_model(_TraceableReuse(unet, names, feed), example_input=(*example, features))
    return _named(model, (*names, "features"), OUTPUTS[:1])


CONTROL_PART = "unet_control"  # the UNet taking a ControlNet's residuals (engine/networks/controlnet_openvino.py)


def residual_shapes(config, sample_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of the residuals a ControlNet adds to a UNet of `config` at `sample_shape`: one
    per skip connection (the input conv's, each down layer's, each downsampler's), then the middle
    block's. Each downsampler is a stride-2, padding-1, 3x3 conv: a side s becomes (s - 1) // 2 + 1."""
    batch, _, h, w = sample_shape
    widths = config.block_out_channels
    per = config.layers_per_block
    per = [per] * len(widths) if isinstance(per, int) else list(per)
    shapes = [(batch, widths[0], h, w)]
    for level, width in enumerate(widths):
        shapes += [(batch, width, h, w)] * per[level]
        if level < len(widths) - 1:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            shapes.append((batch, width, h, w))
    return shapes + [(batch, widths[-1], h, w)]


def control_input_names(names: tuple[str, ...], n_down: int) -> tuple[str, ...]:
    return (*names, *(f"control_down_{i}" for i in range(n_down)), "control_mid")


class _TraceableControlled(_Traceable):
    """The UNet with a ControlNet's residuals as inputs: the UNet's inputs, then the skip
    connections' residuals, then the middle block's; out, the noise prediction."""

    def __init__(self, unet: torch.nn.Module, names: tuple[str, ...], n_down: int):
        super().__init__(unet, names)
        self.n_down = n_down

    def forward(self, *tensors):
        n = len(self.names)
        given = dict(zip(self.names, tensors[:n]))
        down, mid = tensors[n:n + self.n_down], tensors[n + self.n_down]
        added = {k: given.pop(k) for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(given.pop("sample"), given.pop("timestep"), given.pop("encoder_hidden_states"),
                         added_cond_kwargs=added or None, down_block_additional_residuals=tuple(down),
                         mid_block_additional_residual=mid, return_dict=False, **given)[0]


def convert_unet_control(unet: torch.nn.Module):
    """The UNet taking ControlNet residuals (see _TraceableControlled) as an openvino.Model, dynamic
    as convert_unet's; its weight names are the plain graph's (the wrapper's attribute is `unet`)."""
    names = input_names(unet.config)
    example = example_inputs(unet, names)
    shapes = residual_shapes(unet.config, tuple(example[0].shape))
    residuals = tuple(torch.randn(shape) for shape in shapes)
    with _quiet_trace():
        model = convert_model(_TraceableControlled(unet, names, len(shapes) - 1), example_input=(*example, *residuals))
    return _named(model, control_input_names(names, len(shapes) - 1), OUTPUTS[:1])


def cache_key(checkpoint_hash: str, part: str, module: torch.nn.Module, inputs: tuple[str, ...],
              stored: str = "f32", compression: str | None = None) -> str:
    """Everything one converted part's graph depends on (see the module docstring), hashed. `part`
    names what was converted ("unet", ...): each part is an entry of its own; `stored` is how its
    weights are saved ("f32", or "f16" for a bf16 plan: see stored_weights); `compression` how
    they were compressed ("int8"), None for the converted graph as it is."""
    config = module.config  # diffusers' FrozenDict, or a transformers PretrainedConfig (text encoders)
    config = {k: v for k, v in (config.to_dict() if hasattr(config, "to_dict") else dict(config)).items()
              if not k.startswith("_")}
    parts = {"checkpoint": checkpoint_hash, "part": part, "config": config, "inputs": inputs,
             "weights": str(module.dtype), "stored": stored, "openvino": openvino_version(), "format": FORMAT}
    if compression:  # only then: the other entries' keys stay what they were
        parts["compression"] = {"mode": compression, **_compression_settings(compression)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class OpenVINOCache:
    """Converted models on disk, one folder per key (see the module docstring): model.xml/.bin, the
    meta.json that vouches for them, and compiled/, OpenVINO's own cache of the compiled blob."""

    def __init__(self, root: Path, limit_bytes: int = DEFAULT_CACHE_LIMIT):
        self.root = Path(root)
        self.limit_bytes = limit_bytes

    def entry(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> Path | None:
        """The entry's model.xml for `key`, or None when there is none or it was damaged (a
        damaged entry is removed, so it is converted again)."""
        folder = self.entry(key)
        if not folder.is_dir():
            return None
        xml, weights = folder / "model.xml", folder / "model.bin"
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            if meta.get("key") != key or xml.stat().st_size != meta["xml_size"] or \
                    weights.stat().st_size != meta["bin_size"] or _sha256(xml) != meta["xml_sha256"]:
                raise ValueError("files differ from meta.json")
        except (OSError, ValueError, KeyError) as error:
            logger.warning("OpenVINO cache entry %s is damaged (%s); converting again", folder.name, error)
            self.remove(key)
            return None
        os.utime(folder / "meta.json")  # last used: the size limit removes the least recently used
        return xml

    def remove(self, key: str) -> None:
        shutil.rmtree(self.entry(key), ignore_errors=True)

    def store(self, key: str, model, stored: str = "f32") -> Path:
        """Write `model` as the entry for `key` (built in a temp folder, then renamed into place),
        its weights saved as `stored` says ("f32" or "f16"); returns its model.xml."""
        import openvino

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-", suffix=".tmp"))
        try:
            xml, weights = tmp / "model.xml", tmp / "model.bin"
            # compress_to_fp16 defaults to True: for an f32 plan it would halve the weights' precision.
            openvino.save_model(model, str(xml), compress_to_fp16=stored == "f16")
            meta = {"key": key, "xml_size": xml.stat().st_size, "bin_size": weights.stat().st_size,
                    "xml_sha256": _sha256(xml), "openvino": openvino_version(), "format": FORMAT}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            final = self.entry(key)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune(keep=key)
        return final / "model.xml"

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()) if self.root.is_dir() else 0

    def prune(self, keep: str) -> None:
        """Remove the least recently used entries (not `keep`) until the cache fits its limit;
        also temp folders of conversions that were killed."""
        if not self.root.is_dir():
            return
        for tmp in self.root.glob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > 24 * 3600:  # a live conversion is far younger
                shutil.rmtree(tmp, ignore_errors=True)
        entries = []
        for folder in self.root.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and folder.name != keep:
                meta = folder / "meta.json"
                used = meta.stat().st_mtime if meta.exists() else 0.0
                entries.append((used, folder))
        total = self.size()
        for _, folder in sorted(entries):
            if total <= self.limit_bytes:
                break
            total -= sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)

    def compile(self, xml: Path, device: str, config: dict):
        """The entry's model compiled for `device`. OpenVINO keeps the compiled blob in the entry's
        compiled/ folder, so later loads import it instead of compiling again; and compiling from
        the file (not from an openvino.Model) lets it memory-map the weights instead of copying them."""
        import openvino

        core = openvino.Core()
        core.set_property({"CACHE_DIR": str(xml.parent / "compiled")})
        return core.compile_model(str(xml), device, config)


# NNCF's weight compression for `--precision int8`: its default 8-bit mode, asymmetric per output
# channel, on every MatMul and Convolution (optimum-intel's choice for diffusion models too; 8 bits
# need no calibration data). The UNet then computes in f32 or bf16 from weights decompressed on the fly.
INT8_MODE = "int8_asym"


def _compression_settings(compression: str) -> dict:
    if compression != "int8":
        raise ValueError(f"unknown weight compression {compression!r}")
    import nncf

    return {"nncf_mode": INT8_MODE, "nncf": nncf.__version__}


def compress_int8(model):
    """The openvino.Model with its weights compressed to int8 by NNCF (see INT8_MODE)."""
    import nncf

    # Its INFO table of bit widths per layer is for NNCF's users tuning mixed precision; Easel asks
    # for one mode on every layer. (Set here: importing nncf resets its level to INFO.)
    nncf.set_log_level(logging.WARNING)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode(INT8_MODE))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class PassRecord:
    """Which backend ran the UNet's calls during one sampling pass, and for a `fast` pass its
    clock (full_steps, reused_steps, counted as on torch)."""
    used: set = field(default_factory=set)
    clock: ReuseClock | None = None


# Arguments of UNet2DConditionModel.forward the converted graph takes, or that do not change its result.
_COVERED = {"sample", "timestep", "encoder_hidden_states", "timestep_cond", "added_cond_kwargs", "return_dict"}


class _RunOnOpenVINO(ModelHook):
    """On the torch UNet for one pass: its forward runs the compiled model instead. With a clock
    (the `fast` speed), each call is a full step (the full graph, keeping its deep features) or a
    reuse step (the reuse graph, fed those features), decided by feature_cache's rule."""

    def __init__(self, unet_model: "OpenVINOUNet", record: PassRecord):
        super().__init__()
        self.unet_model = unet_model
        self.record = record
        self.features = None  # the last full step's deep features (a numpy array)

    def new_forward(self, module, *args, **kwargs):
        bound = inspect.signature(self.fn_ref.original_forward).bind(*args, **kwargs)
        given = bound.arguments
        added = given.get("added_cond_kwargs") or {}
        covered = all(k in _COVERED or v is None or (isinstance(v, dict) and not v) for k, v in given.items()) and \
            set(added) <= set(self.unet_model.names) and all(n in given or n in added
                                                             for n in self.unet_model.names)
        clock = self.record.clock
        if not covered:
            self.record.used.add("torch")
            if clock is not None:  # torch runs this call in full; the next call cannot reuse it
                clock.tick(None)
                self.features = None
            # The inputs came uncast (manager._cast_unet_inputs leaves OpenVINO passes in f32).
            dtype = module.dtype
            return self.fn_ref.original_forward(*cast_floating(args, dtype), **cast_floating(kwargs, dtype))
        self.record.used.add(self.unet_model.label)
        sample = given["sample"]
        inputs = {**given, **added}
        if clock is None:
            out = self.unet_model(inputs)
        elif clock.tick(step_key(sample, given.get("encoder_hidden_states"))) and self.features is not None:
            out = self.unet_model.reuse_step(inputs, self.features)
        else:
            out, self.features = self.unet_model.full_step(inputs)
        out = out.to(dtype=sample.dtype, device=sample.device)
        if given.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


class OpenVINOUNet:
    """A UNet compiled for the CPU in two parts, the full graph and the reuse step's (see
    convert_unet_reuse); `running(unet)` lends them to the torch UNet for one pass."""

    def __init__(self, compiled, compiled_reuse, names: tuple[str, ...], precision: str, from_cache: bool,
                 seconds: float, compression: str | None = None, device: str = "CPU"):
        self.compiled = compiled              # the full graph: noise prediction and deep features
        self.compiled_reuse = compiled_reuse  # the reuse step's graph
        self.names = names
        self.precision = precision    # the compile hint: "f32" or "bf16"
        self.from_cache = from_cache  # False: converted by this load
        self.seconds = seconds        # converting (or reading) plus compiling
        self.compression = compression  # "int8": NNCF-compressed weights; None: f32 (or f16) weights
        self.device = device            # where it was compiled: "CPU" or an Intel GPU ("GPU.0")
        self._loras = LoraVariant()     # the last LoRA set's fused graphs (engine.openvino_lora)
        self.checkpoint_hash: str | None = None  # set by prepare_unet: the key of parts made later
        self.parked_dtype: torch.dtype | None = None  # the torch UNet's weights' dtype (park_weights)
        self.control = None  # the UNet graph taking ControlNet residuals, once a job asked for it

    def for_loras(self, unet: torch.nn.Module):
        """(this UNet compiled with `unet`'s active LoRAs fused in, the seconds fusing and compiling
        took now, or None when the set's graphs were already made); a FuseError instead of the
        UNet when the set cannot be fused (then it runs on torch)."""
        if self.compression:
            return FuseError("int8-compressed OpenVINO weights cannot take a LoRA's deltas"), None

        def build(deltas, key):
            # One compiled UNet in memory at a time: the plain graphs go while a LoRA set's run
            # (compiled again from their blob, a few seconds, when a job without LoRAs comes).
            self.compiled.unload()
            self.compiled_reuse.unload()
            parts, read = [], True
            for part, every in ((self.compiled, True), (self.compiled_reuse, False)):
                # The reuse graph holds a few layers only: the deltas of the others are not its.
                base = part.folder / "model.xml"
                cache = OpenVINOCache(part.folder.parent)  # the plain entry's own cache
                xml, how = stored_variant(cache, base, key, TRACED_PREFIX, deltas, every, stored_weights(self.precision))
                read = read and how == "read"
                if xml is None:  # fused in memory this time (see stored_variant)
                    compile_fused = functools.partial(fused_compile, base, TRACED_PREFIX, deltas(),
                                                      part.device, part.config, every)
                else:
                    compile_fused = functools.partial(cache.compile, xml, part.device, part.config)
                parts.append(CompiledPart(compile_fused, (xml or base).parent, part.device, part.config))
            # from_cache: read from the cache, not fused by this job (the job's note says which)
            return OpenVINOUNet(*parts, self.names, self.precision, read, 0.0, None, self.device)

        value, built = self._loras.get(unet, build)
        return value, (self._loras.seconds if built else None)

    def unload(self) -> None:
        """Drop the compiled graphs, the LoRA set's and the ControlNet one's too (each compiles again
        from its blob if called)."""
        for own in (self, self._loras.value):
            if isinstance(own, OpenVINOUNet):
                own.compiled.unload()
                own.compiled_reuse.unload()
        if self.control is not None:
            self.control.unload()

    def drop_loras(self) -> None:
        """Forget the last LoRA set's graphs (a job without LoRAs is about to run the plain ones)."""
        self._loras.clear()

    @property
    def label(self) -> str:
        """What ran the UNet, as the infotext's Backend says it: "openvino", "openvino int8",
        "openvino intel-gpu" (on an Intel GPU), ..."""
        return "openvino" + (f" {self.compression}" if self.compression else "") + \
            ("" if self.device == "CPU" else " intel-gpu")

    def _feed(self, inputs: dict) -> dict:
        sample = inputs["sample"]
        timestep = torch.as_tensor(inputs["timestep"])
        if timestep.dim() == 0:  # the pipelines pass one timestep for the whole batch
            timestep = timestep.expand(sample.shape[0])
        return {name: _array(timestep if name == "timestep" else inputs[name]) for name in self.names}

    def __call__(self, inputs: dict) -> torch.Tensor:
        """The noise prediction (the features are computed too: they come with the graph)."""
        return torch.from_numpy(self.compiled(self._feed(inputs))[0])

    def full_step(self, inputs: dict):
        """(noise prediction, deep features to feed the reuse steps that follow)."""
        result = self.compiled(self._feed(inputs))  # share_outputs=False: arrays of their own
        return torch.from_numpy(result[0]), result[1]

    def reuse_step(self, inputs: dict, features) -> torch.Tensor:
        return torch.from_numpy(self.compiled_reuse({**self._feed(inputs), "features": features})[0])

    @contextmanager
    def running(self, unet: torch.nn.Module, reuse_interval: int | None = None) -> Iterator[PassRecord]:
        """The compiled UNet in place of `unet`'s forward for one pass; `reuse_interval`: the
        `fast` speed, one full step in this many."""
        record = PassRecord(clock=None if reuse_interval is None else ReuseClock(reuse_interval))
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        registry.register_hook(_RunOnOpenVINO(self, record), HOOK_NAME)
        unet._easel_openvino_pass = True  # the graph takes f32: see manager._cast_unet_inputs
        try:
            yield record
        finally:
            unet._easel_openvino_pass = False
            registry.remove_hook(HOOK_NAME, recurse=False)  # the hook goes, and the features with it
            for compiled in (self.compiled, self.compiled_reuse):  # the steps' activations go too,
                compiled.release_memory()                       # before the VAE decodes


def _array(tensor: torch.Tensor):
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def stored_weights(precision: str) -> str:
    """How a part's weights are saved for a compile `precision`. OpenVINO's CPU plugin keeps the
    saved constants besides the copy it repacks for its kernels, so f32 weights cost the UNet 5.3 GB
    in a bf16 plan (3.3 GB constants + 1.7 GB bf16 + scratch); saved as f16 they cost 3.7 GB. The
    weights end up bf16 anyway, and f16 holds more mantissa bits than bf16: the step's difference
    from torch fp32 went from 2.3% to 2.7% relative RMS on the full-size SD 1.5 UNet (random weights),
    bf16's own rounding being the most of it. An f32 plan keeps f32: exact is its point."""
    return "f16" if precision in ("bf16", "f16") else "f32"  # f16: an Intel GPU's compute


def park_weights(module: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """Give `module` its weights in `dtype` memory-mapped from `folder`/torch-<dtype>.pt (written
    from the module's own weights the first time): they cost RAM only while a pass runs on torch.

    Why: OpenVINO holds its own compiled copy, so the torch weights kept beside it (for the passes
    that still run on torch: a LoRA, an uncovered call) doubled the model's memory (peak RSS 9.2 GB
    against stock diffusers' 5.5 for SD 1.5). Memory-mapped, they are file pages the kernel can drop.
    Copy-on-write: nothing writes to the file once it is there."""
    path = folder / f"torch-{str(dtype).removeprefix('torch.')}.pt"
    state = None
    if path.is_file():
        try:
            state = torch.load(path, mmap=True, weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged file is written again from the weights
            logger.warning("damaged %s (%s); writing it again", path, error)
            state = None
    if state is None or set(state) != set(module.state_dict()):
        module.to(dtype=dtype)
        tmp = folder / f".{path.name}.tmp"
        try:
            torch.save(module.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        state = torch.load(path, mmap=True, weights_only=True)
    module.load_state_dict(state, assign=True)


def unet_bytes(unet: torch.nn.Module) -> int:
    """The UNet's weights in f32, whatever dtype they are held in now."""
    return sum(p.numel() for p in unet.parameters()) * 4


def check_memory_for_conversion(unet: torch.nn.Module) -> None:
    """MemoryError saying how much is needed when converting would likely not fit."""
    import psutil

    need = unet_bytes(unet) * CONVERT_MEMORY_FACTOR
    free = psutil.virtual_memory().available
    if free < need:
        raise MemoryError(f"converting needs about {need / 2**30:.1f} GB free and {free / 2**30:.1f} GB is")


def prepare_unet(unet: torch.nn.Module, checkpoint_hash: str, cache: OpenVINOCache, *,
                 precision: str = "f32", threads: int | None = None, device: str = "CPU",
                 torch_dtype: torch.dtype | None = None,
                 on_convert: Callable[[str], None] | None = None, compression: str | None = None) -> OpenVINOUNet:
    """The UNet compiled for the CPU in its two parts (the full graph and the reuse step's, see
    convert_unet_reuse): each read from the cache, else converted (and cached). Raises whatever
    converting or compiling raises; the caller falls back to torch. With `torch_dtype`, the torch
    UNet's weights are parked (park_weights) in that dtype before compiling, so its in-RAM copy is
    gone before OpenVINO's is made: the load's peak memory holds one UNet, not two.
    `on_convert` hears PREPARING before a conversion starts (the page shows it: it takes a minute).
    `compression` "int8": the weights compressed by NNCF, entries of their own (one for f32 and bf16
    compute: the int8 weights are the same, and what stays uncompressed, norms and biases, is small)."""
    started = time.monotonic()
    names = input_names(unet.config)
    stored = "f32" if compression else stored_weights(precision)
    entries, from_cache = [], True  # (key, model.xml) per part
    for part, part_inputs, convert in (("unet", names, convert_unet),
                                       ("unet_reuse", (*names, "features"), convert_unet_reuse)):
        key = cache_key(checkpoint_hash, part, unet, part_inputs, stored, compression)
        xml = cache.load(key)
        if xml is None:
            if from_cache:  # said once, by the first part to convert
                logger.warning(PREPARING)
                if on_convert:
                    on_convert(PREPARING)
            from_cache = False
            model = _plain_entry(cache, checkpoint_hash, part, unet, part_inputs) if compression else None
            if model is None:
                check_memory_for_conversion(unet)
                model = convert(unet)
            if compression:
                model = compress_int8(model)
            xml = cache.store(key, model, stored)
            del model  # the graph holds its own copy of the weights until it goes
        entries.append((key, xml))
    if torch_dtype is not None:  # after converting: both parts are traced from the f32 UNet
        park_weights(unet, cache.entry(entries[0][0]), torch_dtype)
    compiled = [compile_entry(cache, key, xml, precision, threads, device) for key, xml in entries]
    model = OpenVINOUNet(*compiled, names, precision, from_cache, time.monotonic() - started, compression, device)
    model.checkpoint_hash, model.parked_dtype = checkpoint_hash, torch_dtype
    return model


def _plain_entry(cache: OpenVINOCache, checkpoint_hash: str, part: str, unet, inputs: tuple[str, ...]):
    """The part's uncompressed graph read from its cached entry (f32, else a bf16 plan's f16: its
    rounding, ~1/2048, is far below int8's 1/255 of a channel's range), or None when neither is cached."""
    import openvino

    for plain in ("f32", "f16"):
        xml = cache.load(cache_key(checkpoint_hash, part, unet, inputs, plain))
        if xml is not None:
            return openvino.Core().read_model(str(xml))
    return None


def load_or_convert(cache: OpenVINOCache, key: str, module: torch.nn.Module, convert: Callable[[], object],
                    message: str, stored: str = "f32", on_convert: Callable[[str], None] | None = None):
    """(model.xml, from_cache) of the entry `key`: read, else made by `convert()` (an openvino.Model
    of `module`; `message` is logged and told to `on_convert` first) and stored: one part's entry
    (engine.openvino_parts' VAE and text encoders; prepare_unet does the same for its two graphs,
    saying PREPARING once for both)."""
    xml = cache.load(key)
    if xml is not None:
        return xml, True
    logger.warning(message)
    if on_convert:
        on_convert(message)
    check_memory_for_conversion(module)
    model = convert()
    xml = cache.store(key, model, stored)
    del model  # the graph holds its own copy of the weights until it goes
    return xml, False


class CompiledPart:
    """A compiled model of one cache entry, called like OpenVINO's CompiledModel.

    While it compiles and runs, the entry's memory-mapped weights that OpenVINO has read and
    repacked are handed back (engine.mapped_pages), so they do not stay resident beside its copy.
    `unload()` drops the compiled model (its repacked weights and activations) until the next call
    compiles it again from the entry's blob: for parts that are idle most of a job (the text
    encoders during the steps and the decode)."""

    def __init__(self, compile: Callable[[], object], folder: Path, device: str = "CPU", config: dict | None = None):
        self._compile = compile
        self.folder = folder
        self.device = device  # "CPU", or an Intel GPU ("GPU.0")
        self.config = config or {}  # what it was compiled with (a LoRA variant is compiled alike)
        self.compiled = None
        self.load()

    def load(self):
        """The compiled model, compiled again first if it was unloaded (raises what compiling raises)."""
        compiled = self.compiled  # one read: an unload() meanwhile must not make this return None
        if compiled is None:
            with returning_pages(self.folder):  # an f32 compile repacks the weights there and then
                compiled = self.compiled = self._compile()
        return compiled

    @property
    def loaded(self) -> bool:
        return self.compiled is not None

    def unload(self) -> None:
        self.compiled = None

    @property
    def outputs(self):
        return self.load().outputs

    def __call__(self, inputs):
        compiled = self.load()
        with returning_pages(self.folder):
            return compiled(inputs)

    def release_memory(self) -> None:
        """Free the activations OpenVINO keeps between calls (allocated again by the next call):
        done when a part's work for a job is over, so a part idle while another runs (the UNet
        during the VAE decode, the VAE during the next job's steps) holds no working memory."""
        compiled = self.compiled
        if compiled is None:
            return
        try:
            compiled.release_memory()
        except RuntimeError as error:  # a device whose plugin lacks it (not the CPU's): memory as before
            logger.debug("release_memory: %s", error)


def compile_entry(cache: OpenVINOCache, key: str, xml: Path, precision: str = "f32",
                  threads: int | None = None, device: str = "CPU") -> CompiledPart:
    """The entry's model compiled for `device` (the CPU, or an Intel GPU: "GPU.0") with the latency
    hint. A failure on the CPU removes the entry (a damaged compiled blob or weights: converted
    afresh next time) and raises; on a GPU it only raises (its driver, not the entry, may be why)."""
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads and device == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return CompiledPart(lambda: cache.compile(xml, device, config), xml.parent, device, config)
    except RuntimeError:
        if device == "CPU":
            cache.remove(key)
        raise
