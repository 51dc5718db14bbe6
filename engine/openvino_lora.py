"""LoRAs on the OpenVINO parts (the UNet's two graphs and the text encoders): the LoRA set's weight
deltas are added to the cached graph's weights and that graph is compiled, once per set of LoRAs
and weights; jobs with the same set run it at the plain graph's speed.

Why fusing (issue 23), of the three ways the field uses:
- OpenVINO GenAI's adapters keep the LoRA matrices as graph state and change weights per call
  without recompiling, but they belong to its own pipelines and model layout (optimum's export);
  Easel's graphs are its own conversions of the loaded modules.
- Graph inputs for the deltas (x -> x@W + (x@A)@B per layer) would make a weight change free, but
  every plain job would carry ~300 extra small matmuls with runtime weights, LoRAs on 3x3 convs
  (LoCon, LCM-LoRA's resnets) need convolutions with runtime weights, and a plain job's pixels would
  no longer be the plain graph's.
- Fusing (W + sum of scale * B@A, what ComfyUI and Forge do on torch) takes every layer kind peft
  loads (Linear, 1x1 and 3x3 convs) with no change to the graph: the jobs after the first run at
  exactly the plain graph's speed. A new set of LoRAs or weights pays the fuse and a compile: 2-4 s
  for SD 1.5's UNet on a 2-core Zen 4 (bench/lora_openvino.py; docs/benchmarks.md). One compiled UNet
  is kept at a time: a LoRA set's replaces the plain one (compiled again from its blob for the next
  job without LoRAs, which runs the plain graph, untouched). Text encoders keep both: they are small.

Fused UNet graphs are also stored in the OpenVINO cache, from a set's second fuse on
(stored_variant): every CLI run is a new process, and without the store each paid the fuse again
(4-5 s of a 4-step LCM-LoRA job of ~40 s, measured on a 2-core Zen 4); read back it is ~1 s. Not on
the first fuse: a weight sweep would write a 1.7 GB graph (SD 1.5, f16) per weight, each used once.

The deltas come from peft's own layers (`get_delta_weight`: scale, alpha/rank, conv kernels and
fan-in/fan-out as peft applies them on torch), so a LoRA means here what it means on torch, in
every key layout diffusers loads. Each delta is added to the weight constant the conversion named
after the module (`self.<wrapper>.<module path>.weight`, or `..._compressed` for weights stored as
f16); a delta with no such constant (a graph that folded it away), or int8-compressed weights,
leave that LoRA set on torch, and the job's notes say why.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def active_lora_layers(module: torch.nn.Module):
    """(module path, peft LoRA layer) for each layer with an active adapter at a nonzero scale."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no LoRA can have been loaded
        return []
    found = []
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and any(layer.scaling.get(a, 0) != 0 and a in layer.lora_A
                                                for a in layer.active_adapters):
            found.append((name, layer))
    return found


def lora_key(module: torch.nn.Module) -> tuple:
    """What the module's LoRA deltas depend on: each active adapter (named after its file's hash,
    engine.lora) and its scale, layer by layer. Equal keys: equal deltas."""
    return tuple((name, tuple(sorted((a, float(layer.scaling[a])) for a in layer.active_adapters
                                     if a in layer.lora_A)))
                 for name, layer in active_lora_layers(module))


def lora_deltas(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module path: the sum of its active adapters' delta weights} in float32, as peft adds them."""
    deltas = {}
    with torch.no_grad():
        for name, layer in active_lora_layers(module):
            total = None
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A and layer.scaling.get(adapter, 0) != 0:
                    delta = layer.get_delta_weight(adapter).float()
                    total = delta if total is None else total + delta
            if total is not None:
                deltas[name] = total
    return deltas


class FuseError(Exception):
    """A delta this graph cannot take (its weight constant is not there): the set stays on torch."""


def fused_model(xml: Path, prefix: str, deltas: dict[str, torch.Tensor], every: bool = True):
    """The cached graph at `xml` with each delta added to its module's weight constant (named
    `prefix + path + ".weight"`, or with "_compressed" for f16-stored weights): a new
    openvino.Model; the constants it does not replace stay memory-mapped from the entry. `every`:
    each delta must find its weight (FuseError if not); False for a graph of some layers only."""
    import openvino

    model = openvino.Core().read_model(str(xml))
    constants = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}
    for path, delta in deltas.items():
        name = f"{prefix}{path}.weight"
        op = constants.get(name) or constants.get(name + "_compressed")
        if op is None:
            if every:
                raise FuseError(f"the graph has no weight for {path}")
            continue
        base = op.get_data()
        if base.dtype not in (np.float32, np.float16) or int(np.prod(base.shape)) != delta.numel():
            raise FuseError(f"{path}'s weight in the graph is {base.dtype} {tuple(base.shape)}, "
                            f"not a float of {tuple(delta.shape)}")
        fused = (base.astype(np.float32) + delta.numpy().reshape(base.shape)).astype(base.dtype)
        replacement = openvino.op.Constant(fused)
        replacement.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(replacement.output(0))
    return model


def fused_compile(xml: Path, prefix: str, deltas: dict[str, torch.Tensor], device: str, config: dict,
                  every: bool = True):
    """`fused_model` compiled for `device` with `config` (no blob cache: each set is compiled once,
    and a blob per set would fill the disk with copies of the model)."""
    import openvino

    model = fused_model(xml, prefix, deltas, every)
    return openvino.Core().compile_model(model, device, config)


SEEN = ".lora-sets-seen"  # in the cache's root: one empty file per LoRA set fused once (stored_variant)
FUSE_FORMAT = 1  # bump when how deltas are made or added changes: stored sets stop matching


def variant_key(base_entry: str, set_key: tuple) -> str:
    """The cache key of a LoRA set's fused graph: the plain graph's entry (its key holds the
    checkpoint, the part and OpenVINO's version), what the deltas depend on (lora_key: adapters
    named after their files' hashes, scales layer by layer), and how they were made (peft's
    get_delta_weight, this module's FUSE_FORMAT)."""
    import peft

    return hashlib.sha256(repr(("lora", FUSE_FORMAT, peft.__version__, base_entry, set_key)).encode()).hexdigest()[:32]


def stored_variant(cache, xml: Path, set_key: tuple, prefix: str, deltas, every: bool,
                   stored: str) -> tuple[Path | None, str]:
    """(the model.xml of this LoRA set's fused graph in `cache`, an OpenVINOCache, and "read" or
    "stored" by this call), or (None, "memory") when it is to be fused in memory.

    A set is stored the second time it is fused (in this process or any other): its next process compiles it from the entry and OpenVINO's blob instead of fusing
    again (fusing and compiling the UNet took 4-5 s of a 4-step 40 s job on a 2-core Zen 4,
    docs/benchmarks.md). The first time writes only a marker, so a sweep over weights (each
    weight a set of its own) does not fill the disk with a 1.7 GB graph per weight. `deltas()`
    gives the deltas, computed only when fusing; FuseError as fused_model."""
    key = variant_key(xml.parent.name, set_key)
    found = cache.load(key)
    if found is not None:
        return found, "read"
    marker = cache.root / SEEN / key
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return None, "memory"
    return cache.store(key, fused_model(xml, prefix, deltas(), every), stored), "stored"


class LoraVariant:
    """The last LoRA set's compiled variant of something (a UNet's graphs, a text encoder): made by
    `build(deltas, key)` when the module's LoRA key changes (`deltas()` computes the set's deltas:
    not needed when the variant is read from the cache), kept until the next set replaces it."""

    def __init__(self):
        self.key: tuple | None = None
        self.value = None
        self.seconds = 0.0  # what building the current one took

    def clear(self) -> None:
        self.key, self.value = None, None

    def get(self, module: torch.nn.Module, build):
        """(the variant for `module`'s active LoRAs, whether it was built now). `build` raises
        FuseError when the set cannot be fused; that is remembered, so the set is not tried again."""
        key = lora_key(module)
        if key != self.key:
            self.key, self.value = None, None  # the old set's compiled graph goes first: one at a time
            started = time.monotonic()
            deltas = functools.cache(lambda: lora_deltas(module))  # computed once, and only if fusing
            try:
                self.value = build(deltas, key)
            except FuseError as error:
                self.value = error
            self.key, self.seconds = key, time.monotonic() - started
            return self.value, True
        return self.value, False
