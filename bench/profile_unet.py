"""Where one SD 1.5 UNet step's time goes on this CPU, and what each candidate speed-up does to it.

    venv/bin/python bench/profile_unet.py --profile fp32      # torch.profiler, one step, by op category
    venv/bin/python bench/profile_unet.py --candidates fp32,fp32-cl,bf16,int8-linear

Uses the random-weight SD 1.5 UNet that `bench/cpu_benchmark.py` caches. Each candidate runs in its
own subprocess (fresh model, fresh oneDNN caches, its own peak RSS). A candidate's output is compared
with the fp32 reference's output on the same inputs (saved once in the cache), so a speed-up that
changes the result shows how much.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_benchmark import CACHE, UNET_GFLOP_PER_STEP, ensure_model  # noqa: E402

REFERENCE = CACHE / "unet_reference_fp32.pt"

# op-name fragments -> category, first match wins
CATEGORIES = (
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "baddbmm", "bmm", "softmax")),
    ("convolution", ("conv",)),
    ("linear / matmul", ("addmm", "linear", "matmul", "::mm", "quantized", "dynamic")),
    ("normalisation", ("group_norm", "layer_norm", "native_norm", "batch_norm")),
    ("activation", ("silu", "gelu", "sigmoid")),
    ("elementwise / copies", ("add", "mul", "copy", "to", "cat", "clone", "contiguous", "div", "sub", "_to_copy")),
)


def inputs(torch):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    return sample, torch.tensor([999, 999]), context


def load_unet(torch):
    import engine.compat  # noqa: F401  (torchvision shim before diffusers)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(ensure_model() / "unet"), local_files_only=True).eval()


def prepare(candidate: str, unet, torch):
    """Apply one candidate to the fp32 UNet. Returns (unet, context manager factory, note)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    parts = candidate.split("-")
    ctx = contextlib.nullcontext
    note = []
    if "bf16" in parts:
        unet = unet.to(torch.bfloat16)
    if "cl" in parts:
        unet = unet.to(memory_format=torch.channels_last)
        note.append("channels_last")
    if "math" in parts:
        ctx = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    if "flash" in parts:
        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    if "classic" in parts:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if "autocast" in parts:
        ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if "1thread" in parts:
        torch.set_num_threads(1)
    if "int8" in parts:
        from torch.ao.quantization import quantize_dynamic

        unet = quantize_dynamic(unet, {torch.nn.Linear}, dtype=torch.qint8)
    if "compile" in parts:
        if "freeze" in parts:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold weights: lets inductor prepack oneDNN conv weights
        unet = torch.compile(unet)
    return unet, ctx, " ".join(note)


def run_candidate(candidate: str, repeats: int) -> dict:
    import torch

    unet = load_unet(torch)
    unet, ctx, _ = prepare(candidate, unet, torch)
    dtype = next(p.dtype for p in unet.parameters()) if any(True for _ in unet.parameters()) else torch.float32
    sample, t, context = inputs(torch)
    memory_format = torch.channels_last if "cl" in candidate.split("-") else torch.contiguous_format
    sample = sample.to(dtype).contiguous(memory_format=memory_format)
    context = context.to(dtype)
    times = []
    with torch.inference_mode(), ctx():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            out = unet(sample, t, encoder_hidden_states=context).sample
            times.append(time.perf_counter() - t0)
    out = out.float().contiguous()
    result = {"candidate": candidate, "first_s": round(times[0], 2), "s_per_step": round(sum(times[1:]) / repeats, 2),
              "threads": torch.get_num_threads(), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if candidate == "fp32" and not REFERENCE.is_file():
        torch.save(out, REFERENCE)
    if REFERENCE.is_file():
        ref = torch.load(REFERENCE)
        err = (out - ref).abs()
        result["max_abs_err"] = float(err.max())
        result["rel_rms_err"] = float((err.pow(2).mean() / ref.pow(2).mean()).sqrt())
    result["gflops"] = round(UNET_GFLOP_PER_STEP / result["s_per_step"], 0)
    return result


def categorise(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def profile(candidate: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    unet = load_unet(torch)
    unet, ctx, _ = prepare(candidate, unet, torch)
    dtype = torch.bfloat16 if "bf16" in candidate.split("-") else torch.float32
    sample, t, context = inputs(torch)
    sample, context = sample.to(dtype), context.to(dtype)
    with torch.inference_mode(), ctx():
        unet(sample, t, encoder_hidden_states=context)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            unet(sample, t, encoder_hidden_states=context)
            wall = time.perf_counter() - t0
    # Self time of leaf ops, so nested calls (linear -> addmm) are not counted twice.
    totals: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6
        totals[categorise(e.key)] = totals.get(categorise(e.key), 0.0) + self_s
        ops.append((self_s, e.key, e.count))
    accounted = sum(totals.values())
    print(f"profile {candidate}: one UNet step {wall:.2f} s wall (profiled ops {accounted:.2f} s self time)")
    for category, s in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {category:<22} {s:6.2f} s  {100 * s / accounted:5.1f}%")
    print("  top ops by self time:")
    for s, key, count in sorted(ops, reverse=True)[:12]:
        print(f"    {key:<45} {s:6.2f} s  x{count}")


def op_probe() -> None:
    """One op of each kind the UNet is made of, in fp32, bf16 and (Linear) dynamic int8: cheap
    evidence for whole-UNet candidates that would take too long to run (bf16 without native support)."""
    import torch
    import torch.nn.functional as F
    from torch.ao.quantization import quantize_dynamic

    def best(fn, budget=4.0):
        fn()
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < budget or not times:
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
        return min(times)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 320, 64, 64, generator=g)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).eval()
    tokens = torch.randn(8192, 320, generator=g)
    lin = torch.nn.Linear(320, 1280).eval()
    q, k, v = (torch.randn(2, 8, 4096, 40, generator=g) for _ in range(3))
    flops = {"conv3x3 320ch 64x64 b2": 2 * 2 * 64 * 64 * 320 * 320 * 9, "linear 8192x320->1280": 2 * 8192 * 320 * 1280,
             "sdpa 8 heads 4096 tokens d40 b2": 2 * 2 * 2 * 8 * 4096 * 4096 * 40}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            c, l = conv.to(dtype), lin.to(dtype)
            cases = {"conv3x3 320ch 64x64 b2": lambda: c(x.to(dtype)),
                     "linear 8192x320->1280": lambda: l(tokens.to(dtype)),
                     "sdpa 8 heads 4096 tokens d40 b2": lambda: F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))}
            if dtype == torch.float32:
                cl = x.contiguous(memory_format=torch.channels_last)
                c_cl = torch.nn.Conv2d(320, 320, 3, padding=1).eval().to(memory_format=torch.channels_last)
                cases["conv3x3 320ch 64x64 b2 channels_last"] = lambda: c_cl(cl)
                flops["conv3x3 320ch 64x64 b2 channels_last"] = flops["conv3x3 320ch 64x64 b2"]
                ql = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(320, 1280)), {torch.nn.Linear}, dtype=torch.qint8)
                cases["linear 8192x320->1280 int8 dynamic"] = lambda: ql(tokens)
                flops["linear 8192x320->1280 int8 dynamic"] = flops["linear 8192x320->1280"]
            for name, fn in cases.items():
                s = best(fn, budget=2.0 if dtype == torch.float32 else 0.1)
                label = name if "int8" in name else f"{name} {str(dtype).split('.')[-1]}"
                print(f"  {label:<48} {s * 1000:9.1f} ms  {flops[name] / s / 1e9:7.1f} GFLOP/s", flush=True)


def alternate(candidates: list[str], rounds: int) -> None:
    """Time several candidates in one process, interleaved (A B C A B C ...), so that load from
    other work on a shared machine hits them alike; report each one's median step."""
    import copy
    import statistics

    import torch

    base = load_unet(torch)
    models = {}
    for c in candidates:
        m, ctx, _ = prepare(c, copy.deepcopy(base) if c != "fp32" else base, torch)
        models[c] = (m, ctx)
    sample, t, context = inputs(torch)
    times: dict[str, list[float]] = {c: [] for c in candidates}
    outs = {}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for c, (m, ctx) in models.items():
                cl = "cl" in c.split("-")
                x = sample.contiguous(memory_format=torch.channels_last) if cl else sample
                with ctx():
                    t0 = time.perf_counter()
                    outs[c] = m(x, t, encoder_hidden_states=context).sample.float().contiguous()
                    if r:  # round 0 is the warm-up
                        times[c].append(time.perf_counter() - t0)
            print(f"round {r}: load {Path('/proc/loadavg').read_text().split()[0]}", flush=True)
    ref = outs[candidates[0]]
    for c in candidates:
        err = (outs[c] - ref).abs()
        med = statistics.median(times[c])
        print(json.dumps({"candidate": c, "median_s": round(med, 2), "all_s": [round(x, 2) for x in times[c]],
                          "gflops": round(UNET_GFLOP_PER_STEP / med), "max_abs_err_vs_first": float(err.max()),
                          "rel_rms_err_vs_first": float((err.pow(2).mean() / ref.pow(2).mean()).sqrt())}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", help="candidate to profile (fp32, bf16, fp32-cl, ...)")
    p.add_argument("--candidates", help="comma list: fp32, fp32-cl, fp32-math, fp32-flash, fp32-classic, fp32-1thread, "
                                       "bf16, bf16-cl, fp32-autocast, int8 (Linear dynamic int8), fp32-cl-int8, compile, compile-freeze-cl")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--op-probe", action="store_true", help="time single conv/linear/attention ops in fp32, bf16, int8")
    p.add_argument("--alternate", help="comma list timed interleaved in one process (first is the reference)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_candidate(args.one, args.repeats)))
        return 0
    if args.alternate:
        alternate(args.alternate.split(","), args.rounds)
    if args.op_probe:
        op_probe()
    if args.profile:
        profile(args.profile)
    for candidate in (args.candidates or "").split(","):
        if not candidate:
            continue
        load = Path("/proc/loadavg").read_text().split()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", candidate, "--repeats", str(args.repeats)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{candidate}: failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["load_1min"], r["process_s"] = float(load), round(time.perf_counter() - t0, 1)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
