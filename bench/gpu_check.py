"""The CUDA path, measured (issue 21): one section of the GPU check per call, or the report.

    bash bench/gpu_check.sh              # on the GPU machine: every section, report in $OUT
    bash bench/gpu_check.sh --dry-run    # here: the same code on the tiny models, on the CPU

    python bench/gpu_check.py --section sd15 --work DIR [--dry-run]   # one section -> DIR/sec-sd15.json
    python bench/gpu_check.py --report --work DIR --out OUT            # DIR/sec-*.json -> OUT/report.{md,json}

Each section runs in its own process (gpu_check.sh gives each a `timeout`), so one that fails or
hangs is recorded and the others still run, and `set_per_process_memory_fraction` (the simulated
8 GB / 4 GB cards) stays in the ladder's process. Models are full-size architectures with random
weights (the published SD 1.5 / SDXL configs, as bench/cpu_benchmark.py and bench/sdxl_unet_step.py
build them), made once into DIR/models in fp16; nothing is fetched from any hub. --dry-run builds
the tiny models of tests/tiny_models.py instead and shrinks every size to 64x64, so every code path
runs on the CPU in about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

SECTIONS = ("env", "sd15", "sdxl", "ladder-8gb", "ladder-4gb", "lora", "hires", "esrgan", "inpaint")
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED, CFG = 1, 7.0
ROUNDS = 2  # Easel, stock, Easel, stock: the first of each pays CUDA's kernel selection


class SectionFailed(Exception):
    """A section that ran to its end with a failing finding: its figures are kept in the report."""

    def __init__(self, message: str, data: dict):
        super().__init__(message)
        self.data = data


class Ctx:
    def __init__(self, work: Path, dry: bool):
        import torch

        self.work, self.dry = work, dry
        self.cuda = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.cuda else "cpu"
        self.models = work / "models"
        # Sizes: the on the GPU; 64x64 (tiny VAE: factor 2) and few steps in the dry run.
        self.sd15_size, self.sdxl_size = (64, 64) if dry else (512, 1024)
        self.steps = 3 if dry else 20

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()


# --- models --------------------------------------------------------------------------------------
def _save(pipe, dest: Path, half: bool) -> Path:
    import torch

    if half:
        pipe.to(torch.float16)
    tmp = dest.with_name(dest.name + ".partial")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, dest)
    return dest


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1)


def _sd15_full(scheduler, inpaint: bool = False):
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cpu_benchmark import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
    from engine.tokenizers import load_clip_tokenizer

    unet = UNet2DConditionModel(**{**SD15_UNET, "in_channels": 9 if inpaint else 4})
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(unet=unet.eval(), vae=AutoencoderKL(**SD15_VAE).eval(),
               text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval(),
               tokenizer=load_clip_tokenizer("clip-l"), scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, as SDXL base ships it
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=0,
)


def _sdxl_full(scheduler):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cpu_benchmark import SD15_TEXT_ENCODER, SD15_VAE
    from engine.tokenizers import load_clip_tokenizer
    from sdxl_unet_step import SDXL_UNET

    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET).eval(),
        vae=AutoencoderKL(**{**SD15_VAE, "scaling_factor": 0.13025, "force_upcast": True}).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval(), tokenizer=load_clip_tokenizer("clip-l"),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)).eval(),
        tokenizer_2=load_clip_tokenizer("open-clip"),
        scheduler=scheduler, add_watermarker=False,
    )


def ensure_model(ctx: Ctx, kind: str) -> str:
    """The folder models/Stable-diffusion/<kind>-random, built once (random weights, fp16 when full)."""
    import torch

    name = f"{kind}-random"
    dest = ctx.models / "Stable-diffusion" / name
    if (dest / "model_index.json").is_file():
        return name
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if ctx.dry:
        from tiny_models import tiny_pipeline

        pipe = tiny_pipeline({"sd15": "sd1", "sdxl": "sdxl", "sd15-inpaint": "sd1-inpaint"}[kind])
    else:
        scheduler = _scheduler()  # outside the device scope: its tables stay on the CPU
        with torch.device(ctx.device):  # random init on the GPU: seconds, not minutes
            pipe = _sdxl_full(scheduler) if kind == "sdxl" else _sd15_full(scheduler, inpaint=kind == "sd15-inpaint")
    _save(pipe, dest, half=not ctx.dry)
    del pipe
    return name


def ensure_esrgan(ctx: Ctx) -> Path:
    """A RealESRGAN_x4plus-layout .pth (23 RRDB blocks of 64 features, random) in models/ESRGAN."""
    import torch

    from field_files import rrdb_state_dict

    dest = ctx.models / "ESRGAN" / "RealESRGAN_x4plus.pth"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        state = rrdb_state_dict(0) if ctx.dry else rrdb_state_dict(0, blocks=23, feat=64)
        torch.save({"params_ema": state}, dest)
    return dest


def ensure_lora(ctx: Ctx, model: str) -> str:
    from safetensors.torch import save_file

    dest = ctx.models / "Lora" / "gpu-check.safetensors"
    if not dest.is_file():
        from diffusers import StableDiffusionPipeline

        from test_lora import kohya_lora

        pipe = StableDiffusionPipeline.from_pretrained(str(ctx.models / "Stable-diffusion" / model),
                                                       local_files_only=True, safety_checker=None)
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in kohya_lora(pipe, 3).items()}, str(dest))
    return dest.stem


# --- measuring -----------------------------------------------------------------------------------
class UnetClock:
    """Start of the first and end of the last UNet call (synchronised): it/s over the denoising loop."""

    def __init__(self, ctx: Ctx, unet):
        self.ctx, self.first, self.last, self.calls = ctx, None, None, 0
        self.handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, *_):
        if self.first is None:
            self.ctx.sync()
            self.first = time.perf_counter()

    def _post(self, *_):
        self.ctx.sync()
        self.last, self.calls = time.perf_counter(), self.calls + 1

    def its(self) -> float:
        span = (self.last or 0) - (self.first or 0)
        return round(self.calls / span, 3) if span > 0 else 0.0

    def close(self):
        for h in self.handles:
            h.remove()


def timed(ctx: Ctx, unet, fn) -> dict:
    import torch

    clock = UnetClock(ctx, unet)
    before = 0
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    ctx.sync()
    t0 = time.perf_counter()
    try:
        out = fn()
        ctx.sync()
        seconds = time.perf_counter() - t0
    finally:
        clock.close()
    rec = {"s_per_image": round(seconds, 3), "it_s": clock.its(), "unet_calls": clock.calls, "result": out}
    if ctx.cuda:
        rec["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec["run_vram_gb"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
    return rec


def make_engine(ctx: Ctx, **config):
    from engine.engine import Engine, EngineConfig

    # The dry run keeps torch on the CPU too (not OpenVINO, the CPU's auto backend): the CUDA path's code.
    config.setdefault("backend", "torch")
    return Engine(EngineConfig(ctx.models, ctx.work / "outputs", ctx.work / "data", watermark=False, **config))


def easel_run(ctx: Ctx, eng, model: str, fields: dict) -> dict:
    req = eng.make_request({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": ctx.steps,
                            "cfg_scale": CFG, "sampler": "Euler", "save_images": False, **fields}, model=model)
    loaded = eng.load_model(model)
    rec = timed(ctx, loaded.pipe.unet, lambda: eng.generate(req, model=model))
    result = rec.pop("result")
    rec["plan"] = eng.manager.current.plan.describe() if eng.manager.current else None
    rec["rung"] = eng.manager.current.plan.rung if eng.manager.current else None
    rec["notes"] = list(getattr(result, "notes", []) or [])
    rec["image"] = list(result.images[0].size)
    return rec


def stock_pipe(ctx: Ctx, model: str, sdxl: bool):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    dtype = torch.float16 if ctx.cuda else torch.float32
    pipe = cls.from_pretrained(str(ctx.models / "Stable-diffusion" / model), local_files_only=True, torch_dtype=dtype,
                               **({} if sdxl else {"safety_checker": None}))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(ctx.device)


def stock_run(ctx: Ctx, pipe, size: int) -> dict:
    import torch

    rec = timed(ctx, pipe.unet, lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=ctx.steps,
                                             guidance_scale=CFG, width=size, height=size,
                                             generator=torch.Generator("cpu").manual_seed(SEED)))
    rec["image"] = list(rec.pop("result").images[0].size)
    return rec


def best(records: list[dict], key: str, low: bool) -> float:
    values = [r[key] for r in records[1:] or records]  # the warm rounds
    return min(values) if low else max(values)


def versus(ctx: Ctx, kind: str, size: int) -> dict:
    """Easel and stock diffusers in one process, alternating, ROUNDS each."""
    model = ensure_model(ctx, kind)
    eng = make_engine(ctx)
    stock = stock_pipe(ctx, model, sdxl=kind == "sdxl")
    easel_recs, stock_recs = [], []
    for _ in range(ROUNDS):
        easel_recs.append(easel_run(ctx, eng, model, {"width": size, "height": size}))
        stock_recs.append(stock_run(ctx, stock, size))
    out = {"size": size, "steps": ctx.steps, "rounds": ROUNDS, "easel": easel_recs, "stock": stock_recs,
           "easel_s_per_image": best(easel_recs, "s_per_image", True),
           "stock_s_per_image": best(stock_recs, "s_per_image", True),
           "easel_it_s": best(easel_recs, "it_s", False), "stock_it_s": best(stock_recs, "it_s", False),
           "plan": easel_recs[-1]["plan"]}
    out["speedup_vs_stock"] = round(out["stock_s_per_image"] / max(out["easel_s_per_image"], 1e-9), 3)
    out["seconds"] = out["easel_s_per_image"]
    if ctx.cuda:
        out["easel_peak_vram_gb"] = max(r["peak_vram_gb"] for r in easel_recs)
        out["stock_peak_vram_gb"] = max(r["peak_vram_gb"] for r in stock_recs)
    out["_engine"], out["_model"] = eng, model
    del stock
    return out


# --- sections ------------------------------------------------------------------------------------
TORCH_ATTR = re.compile(r"\btorch(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def torch_api_scan() -> list[str]:
    """Every torch.a.b... chain named in engine/*.py that this torch does not have (the dotted names
    Easel needs from a newer torch: on the GPU machine's 2.11 these are what breaks)."""
    import importlib

    import torch

    missing = set()
    for path in sorted((ROOT / "engine").glob("*.py")):
        for chain in set(TORCH_ATTR.findall(path.read_text(encoding="utf-8"))):
            if chain.startswith("torch.ops."):  # operator namespaces resolve lazily (engine/compat.py)
                continue
            obj, parts = torch, chain.split(".")[1:]
            for i, part in enumerate(parts):
                if hasattr(obj, part):
                    obj = getattr(obj, part)
                    continue
                try:  # a submodule not imported yet (torch.utils.flop_counter)
                    obj = importlib.import_module("torch." + ".".join(parts[:i + 1]))
                    continue
                except ImportError:
                    pass
                # attribute chains on objects (torch.Tensor.foo) or aliases end here
                if not isinstance(obj, type(torch)):
                    break
                missing.add(f"{path.name}: {chain}")
                break
    # Private torch internals engine/ reaches (`from torch import _x as y`, not caught above).
    private = {"safe_files.py": ("_weights_only_unpickler._get_allowed_globals",
                                 "_weights_only_unpickler._get_user_allowed_globals")}
    for file, chains in private.items():
        for chain in chains:
            module, attr = chain.rsplit(".", 1)
            try:
                if not hasattr(importlib.import_module("torch." + module), attr):
                    missing.add(f"{file}: torch.{chain}")
            except ImportError:
                missing.add(f"{file}: torch.{module}")
    # Keyword arguments engine/ passes that older torches lack.
    import inspect

    if "mmap" not in inspect.signature(torch.load).parameters:
        missing.add("safe_files.py, openvino_backend.py: torch.load(mmap=...)")
    if "assign" not in inspect.signature(torch.nn.Module.load_state_dict).parameters:
        missing.add("checkpoints.py: Module.load_state_dict(assign=...)")
    return sorted(missing)


def sec_env(ctx: Ctx) -> dict:
    import torch

    t0 = time.perf_counter()
    import diffusers
    import transformers

    import engine.compat  # noqa: F401
    from engine.engine import Engine  # noqa: F401 - the whole engine imports on this torch
    from engine.devices import Hardware

    hw = Hardware.detect()
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0) if ctx.cuda else platform.processor() or "cpu",
           "hardware_cuda": bool(hw.cuda), "missing_torch_apis": torch_api_scan(),
           "import_s": round(time.perf_counter() - t0, 2)}
    try:
        import spandrel

        out["spandrel"] = spandrel.__version__
    except ImportError as error:
        out["spandrel"] = f"missing: {error}"
    if ctx.cuda:
        out["vram_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    out["seconds"] = out["import_s"]
    return out


def sec_sd15(ctx: Ctx) -> dict:
    out = versus(ctx, "sd15", ctx.sd15_size)
    out.pop("_engine"), out.pop("_model")
    return out


def sec_sdxl(ctx: Ctx) -> dict:
    import torch

    out = versus(ctx, "sdxl", ctx.sdxl_size)
    eng, model = out.pop("_engine"), out.pop("_model")
    loaded = eng.manager.current
    out["planned_vae"] = str(loaded.plan.vae_dtype).replace("torch.", "")
    # The NaN retry: force a half-precision VAE, and make its first decode overflow (random weights
    # need not), so engine/generator.py's retry in fp32 must catch it.
    half = torch.float16 if ctx.cuda else torch.bfloat16
    eng.manager.replan(loaded, replace(loaded.plan, vae_dtype=half))
    vae, original, fired = loaded.pipe.vae, loaded.pipe.vae.decode, []

    def overflowing(latents, *args, **kwargs):
        result = original(latents, *args, **kwargs)
        if vae.dtype != torch.float32 and not fired:
            fired.append(True)
            result[0].fill_(float("nan"))
        return result

    vae.decode = overflowing
    try:
        rec = easel_run(ctx, eng, model, {"width": ctx.sdxl_size, "height": ctx.sdxl_size})
    finally:
        vae.decode = original
    retry = {"forced_vae": str(half).replace("torch.", ""), "nan_injected": bool(fired),
             "vae_after": str(eng.manager.current.plan.vae_dtype).replace("torch.", ""),
             "s_per_image": rec["s_per_image"], "notes": rec["notes"]}
    retry["retried_in_fp32"] = retry["vae_after"] == "float32" and any("NaN" in n for n in rec["notes"])
    out["nan_retry"] = retry
    if not retry["retried_in_fp32"]:
        raise SectionFailed("the NaN retry did not run", out)
    return out


def _ladder(ctx: Ctx, gb: float) -> dict:
    import torch

    model = ensure_model(ctx, "sdxl")
    out = {"simulated_gb": gb}
    if ctx.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total))
        out["fraction"] = round(gb * 2**30 / total, 4)
    else:
        out["simulated"] = "no (CPU dry run: the ladder starts and ends on the CPU)"
    eng = make_engine(ctx)
    t0 = time.perf_counter()
    try:
        # Loading can itself run out of memory at 4 GB: that is recorded as the result.
        rec = easel_run(ctx, eng, model, {"width": ctx.sdxl_size, "height": ctx.sdxl_size})
        out.update(finished=True, rung=rec["rung"], plan=rec["plan"], notes=rec["notes"],
                   s_per_image=rec["s_per_image"], it_s=rec["it_s"])
        if ctx.cuda:
            out["peak_vram_gb"] = rec["peak_vram_gb"]
    except Exception as error:  # noqa: BLE001 - the rung it died on is the finding
        current = eng.manager.current
        out.update(finished=False, rung=current.plan.rung if current else "load",
                   error=f"{type(error).__name__}: {str(error)[:300]}")
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if not out["finished"]:
        raise SectionFailed(f"ladder {gb} GB did not finish", out)
    return out


def sec_ladder_8gb(ctx: Ctx) -> dict:
    return _ladder(ctx, 8.0)


def sec_ladder_4gb(ctx: Ctx) -> dict:
    return _ladder(ctx, 4.0)


def sec_lora(ctx: Ctx) -> dict:
    model = ensure_model(ctx, "sd15")
    lora = ensure_lora(ctx, model)
    eng = make_engine(ctx)
    size = {"width": ctx.sd15_size, "height": ctx.sd15_size}
    base = easel_run(ctx, eng, model, size)
    rec = easel_run(ctx, eng, model, {**size, "prompt": f"{PROMPT} <lora:{lora}:0.8>"})
    return {"lora": lora, "seconds": rec["s_per_image"], "it_s": rec["it_s"], "without_lora_s": base["s_per_image"],
            "notes": rec["notes"], **({"peak_vram_gb": rec["peak_vram_gb"]} if ctx.cuda else {})}


def sec_hires(ctx: Ctx) -> dict:
    model = ensure_model(ctx, "sd15")
    eng = make_engine(ctx)
    rec = easel_run(ctx, eng, model, {"width": ctx.sd15_size, "height": ctx.sd15_size, "enable_hr": True,
                                      "hr_scale": 2.0, "hr_upscaler": "Latent", "denoising_strength": 0.5})
    if rec["image"] != [2 * ctx.sd15_size] * 2:
        raise AssertionError(f"hires x2 gave {rec['image']}")
    return {"seconds": rec["s_per_image"], "image": rec["image"], "unet_calls": rec["unet_calls"],
            **({"peak_vram_gb": rec["peak_vram_gb"]} if ctx.cuda else {})}


def sec_esrgan(ctx: Ctx) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    ensure_esrgan(ctx)
    eng = make_engine(ctx)
    names = [n for n in eng.upscaler_names() if "RealESRGAN" in n]
    if not names:
        raise AssertionError(f"no ESRGAN upscaler offered: {eng.upscaler_names()}")
    side = 64 if ctx.dry else 1024
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(2):  # the first pays the load and kernel selection
        ctx.sync()
        t0 = time.perf_counter()
        result = eng.upscale(image, names[0], scale=4, save=False)
        ctx.sync()
        runs.append(round(time.perf_counter() - t0, 3))
    size = list(result.images[0].size)
    if size != [4 * side] * 2:
        raise AssertionError(f"4x of {side} gave {size}")
    return {"upscaler": names[0], "input": side, "output": size, "first_s": runs[0], "seconds": runs[-1],
            "device": eng.upscalers.device if hasattr(eng.upscalers, "device") else None,
            **({"peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if ctx.cuda else {})}


def sec_inpaint(ctx: Ctx) -> dict:
    from PIL import Image

    model = ensure_model(ctx, "sd15-inpaint")
    eng = make_engine(ctx)
    side = ctx.sd15_size
    init = Image.new("RGB", (side, side), (90, 120, 150))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    rec = easel_run(ctx, eng, model, {"mode": "img2img", "init_image": init, "mask": mask, "mask_blur": 0,
                                      "denoising_strength": 0.9, "width": side, "height": side})
    return {"seconds": rec["s_per_image"], "it_s": rec["it_s"], "plan": rec["plan"], "image": rec["image"],
            **({"peak_vram_gb": rec["peak_vram_gb"]} if ctx.cuda else {})}


def run_section(name: str, ctx: Ctx) -> dict:
    fn = globals()["sec_" + name.replace("-", "_")]
    t0 = time.perf_counter()
    try:
        data = fn(ctx)
        status = "ok"
    except SectionFailed as error:
        data = {**error.data, "error": str(error)}
        status = "failed"
    except Exception as error:  # noqa: BLE001 - recorded; the other sections still run
        data = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        status = "failed"
    return {"section": name, "status": status, "wall_s": round(time.perf_counter() - t0, 2),
            "dry_run": ctx.dry, "device": ctx.device, **data}


# --- report --------------------------------------------------------------------------------------
def _line(rec: dict) -> str:
    keys = ("seconds", "easel_s_per_image", "stock_s_per_image", "easel_it_s", "stock_it_s", "speedup_vs_stock",
            "easel_peak_vram_gb", "stock_peak_vram_gb", "peak_vram_gb", "rung", "finished", "planned_vae", "torch",
            "device", "error")
    parts = [f"{k} {rec[k]}" for k in keys if k in rec]
    if "nan_retry" in rec:
        parts.append(f"NaN retry: forced {rec['nan_retry']['forced_vae']} -> {rec['nan_retry']['vae_after']}")
    if rec.get("missing_torch_apis"):
        parts.append("torch APIs missing here: " + "; ".join(rec["missing_torch_apis"]))
    return ", ".join(str(p) for p in parts)


def write_report(work: Path, out: Path) -> dict:
    sections = {}
    for name in SECTIONS:
        path = work / f"sec-{name}.json"
        if path.is_file():
            sections[name] = json.loads(path.read_text())
        else:
            status = (work / f"sec-{name}.status").read_text().strip() if (work / f"sec-{name}.status").is_file() \
                else "not run"
            sections[name] = {"section": name, "status": "failed", "error": f"no result ({status})"}
    report = {"sections": sections, "ok": sum(s["status"] == "ok" for s in sections.values()),
              "total": len(SECTIONS)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["# Easel GPU check", "", f"{report['ok']} of {report['total']} sections ok.", "",
             "| section | status | wall s | figures |", "| --- | --- | --- | --- |"]
    for name, rec in sections.items():
        lines.append(f"| {name} | {rec['status']} | {rec.get('wall_s', '')} | {_line(rec).replace('|', '/')} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=SECTIONS)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.report:
        report = write_report(args.work, args.out or args.work)
        return 0 if report["ok"] == report["total"] else 1
    if not args.section:
        ap.error("--section or --report")
    import engine.compat  # noqa: F401 - the torchvision shim before diffusers
    ctx = Ctx(args.work, args.dry_run)
    rec = run_section(args.section, ctx)
    (args.work / f"sec-{args.section}.json").write_text(json.dumps(rec, indent=2, default=str))
    print(f"[{args.section}] {rec['status']} in {rec['wall_s']} s: {_line(rec)}", flush=True)
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
