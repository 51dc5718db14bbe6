"""CPU benchmark: stock diffusers against Easel's engine on the same full-size SD 1.5 weights.

    venv/bin/python bench/cpu_benchmark.py                 # 4 steps, well under 10 minutes on 2 cores
    venv/bin/python bench/cpu_benchmark.py --full          # 20 steps (the issue's done-criterion run)

The weights are random (no pretrained weights are reachable offline) but the architecture is
SD 1.5's exactly, so time and memory are the real ones. They are built once into
`bench/cache/models/Stable-diffusion/sd15-random/` (a diffusers folder, ~4.3 GB) and reused.

Every variant runs in its own subprocess, one after the other, so each peak RSS is that variant's
alone and one full-size model is in memory at a time. Each child writes a JSON record and its PNG;
the parent prints one summary line per variant and writes a section of `docs/benchmarks.md`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "cache"
MODEL_NAME = "sd15-random"
DOC = ROOT / "docs" / "benchmarks.md"
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED, CFG = 1, 7.0
# One SD 1.5 UNet call at 512x512 with CFG (batch 2), counted with torch.utils.flop_counter
# (multiply-add = 2 FLOP); `--count-flops` recounts it.
UNET_GFLOP_PER_STEP = 1607.0
# SD 1.5's UNet (its published unet/config.json, architecture fields); bench/openvino_unet.py uses it too.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1,
)
# SD 1.5's VAE and text encoder (their published configs); bench/openvino_parts.py uses them too.
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


# --- model cache ------------------------------------------------------------------------------
def model_folder(cache: Path = CACHE) -> Path:
    return cache / "models" / "Stable-diffusion" / MODEL_NAME


def build_sd15_random(dest: Path) -> Path:
    """Full-size SD 1.5 components (its published configs) with seeded random weights."""
    import engine.compat  # noqa: F401  (torchvision shim before diffusers)
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.tokenizers import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=load_clip_tokenizer("clip-l"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = dest.with_name(dest.name + ".partial")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, dest)  # a half-written cache is never mistaken for a whole one
    return dest


def ensure_model(cache: Path = CACHE) -> Path:
    folder = model_folder(cache)
    if not (folder / "model_index.json").is_file():
        print(f"building random-weight SD 1.5 into {folder} (once)", flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_sd15_random(folder)
    return folder


# --- measuring helpers --------------------------------------------------------------------------
class Timings:
    """Wall time of every call of a module (forward hooks) or of a bound method (wrapper)."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def module(self, module, name: str) -> None:
        def before(_module, _args):
            _module._bench_t0 = time.perf_counter()

        def after(_module, _args, _out):
            self.calls.setdefault(name, []).append(time.perf_counter() - _module._bench_t0)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def method(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.setdefault(name, []).append(time.perf_counter() - t0)

        setattr(owner, attr, timed)

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, []))

    def steps(self, name: str) -> list[float]:
        return list(self.calls.get(name, []))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def machine_info() -> dict:
    import torch

    info = {"cpu": platform.processor() or "unknown", "flags": "", "cores": os.cpu_count(), "ram_gb": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu"] in ("unknown", "x86_64", ""):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "vnni")) or "bf16" in f]
                info["flags"] = " ".join(keep)
                break
        fam = [ln for ln in text.splitlines() if ln.startswith(("cpu family", "model\t"))][:2]
        info["family_model"] = ", ".join(ln.replace("\t", "").strip() for ln in fam)
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["ram_gb"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    info["torch"] = torch.__version__
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    info["threads"] = torch.get_num_threads()
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = diffusers.__version__, transformers.__version__
    except ImportError:
        pass
    return info


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> dict:
    """GFLOP/s of a square matmul in fp32 and bf16: the ceiling the UNet's GFLOP/s is judged against."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Without native bf16 torch's bf16 mm can be ~1000x slower than fp32: size the test from a
        # small probe so one call stays under about a second.
        probe = torch.randn(256, 256, dtype=dtype)
        torch.mm(probe, probe)
        t0 = time.perf_counter()
        torch.mm(probe, probe)
        rate = 2 * 256**3 / max(time.perf_counter() - t0, 1e-6)
        size = n if rate * 1.0 >= 2 * n**3 else 256
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up: oneDNN/MKL pick their kernels on the first call
        n_used = size
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            runs += 1
        out[name] = round(2 * n_used**3 * runs / (time.perf_counter() - t0) / 1e9, 1)
    return out


def count_unet_gflop(folder: Path) -> float:
    """Count one CFG UNet call at 512x512 on the meta device (no weights loaded, no compute)."""
    import engine.compat  # noqa: F401  (torchvision shim before diffusers)
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(str(folder / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x, t, ctx = torch.randn(2, 4, 64, 64), torch.tensor([999.0] * 2), torch.randn(2, 77, 768)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=ctx)
    return counter.get_total_flops() / 1e9


# --- the variants (each runs in a child process) ------------------------------------------------
def run_stock(folder: Path, steps: int, out: Path) -> dict:
    """(a) Stock diffusers, default CPU settings: fp32, its default (SDPA) attention, torch's threads."""
    import engine.compat  # noqa: F401  (torchvision shim before diffusers)
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    load_s = time.perf_counter() - t0
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # A1111 "Euler"
    pipe.set_progress_bar_config(disable=True)
    timings = Timings()
    timings.module(pipe.unet, "unet")
    timings.module(pipe.text_encoder, "text_encoder")
    timings.method(pipe.vae, "decode", "vae_decode")
    t0 = time.perf_counter()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                 width=512, height=512, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    total = time.perf_counter() - t0
    return _record("diffusers-fp32", "stock diffusers, fp32, default CPU settings", load_s, total, timings, image, out)


def run_easel(folder: Path, steps: int, out: Path, precision: str, speed: str = "exact", interval: int | None = None,
              backend: str = "auto") -> dict:
    """(b) Easel's engine with the plan it picks for this machine (or a forced precision); speed
    "fast" reuses deep UNet features, one full step in `interval` (default: the engine's)."""
    import engine.compat  # noqa: F401  (torchvision shim before diffusers)
    from engine.engine import Engine, EngineConfig

    data = CACHE / "data"  # keeps the model hash cache between runs, so loading is not re-hashing 3.4 GB
    eng = Engine(EngineConfig(folder.parent.parent, out / "outputs", data, precision=precision, watermark=False,
                              backend=backend))
    if interval is not None:
        eng.generator.reuse_interval = interval
    t0 = time.perf_counter()
    loaded = eng.load_model(MODEL_NAME)
    load_s = time.perf_counter() - t0
    pipe = loaded.pipe
    timings = Timings()
    timings.module(pipe.unet, "unet")
    timings.module(pipe.text_encoder, "text_encoder")
    timings.method(pipe.vae, "decode", "vae_decode")
    req = eng.make_request({"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": steps,
                            "cfg_scale": CFG, "width": 512, "height": 512, "sampler": "Euler",
                            "save_images": False, "speed": speed}, model=MODEL_NAME)
    t0 = time.perf_counter()
    image = eng.generate(req, model=MODEL_NAME).images[0]
    total = time.perf_counter() - t0
    name = ("easel-auto" if precision == "auto" else f"easel-{precision}") + ("-torch" if backend == "torch" else "")
    what = f"Easel engine, plan: {loaded.plan.describe()}"
    if speed == "fast":
        name = "easel-fast" if interval is None else f"easel-fast-{interval}"
        what += f"; speed fast: one full UNet step in {eng.generator.reuse_interval}, deep features reused in between"
    record = _record(name, what, load_s, total, timings, image, out)
    record["reuse"] = speed == "fast"
    if speed == "fast":
        n = eng.generator.reuse_interval
        calls = timings.steps("unet")
        full = [t for i, t in enumerate(calls) if i % n == 0][1:]  # the first call pays kernel selection
        reused = [t for i, t in enumerate(calls) if i % n]
        record["unet_full_step_s"] = round(sum(full) / max(1, len(full)), 2)
        record["unet_reuse_step_s"] = round(sum(reused) / max(1, len(reused)), 2)
        record["what"] += (f" (full steps {record['unet_full_step_s']} s, reuse steps {record['unet_reuse_step_s']} s, "
                           f"{len(reused)} of {len(calls)} steps reused)")
    return record


def _record(name, what, load_s, total, timings: Timings, image, out: Path) -> dict:
    import torch

    png = out / f"{name}.png"
    image.save(png)
    unet_steps = timings.steps("unet")
    # The first UNet call pays oneDNN's kernel selection; report the mean of the rest when there are any.
    steady = unet_steps[1:] or unet_steps
    return {
        "name": name, "what": what, "load_s": round(load_s, 2), "end_to_end_s": round(total, 2),
        "unet_calls": len(unet_steps), "unet_s_per_step": round(sum(steady) / max(1, len(steady)), 2),
        "unet_first_step_s": round(unet_steps[0], 2) if unet_steps else None,
        "unet_total_s": round(sum(unet_steps), 2),
        "text_encoder_s": round(timings.total("text_encoder"), 2), "vae_decode_s": round(timings.total("vae_decode"), 2),
        "peak_rss_gb": round(peak_rss_gb(), 2), "threads": torch.get_num_threads(), "png": str(png),
    }


def image_difference(a_png: str, b_png: str) -> tuple[float, int]:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_png).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_png).convert("RGB"), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return psnr, int(np.abs(a - b).max())


# --- the parent -----------------------------------------------------------------------------
def run_child(variant: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / f"{variant}.json").read_text())


def gflops_text(r: dict) -> str:
    """Achieved UNet GFLOP/s; not defined for feature reuse, whose steps do unequal work."""
    if r.get("reuse") or not r["unet_s_per_step"]:
        return "n/a"
    return f"{UNET_GFLOP_PER_STEP / r['unet_s_per_step']:.0f}"


def summary_line(r: dict, peak: dict) -> str:
    line = (f"{r['name']:<16} end-to-end {r['end_to_end_s']:7.1f} s | UNet {r['unet_s_per_step']:5.2f} s/step "
            f"({gflops_text(r)} GFLOP/s) | text encoder {r['text_encoder_s']:4.2f} s | VAE decode {r['vae_decode_s']:5.1f} s"
            f" | load {r['load_s']:5.1f} s | peak RSS {r['peak_rss_gb']:4.2f} GB")
    if r.get("reuse"):
        line += f" | full steps {r['unet_full_step_s']} s, reuse steps {r['unet_reuse_step_s']} s"
    if "speedup" in r:
        line += f" | {r['speedup']:.2f}x vs stock | PSNR {r['psnr_db']:.1f} dB, max |diff| {r['max_abs_diff']}"
    return line


def write_doc(section: str, command: str, machine: dict, peak: dict, results: list[dict], steps: int,
              load_before: str, load_after: str, gflop: float) -> None:
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    rows = ["| variant | end-to-end s | UNet s/step | UNet GFLOP/s | text encoder s | VAE decode s | load s | peak RSS GB | speed-up | PSNR dB | max abs diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows.append(f"| {r['name']} | {r['end_to_end_s']:.1f} | {r['unet_s_per_step']:.2f} | {gflops_text(r)} | {r['text_encoder_s']:.2f} | "
                    f"{r['vae_decode_s']:.1f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                    f"{r.get('speedup', 1.0):.2f}x | {r.get('psnr_db', float('nan')):.1f} | {r.get('max_abs_diff', '-')} |")
    plans = "\n".join(f"- `{r['name']}`: {r['what']}" for r in results)
    body = f"""{start}
### Run `{section}`: {steps} steps, 512x512, Euler, CFG {CFG}, seed {SEED}

- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; command: `{command}`
- Machine: {machine['cpu']} ({machine.get('family_model', '')}), {machine['cores']} logical CPUs, {machine['ram_gb']} GB RAM;
  SIMD flags: `{machine['flags']}`; torch {machine['torch']} (CPU capability {machine['torch_cpu_capability']}),
  oneDNN native bf16: {machine['mkldnn_bf16']}; diffusers {machine.get('diffusers')}, transformers {machine.get('transformers')}
- Load average (1/5/15 min) before: {load_before}; after: {load_after} (2 shared cores: other work on the machine slows every number)
- Matmul ceiling (`torch.mm` 2048², or 256² when a dtype is too slow for that, same run): fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s
- UNet work per step: {gflop:.0f} GFLOP (CFG batch 2, 512²); UNet s/step excludes the first call (kernel selection)

{chr(10).join(rows)}

{plans}
{end}"""
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\nGenerated sections are rewritten by `bench/cpu_benchmark.py`; the rest is written by hand.\n"
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--full", action="store_true", help="20 steps (the long run)")
    p.add_argument("--variants", default="diffusers-fp32,easel-auto",
                   help="comma list from: diffusers-fp32, easel-auto, easel-fp32, easel-bf16, easel-fast, "
                        "easel-fast-N (fast with one full step in N), easel-int8; a -torch suffix "
                        "(easel-auto-torch) runs Easel with --backend torch (first is the reference)")
    p.add_argument("--count-flops", action="store_true", help="recount the UNet's FLOPs on the meta device")
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--section", default=None, help="name of the docs/benchmarks.md section to (re)write")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = 20 if args.full else args.steps

    if args.child:
        out = Path(args.out)
        folder = model_folder()
        if args.child == "diffusers-fp32":
            record = run_stock(folder, steps, out)
        elif args.child.startswith("easel-fast"):
            interval = args.child.removeprefix("easel-fast").removeprefix("-")
            record = run_easel(folder, steps, out, "auto", "fast", int(interval) if interval else None)
        else:
            precision = args.child.removeprefix("easel-").removesuffix("-torch")
            record = run_easel(folder, steps, out, precision, backend="torch" if args.child.endswith("-torch") else "auto")
        (out / f"{args.child}.json").write_text(json.dumps(record))
        return 0

    folder = ensure_model()
    import tempfile

    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    machine = machine_info()
    gflop = count_unet_gflop(folder) if args.count_flops else UNET_GFLOP_PER_STEP
    peak = matmul_peak()
    print(f"machine: {machine['cpu']} | flags: {machine['flags']} | native bf16: {machine['mkldnn_bf16']} | "
          f"load {load_before} | matmul fp32 {peak['fp32']} / bf16 {peak['bf16']} GFLOP/s | UNet {gflop:.0f} GFLOP/step", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as tmp:
        for variant in args.variants.split(","):
            out = Path(tmp)
            r = run_child(variant.strip(), steps, out)
            if results:
                ref = results[0]
                r["speedup"] = round(ref["end_to_end_s"] / r["end_to_end_s"], 2)
                r["psnr_db"], r["max_abs_diff"] = image_difference(ref["png"], r["png"])
            results.append(r)
            print(summary_line(r, peak), flush=True)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if not args.no_doc:
        command = "venv/bin/python bench/cpu_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_doc(args.section or ("full" if args.full else f"steps{steps}"), command.strip(), machine, peak,
                  results, steps, load_before, load_after, gflop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
