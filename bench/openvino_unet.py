"""One UNet step on the CPU: torch fp32 vs OpenVINO (engine/openvino_backend.py), same weights, same inputs;
and the `fast` speed's reuse step (engine/feature_cache.py) on each.

    venv/bin/python bench/openvino_unet.py               # full-size SD 1.5 UNet, random weights, 512², CFG batch 2
    venv/bin/python bench/openvino_unet.py --rounds 3    # more interleaved rounds
    venv/bin/python bench/openvino_unet.py --tiny --size 64   # the tests' tiny UNet: checks the script only

Reports the conversion time (once per checkpoint in Easel, then cached), the compile time, the peak
RSS while converting (what CONVERT_MEMORY_FACTOR in engine/openvino_backend.py estimates), the s per
UNet step of each backend in interleaved rounds (so a change in the machine's load hits both), and
how far OpenVINO's output is from torch's (relative RMS). bf16 is measured too where the CPU has it
natively (engine.devices.Hardware.cpu_bf16), beside torch bf16 (the torch plan's UNet on such a CPU).
"reuse" rows are the `fast` speed's reuse step: OpenVINO's reuse graph fed the full graph's deep
features (interleaved with the rest), and torch fp32 with feature_cache's hooks (timed after the
rounds: its hooks would turn the torch full step into a reuse step). At the full step's own
inputs a reuse step computes the full step's result, so its error is against torch's full step.
Run it on a quiet machine; it prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sd15_unet(torch):
    """SD 1.5's UNet architecture with seeded random weights: the time per step does not depend on
    the weights' values."""
    from diffusers import UNet2DConditionModel

    from bench.cpu_benchmark import SD15_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval()


def unet_and_inputs(torch, tiny: bool, size: int):
    """(unet, sample, context, timestep): SD 1.5's UNet (or the tests' tiny one) and one CFG step's
    inputs (batch 2, 77 tokens) for a `size`² image, seeded."""
    if tiny:
        from engine.tiny import tiny_unet

        unet, factor = tiny_unet(), 2
    else:
        unet, factor = sd15_unet(torch), 8
    side = size // factor
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, side, side, generator=g)  # CFG: batch 2
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return unet, sample, context, torch.tensor([999.0, 999.0])


def torch_bf16_step(torch, unet, sample, timestep, context):
    """One UNet step in bf16, as Easel's torch plan runs it on a CPU with native bf16 (a copy of `unet`)."""
    import copy

    unet_bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    sample_bf16, context_bf16 = sample.to(torch.bfloat16), context.to(torch.bfloat16)

    def step():
        with torch.inference_mode():
            return unet_bf16(sample_bf16, timestep, encoder_hidden_states=context_bf16).sample.float()

    return step


def interleaved(variants: dict, rounds: int) -> tuple[dict, dict]:
    """(outputs, times): each variant run once (warm-up; its output kept for comparing), then
    `rounds` rounds of all of them in turn, so a change in the machine's load touches each alike."""
    outputs = {name: run() for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return outputs, times


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_parser(doc: str, tiny: str = "UNet", size: str = "image side") -> argparse.ArgumentParser:
    """The options the OpenVINO bench scripts share: --tiny, --rounds, --size, --json."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"the tests' tiny {tiny} (a check of the script)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--size", type=int, default=512, help=f"{size} in pixels (default 512)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def timed_conversion(convert, unet):
    """(converted model, seconds, peak RSS GB after) of `convert(unet)`."""
    started = time.perf_counter()
    model = convert(unet)
    return model, time.perf_counter() - started, peak_rss_gb()


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(__doc__).parse_args(argv)

    import torch

    from engine import compat  # noqa: F401
    from engine.devices import Hardware
    from engine.feature_cache import FeatureReuse
    from engine.openvino_backend import convert_unet, convert_unet_reuse, input_names, openvino_version
    import openvino

    hardware = Hardware.detect()
    torch.set_num_threads(hardware.physical_cores)
    unet, sample, context, timestep = unet_and_inputs(torch, args.tiny, args.size)

    rss_before = peak_rss_gb()
    model, convert_s, convert_peak = timed_conversion(convert_unet, unet)
    # convert_reuse_peak is above convert_peak only if the reuse graph's conversion needs more.
    model_reuse, convert_reuse_s, convert_reuse_peak = timed_conversion(convert_unet_reuse, unet)

    core = openvino.Core()
    precisions = ["f32"] + (["bf16"] if hardware.cpu_bf16 else [])
    compiled, compiled_reuse, compile_s = {}, {}, {}
    for precision in precisions:
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": hardware.physical_cores}
        started = time.perf_counter()
        compiled[precision] = core.compile_model(model, "CPU", config)
        compile_s[precision] = time.perf_counter() - started
        compiled_reuse[precision] = core.compile_model(model_reuse, "CPU", config)
    feed = dict(zip(input_names(unet.config), (sample.numpy(), timestep.numpy(), context.numpy())))
    features = {p: compiled[p](feed)[1] for p in precisions}  # each precision's own full step's

    def torch_step():
        with torch.inference_mode():
            return unet(sample, timestep, encoder_hidden_states=context).sample

    def ov_step(precision):
        return lambda: torch.from_numpy(compiled[precision](feed)[0].copy())

    def ov_reuse_step(precision):
        return lambda: torch.from_numpy(compiled_reuse[precision]({**feed, "features": features[precision]})[0])

    variants = {"torch fp32": torch_step, **{f"openvino {p}": ov_step(p) for p in precisions},
                **{f"openvino {p} reuse": ov_reuse_step(p) for p in precisions}}
    if hardware.cpu_bf16:  # what Easel's torch plan runs on such a CPU (engine/devices.py): a bf16 UNet
        variants["torch bf16"] = torch_bf16_step(torch, unet, sample, timestep, context)
    outputs, times = interleaved(variants, args.rounds)

    # torch's reuse step, on its own: one full step that every skipped part remembers, then reuse steps.
    with FeatureReuse(unet, interval=2**62) as reuse:
        torch_step()
        outputs["torch fp32 reuse"] = torch_step()  # warm-up
        times["torch fp32 reuse"] = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            torch_step()
            times["torch fp32 reuse"].append(time.perf_counter() - started)
    assert reuse.full_steps == 1, "the torch reuse steps were full steps"

    reference = outputs["torch fp32"]
    results = {
        "unet": "tiny (tests)" if args.tiny else "SD 1.5 (random weights)", "size": args.size, "batch": 2,
        "openvino": openvino_version(), "torch": torch.__version__, "threads": hardware.physical_cores,
        "cpu_bf16": hardware.cpu_bf16, "load_average": os.getloadavg(), "rounds": args.rounds,
        "convert_s": round(convert_s, 1), "convert_reuse_s": round(convert_reuse_s, 1),
        "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
        "convert_peak_rss_gb": round(convert_peak, 2), "rss_before_convert_gb": round(rss_before, 2),
        "convert_reuse_peak_rss_gb": round(convert_reuse_peak, 2),
        "s_per_step": {name: round(min(t), 3) for name, t in times.items()},
        "rel_rms_vs_torch": {name: float(((out - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())
                             for name, out in outputs.items() if name != "torch fp32"},
    }
    steps = results["s_per_step"]
    base = steps["torch fp32"]
    print("| backend | s per UNet step (best of rounds) | vs torch fp32 | reuse step / its full step "
          "| relative RMS vs torch fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in steps.items():
        rms = results["rel_rms_vs_torch"].get(name)
        full = steps.get(name.removesuffix(" reuse")) if name.endswith(" reuse") else None
        share = '—' if full is None else f'{seconds / full:.1%}'
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {share} "
              f"| {'—' if rms is None else f'{rms:.1e}'} |")
    print(f"converting {results['convert_s']} s + {results['convert_reuse_s']} s for the reuse graph "
          f"(peak RSS {results['convert_peak_rss_gb']} GB, {results['convert_reuse_peak_rss_gb']} GB after the "
          f"reuse graph's, "
          f"{results['rss_before_convert_gb']} GB before), compiling {results['compile_s']} s, "
          f"load average {tuple(round(x, 2) for x in results['load_average'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
