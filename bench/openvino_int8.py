"""One UNet step on the CPU with int8 weights (`--precision int8`): torch fp32 vs OpenVINO f32/bf16
and OpenVINO int8 f32/bf16 (engine/openvino_backend.py), same weights, same inputs.

    venv/bin/python bench/openvino_int8.py --only "openvino f32,openvino int8 f32"    # full-size SD 1.5 UNet
    venv/bin/python bench/openvino_int8.py --only "openvino bf16,openvino int8 bf16"  # (random weights), 512², batch 2
    venv/bin/python bench/openvino_int8.py --tiny --size 64   # the tests' tiny UNet: checks the script only

bench/openvino_unet.py measures the plain backends and the `fast` speed's reuse step; this one the
int8 weights beside them (the full UNet step only, the graph Easel compresses first).

Reports the conversion time (once per checkpoint in Easel, then cached), the compile time, the peak
RSS while converting (what CONVERT_MEMORY_FACTOR in engine/openvino_backend.py estimates), the s per
UNet step of each backend in interleaved rounds (so a change in the machine's load hits both), and
how far OpenVINO's output is from torch's (relative RMS, and the PSNR of the predicted noise with
the torch output's value range as the peak). bf16 is measured too where the CPU has it natively
(engine.devices.Hardware.cpu_bf16), beside torch bf16 (the torch plan's UNet on such a CPU), and
int8 weights (`--precision int8`: NNCF's compression, engine/openvino_backend.py compress_int8) in
f32 and, where native, bf16 compute, where NNCF is installed; with the saved weights' size of each.
The weights are random, not trained: int8's error on a trained UNet, whose weights per channel are
spread differently, is not this number. Run it on a quiet machine; it prints the load average.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.openvino_unet import bench_parser, peak_rss_gb, timed_conversion  # noqa: E402


# What can be measured beside torch fp32; the bf16 ones only on a CPU with native bf16.
VARIANTS = ("openvino f32", "openvino bf16", "openvino int8 f32", "openvino int8 bf16", "torch bf16")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--only", default=None, help=f"a comma-separated subset of {', '.join(VARIANTS)} "
                        "(torch fp32, the reference, always runs): the full-size UNet with every variant "
                        "compiled at once needs ~20 GB")
    args = parser.parse_args(argv)

    import torch

    from engine import compat  # noqa: F401
    from engine.devices import Hardware
    from engine.openvino_backend import compress_int8, convert_unet, input_names, openvino_version
    import openvino

    hardware = Hardware.detect()
    wanted = VARIANTS if args.only is None else tuple(v.strip() for v in args.only.split(","))
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if not hardware.cpu_bf16:
        wanted = tuple(v for v in wanted if "bf16" not in v)
    torch.set_num_threads(hardware.physical_cores)
    from bench.openvino_unet import interleaved, torch_bf16_step, unet_and_inputs

    unet, sample, context, timestep = unet_and_inputs(torch, args.tiny, args.size)

    rss_before = peak_rss_gb()
    model, convert_s, convert_peak = timed_conversion(convert_unet, unet)

    core = openvino.Core()
    precisions = ["f32"] + (["bf16"] if hardware.cpu_bf16 else [])
    compiled, compile_s, bin_mb = {}, {}, {}

    # Saved and compiled from the file, as Easel's cache does (engine/openvino_backend.py): the
    # weights are memory-mapped, not held twice, and the full-size run fits beside the torch UNet.
    workdir = Path(tempfile.mkdtemp(prefix="easel-openvino-bench-"))

    def save(model, name: str) -> Path:
        xml = workdir / name / "model.xml"
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        bin_mb[name] = round(xml.with_suffix(".bin").stat().st_size / 2**20, 1)
        return xml

    def compile_all(xml: Path, prefix=""):
        for precision in precisions:
            name = prefix + precision
            if f"openvino {name}" not in wanted:
                continue
            started = time.perf_counter()
            compiled[name] = core.compile_model(str(xml), "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": hardware.physical_cores})
            compile_s[name] = time.perf_counter() - started

    f32_xml = save(model, "f32")
    del model
    compile_all(f32_xml)
    compress_s = None
    if any("int8" in v for v in wanted):
        try:
            import nncf  # noqa: F401
        except ImportError:
            print("NNCF is not installed: no int8 variants")
        else:
            started = time.perf_counter()
            model = compress_int8(core.read_model(str(f32_xml)))  # as Easel makes it from a cached f32 entry
            compress_s = time.perf_counter() - started
            int8_xml = save(model, "int8")
            del model
            compile_all(int8_xml, "int8 ")
    feed = dict(zip(input_names(unet.config), (sample.numpy(), timestep.numpy(), context.numpy())))

    def torch_step():
        with torch.inference_mode():
            return unet(sample, timestep, encoder_hidden_states=context).sample

    def ov_step(precision):
        return lambda: torch.from_numpy(compiled[precision](feed)[0].copy())

    variants = {"torch fp32": torch_step, **{f"openvino {p}": ov_step(p) for p in compiled}}
    if "torch bf16" in wanted:  # what Easel's torch plan runs on such a CPU (engine/devices.py): a bf16 UNet
        variants["torch bf16"] = torch_bf16_step(torch, unet, sample, timestep, context)
    outputs, times = interleaved(variants, args.rounds)

    reference = outputs["torch fp32"]
    results = {
        "unet": "tiny (tests)" if args.tiny else "SD 1.5 (random weights)", "size": args.size, "batch": 2,
        "openvino": openvino_version(), "torch": torch.__version__, "threads": hardware.physical_cores,
        "cpu_bf16": hardware.cpu_bf16, "load_average": os.getloadavg(), "rounds": args.rounds,
        "convert_s": round(convert_s, 1), "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
        "int8_compress_s": None if compress_s is None else round(compress_s, 1), "model_bin_mb": bin_mb,
        "convert_peak_rss_gb": round(convert_peak, 2), "rss_before_convert_gb": round(rss_before, 2),
        "s_per_step": {name: round(min(t), 3) for name, t in times.items()},
        "rel_rms_vs_torch": {name: float(((out - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())
                             for name, out in outputs.items() if name != "torch fp32"},
        # Peak: the reference's value range (the predicted noise has no fixed one, unlike pixels).
        "psnr_db_vs_torch": {name: float(20 * torch.log10(reference.max() - reference.min())
                                         - 10 * torch.log10((out - reference).pow(2).mean()))
                             for name, out in outputs.items() if name != "torch fp32"},
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    base = results["s_per_step"]["torch fp32"]
    print("| backend | s per UNet step (best of rounds) | vs torch fp32 | relative RMS vs torch fp32 "
          "| PSNR of the noise |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in results["s_per_step"].items():
        rms, psnr = results["rel_rms_vs_torch"].get(name), results["psnr_db_vs_torch"].get(name)
        print(f"| {name} | {seconds:.3f} | {base / seconds:.2f}x | {'—' if rms is None else f'{rms:.1e}'} | "
              f"{'—' if psnr is None else f'{psnr:.1f} dB'} |")
    print(f"converting {results['convert_s']} s (peak RSS {results['convert_peak_rss_gb']} GB, "
          f"{results['rss_before_convert_gb']} GB before), compressing to int8 {results['int8_compress_s']} s, "
          f"compiling {results['compile_s']} s, model.bin {results['model_bin_mb']} MB, "
          f"peak RSS {results['peak_rss_gb']} GB, load average {tuple(round(x, 2) for x in results['load_average'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    compiled.clear()  # they map the files in workdir
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
