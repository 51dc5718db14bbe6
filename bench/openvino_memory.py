"""Memory of one compiled UNet on the CPU: OpenVINO f32 weights vs int8 weights (`--precision int8`).

    venv/bin/python bench/openvino_memory.py            # full-size SD 1.5 UNet, random weights, 512², batch 2
    venv/bin/python bench/openvino_memory.py --tiny     # the tests' tiny UNet: checks the script only

Saves the converted graph (f32) and its NNCF int8 compression (engine/openvino_backend.py
compress_int8) once, then compiles each from its file in a process of its own (as Easel's cache
does: the weights memory-mapped) for f32 and, where native, bf16 compute, runs two UNet steps, and
reports the resident memory after compiling and after the steps (file-backed pages included: they
are the weights) and the process's peak. bench/openvino_int8.py measures speed and exactness.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(folder: Path, tiny: bool) -> None:
    import openvino
    import torch

    from engine import compat  # noqa: F401
    from engine.openvino_backend import compress_int8, convert_unet

    if tiny:
        from engine.tiny import tiny_unet

        unet = tiny_unet()
    else:
        from bench.openvino_unet import sd15_unet

        unet = sd15_unet(torch)
    openvino.save_model(convert_unet(unet), str(folder / "f32" / "model.xml"), compress_to_fp16=False)
    model = compress_int8(openvino.Core().read_model(str(folder / "f32" / "model.xml")))
    openvino.save_model(model, str(folder / "int8" / "model.xml"), compress_to_fp16=False)


def measure(xml: Path, hint: str, size: int, channels: int, context: int, threads: int) -> dict:
    import numpy as np
    import openvino
    import psutil

    gb = lambda: round(psutil.Process().memory_info().rss / 2**30, 2)  # noqa: E731
    compiled = openvino.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                               "PERFORMANCE_HINT": "LATENCY",
                                                               "INFERENCE_NUM_THREADS": threads})
    after_compile = gb()
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, channels, size, size), dtype=np.float32),
            "timestep": np.array([999.0, 999.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, context), dtype=np.float32)}
    compiled(feed)
    started = time.perf_counter()
    compiled(feed)
    return {"rss_compiled_gb": after_compile, "rss_after_steps_gb": gb(), "step_s": round(time.perf_counter() - started, 2),
            "peak_rss_gb": round(_peak_kib() / 2**20, 2)}


def _peak_kib() -> int:
    """This process image's peak RSS: VmHWM starts afresh at exec, while ru_maxrss keeps the
    parent's peak from before the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (a check of the script)")
    # One child process per variant; it imports no torch, so its memory is OpenVINO's alone.
    parser.add_argument("--measure", nargs=3, metavar=("XML", "HINT", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size, channels, context = (32, 4, 64) if args.tiny else (64, 4, 768)
    if args.measure:
        xml, hint, threads = args.measure
        print(json.dumps(measure(Path(xml), hint, size, channels, context, int(threads))))
        return 0
    import os

    from engine.devices import Hardware

    hardware = Hardware.detect()

    folder = Path(tempfile.mkdtemp(prefix="easel-openvino-memory-"))
    try:
        prepare(folder, args.tiny)
        sizes = {w: round((folder / w / "model.bin").stat().st_size / 2**20, 1) for w in ("f32", "int8")}
        print("| weights | compute | model.bin MB | RSS compiled GB | RSS after 2 steps GB | peak RSS GB | s/step |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for hint in ["f32"] + (["bf16"] if hardware.cpu_bf16 else []):
            for weights in ("f32", "int8"):
                child = [sys.executable, __file__, "--measure", str(folder / weights / "model.xml"), hint,
                         str(hardware.physical_cores)]
                out = subprocess.run(child + (["--tiny"] if args.tiny else []), capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
                r = json.loads(out)
                print(f"| {weights} | {hint} | {sizes[weights]} | {r['rss_compiled_gb']} | {r['rss_after_steps_gb']} | "
                      f"{r['peak_rss_gb']} | {r['step_s']} |", flush=True)
        print(f"SD 1.5 UNet {'(tiny)' if args.tiny else '(random weights)'}, load average "
              f"{tuple(round(x, 2) for x in os.getloadavg())}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
