"""The one place that decides device and precision.

`Hardware` is what the machine has (detected once, or built by hand in tests). `plan_for` turns
hardware + a model family + the user's overrides into a frozen `DevicePlan`, backend included
(torch, or OpenVINO for the UNet on a CPU: engine/openvino_backend.py). Everything that needs
a device or a dtype asks the plan; nothing else derives one. `DevicePlan.step_down` is the
out-of-memory ladder: each call returns the next, more frugal plan.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

import torch

from engine.errors import RequestError

if TYPE_CHECKING:
    from engine.families import FamilyInfo


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    # The UNet's weights stored as 8-bit integers (NNCF's weight compression of the OpenVINO graph),
    # computed in fp32 or bf16 as auto would. SD 1.5's UNet (random weights): a quarter of the
    # saved graph, 1.1-1.4 GB less peak memory, 1.4% relative RMS per step from torch fp32 against
    # f32's 2.5e-6 (bench/openvino_memory.py, bench/openvino_int8.py). OpenVINO on a CPU only.
    INT8 = "int8"


DEVICES = ("auto", "cuda", "mps", "cpu", "intel-gpu")
# What runs the UNet. "auto": OpenVINO on a CPU plan where it is installed (1.2x torch fp32 at the
# same quality, 2.8x with native bf16: issue 14's numbers), torch everywhere else.
BACKENDS = ("auto", "torch", "openvino")
_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Hardware:
    cuda: bool = False
    cuda_name: str = ""
    cuda_vram_gb: float = 0.0
    cuda_bf16: bool = False
    mps: bool = False
    cpu_bf16: bool = False  # native bf16 matmul (AVX512-BF16 / AMX): twice fp32's speed, not emulated
    physical_cores: int = 1
    openvino: bool = False  # the openvino package imports (installed only on x86-64: pyproject.toml)
    intel_gpus: tuple[str, ...] = ()  # Intel GPUs OpenVINO sees, by name (torch cannot use them)
    openvino_gpu: str = ""  # OpenVINO's name for the first of them ("GPU.0"): what --device intel-gpu uses
    nncf: bool = False      # NNCF is installed: it compresses the OpenVINO UNet's weights to int8

    @classmethod
    def detect(cls) -> "Hardware":
        cuda = torch.cuda.is_available()
        name, vram, cuda_bf16 = "", 0.0, False
        if cuda:
            props = torch.cuda.get_device_properties(0)
            name, vram = props.name, props.total_memory / 2**30
            cuda_bf16 = torch.cuda.is_bf16_supported()
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return cls(cuda=cuda, cuda_name=name, cuda_vram_gb=round(vram, 1), cuda_bf16=cuda_bf16, mps=mps,
                   cpu_bf16=_cpu_has_native_bf16(), physical_cores=_physical_cores(),
                   openvino=_openvino_imports(), **_intel_gpus(),
                   nncf=importlib.util.find_spec("nncf") is not None)


def _openvino_imports() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is the same as none: torch runs
        return False
    return True


def _intel_gpus() -> dict:
    """The GPUs OpenVINO can drive (Intel's; it lists them as GPU, GPU.0, ...): their names, and
    OpenVINO's device name for the first."""
    try:
        import openvino

        core = openvino.Core()
        ids = [d for d in core.available_devices if d.startswith("GPU")]
        return {"intel_gpus": tuple(core.get_property(d, "FULL_DEVICE_NAME") for d in ids),
                "openvino_gpu": ids[0] if ids else ""}
    except Exception:  # noqa: BLE001 - no OpenVINO, or no GPU driver: none to name
        return {}


def _cpu_has_native_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


# The OOM ladder, most to least demanding. Each rung keeps the ones before it.
LADDER = ("full", "sliced", "offload", "cpu")


@dataclass(frozen=True)
class DevicePlan:
    device: str
    unet_dtype: torch.dtype
    text_encoder_dtype: torch.dtype
    vae_dtype: torch.dtype
    upcast_attention: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    channels_last: bool = False  # UNet and VAE weights in NHWC (measured, not a win on the CPUs tried so far)
    threads: int | None = None
    backend: str = "torch"  # what runs the UNet: "torch" or "openvino" (CPU only)
    # Where OpenVINO compiles the model: "CPU", or an Intel GPU by OpenVINO's name ("GPU.0"); torch
    # (device "cpu") keeps what it runs: the token lookup, the scheduler, passes OpenVINO does not cover.
    openvino_device: str = "CPU"
    gpu_f16: bool = True  # on an Intel GPU: the UNet computes in f16 (fp32 asked for: f32)
    int8_weights: bool = False  # OpenVINO's UNet weights compressed to int8 (unet_dtype: its compute)
    rung: str = "full"
    notes: tuple[str, ...] = field(default=())

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype weights are read in: the plan's one dtype when every part shares it, else fp32
        (each part is then cast to its own dtype when the plan is applied)."""
        dtypes = {self.unet_dtype, self.text_encoder_dtype, self.vae_dtype}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def on_intel_gpu(self) -> bool:
        return self.backend == "openvino" and self.openvino_device != "CPU"

    @property
    def openvino_precision(self) -> str:
        """The UNet's compile hint: f16 (or f32) on an Intel GPU; on the CPU, bf16 where the plan's
        UNet is bf16 (native there), else f32. The VAE and text encoders compile in f32 everywhere."""
        if self.on_intel_gpu:
            return "f16" if self.gpu_f16 else "f32"
        return "bf16" if self.unet_dtype == torch.bfloat16 else "f32"

    def describe(self) -> str:
        compute = {"f16": "fp16", "f32": "fp32", "bf16": "bf16"}[self.openvino_precision] if self.on_intel_gpu \
            else _DTYPE_NAMES[self.unet_dtype]
        unet = f"unet int8 weights ({compute} compute)" if self.int8_weights else f"unet {compute}"
        where = f"intel-gpu {self.openvino_device}" if self.on_intel_gpu else self.device
        parts = [where + (" (OpenVINO)" if self.backend == "openvino" else ""), unet,
                 f"text encoder {_DTYPE_NAMES[self.text_encoder_dtype]}", f"vae {_DTYPE_NAMES[self.vae_dtype]}"]
        if self.upcast_attention:
            parts.append("attention upcast")
        if self.attention_slicing:
            parts.append("attention slicing + VAE tiling")
        if self.cpu_offload:
            parts.append("model CPU offload")
        if self.channels_last:
            parts.append("channels-last")
        if self.threads and not self.on_intel_gpu:
            parts.append(f"{self.threads} threads")
        return ", ".join(parts)

    def with_fp32_vae(self) -> "DevicePlan":
        """After a half-precision VAE decoded to NaNs (A1111's black images): decode in fp32."""
        return replace(self, vae_dtype=torch.float32,
                       notes=self.notes + ("VAE produced NaNs in half precision; it now runs in fp32",))

    def step_down(self, hardware: Hardware, family: FamilyInfo) -> "DevicePlan | None":
        """The next rung after an out-of-memory error, or None when nothing is left to give up."""
        if self.device == "cpu":
            return None
        if self.rung == "full":
            return replace(self, rung="sliced", attention_slicing=True, vae_tiling=True,
                           notes=self.notes + ("out of memory: enabled attention slicing and VAE tiling",))
        if self.rung == "sliced" and self.device == "cuda":
            return replace(self, rung="offload", cpu_offload=True,
                           notes=self.notes + ("out of memory: moved idle model parts to the CPU (model CPU offload)",))
        # Torch on the CPU: converting for OpenVINO in the middle of a job would take a minute.
        cpu = plan_for(family, hardware, device="cpu", backend="torch")
        return replace(cpu, rung="cpu", notes=self.notes + (f"out of memory on {self.device}: running on the CPU",))


def cast_floating(value, dtype: torch.dtype):
    """`value` with its floating tensors cast to `dtype`: a tensor, or a dict, tuple or list of
    values (a UNet call's arguments); anything else as it is."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


def resolve_device(hardware: Hardware, device: str) -> str:
    """The device "auto" or the user's --device means on this machine; RequestError if it is absent.
    Used by plan_for, and by the upscalers, which have no family plan of their own."""
    if device not in DEVICES:
        raise RequestError("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if hardware.cuda else "mps" if hardware.mps else "cpu"
    if device == "cuda" and not hardware.cuda:
        raise RequestError("device", "cuda was asked for but no CUDA GPU is available (use auto or cpu)")
    if device == "mps" and not hardware.mps:
        raise RequestError("device", "mps was asked for but Apple's Metal backend is not available (use auto or cpu)")
    if device == "intel-gpu":
        if not hardware.openvino_gpu:
            raise RequestError("device", "intel-gpu was asked for but OpenVINO sees no Intel GPU (use auto or cpu)")
        return "cpu"  # torch's side of such a plan runs on the CPU; plan_for compiles for the GPU
    return device


def _parse_precision(precision: str | Precision) -> Precision:
    try:
        return Precision(precision)
    except ValueError:
        allowed = ", ".join(p.value for p in Precision)
        raise RequestError("precision", f"must be one of {allowed}, got {precision!r}") from None


def _backend(hardware: Hardware, device: str, backend: str, notes: list[str], intel_gpu: bool = False) -> str:
    """"torch" or "openvino" for a plan on `device`; a request it cannot honour is noted.
    `intel_gpu`: --device intel-gpu, which only OpenVINO can run."""
    if backend not in BACKENDS:
        raise RequestError("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        if intel_gpu:
            notes.append("the Intel GPU runs models with OpenVINO only; --backend torch runs on the CPU")
        return "torch"
    if device != "cpu":
        if backend == "openvino":
            notes.append(f"OpenVINO runs the UNet on the CPU only; {device} runs on torch")
        return "torch"
    if not hardware.openvino:
        if backend == "openvino":
            notes.append("OpenVINO is not installed (it is for x86-64 CPUs); using torch")
        return "torch"
    if hardware.intel_gpus and not intel_gpu:
        # Not chosen by auto: Easel has not been measured on one (no Intel GPU on the machines it
        # is built on), so auto keeps the CPU, whose figures are known; the user can opt in.
        notes.append(f"Intel GPU found ({', '.join(hardware.intel_gpus)}); OpenVINO runs the model on the CPU "
                     "(--device intel-gpu runs it there)")
    # RAM decides nothing here: a cached OpenVINO run peaks below torch's (engine/mapped_pages.py,
    # docs/benchmarks.md `openvino-memory`), and converting is checked against the free memory
    # first (openvino_backend.check_memory_for_conversion: torch, with a note, where it won't fit).
    return "openvino"


def _intel_gpu_plan(hardware: Hardware, wanted: Precision, int8: bool, notes: list[str]) -> DevicePlan:
    """--device intel-gpu: OpenVINO compiles the model for the GPU, the UNet in f16 unless fp32 is
    asked for (what OpenVINO's GPU plugin computes in by default; it has no bf16), the VAE and text
    encoders in f32 (SDXL's VAE overflows f16). The torch modules beside them (the token lookup,
    passes OpenVINO does not cover) stay on the CPU in fp32."""
    if wanted is Precision.BF16:
        notes.append("the Intel GPU computes in fp16 or fp32 with OpenVINO, not bf16; using fp16")
    return DevicePlan("cpu", torch.float32, torch.float32, torch.float32, threads=hardware.physical_cores,
                      backend="openvino", int8_weights=int8, openvino_device=hardware.openvino_gpu,
                      gpu_f16=wanted is not Precision.FP32, notes=tuple(notes))


def _no_int8(hardware: Hardware, device: str, backend: str) -> str | None:
    """Why int8 weights cannot run on this plan, or None when they can."""
    if device != "cpu":
        return f"weights run on OpenVINO on the CPU only, not on {device}"
    if backend != "openvino":
        return "weights need the OpenVINO backend" + ("" if hardware.openvino else " (not installed)")
    if not hardware.nncf:
        return "weights need NNCF to compress them (pip install nncf)"
    return None


def plan_for(family: FamilyInfo, hardware: Hardware, device: str = "auto",
             precision: str | Precision = Precision.AUTO, backend: str = "auto") -> DevicePlan:
    dev = resolve_device(hardware, device)
    wanted = _parse_precision(precision)
    notes: list[str] = []
    intel_gpu = device == "intel-gpu"
    backend = _backend(hardware, dev, backend, notes, intel_gpu)
    int8 = wanted is Precision.INT8
    if int8:
        why = _no_int8(hardware, dev, backend)
        if why:
            int8, wanted = False, Precision.AUTO
            notes.append(f"int8 {why}; using the auto precision")

    if dev == "cpu" and intel_gpu and backend == "openvino":
        return _intel_gpu_plan(hardware, wanted, int8, notes)
    if dev == "cpu":
        # fp16 has no CPU kernels for conv ("slow_conv2d_cpu" not implemented for 'Half'): never.
        if wanted is Precision.FP16:
            wanted = Precision.BF16 if hardware.cpu_bf16 else Precision.FP32
            notes.append(f"fp16 cannot run on the CPU; using {wanted.value}")
        if wanted in (Precision.AUTO, Precision.INT8):
            # Native bf16 about halves the UNet's time; without native support torch emulates it and
            # it is far slower than fp32 (docs/benchmarks.md).
            wanted = Precision.BF16 if hardware.cpu_bf16 else Precision.FP32
        compute = _DTYPES[wanted]
        # The text encoder runs once per prompt and the VAE once per image: fp32 keeps them clean.
        # Channels-last stays off and the attention default stays: both measured no faster, and
        # channels-last costs memory (docs/benchmarks.md).
        # OpenVINO compiles the UNet for the same precision: f32, or bf16 where it is native.
        return DevicePlan(dev, compute, torch.float32, torch.float32,
                          threads=hardware.physical_cores, backend=backend, int8_weights=int8, notes=tuple(notes))

    if wanted is Precision.AUTO:
        wanted = Precision.FP16
        if dev == "cuda" and "GTX 16" in hardware.cuda_name:
            # Turing GTX 16xx cards produce NaNs (black images) in fp16.
            wanted = Precision.FP32
            notes.append("GTX 16xx cards produce black images in fp16; using fp32")
    if wanted is Precision.BF16 and dev == "cuda" and not hardware.cuda_bf16:
        wanted = Precision.FP16
        notes.append("this GPU has no bf16; using fp16")
    compute = _DTYPES[wanted]
    half = compute != torch.float32
    # SDXL's VAE overflows in fp16 (NaN images); MPS's fp16 VAE is unreliable too.
    vae = torch.float32 if half and compute == torch.float16 and (family.fp16_vae_overflows or dev == "mps") else compute
    return DevicePlan(dev, compute, compute, vae, upcast_attention=half and family.upcast_attention,
                      notes=tuple(notes))
