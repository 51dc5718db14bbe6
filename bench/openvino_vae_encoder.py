"""VAE encoder on the CPU: torch fp32 vs OpenVINO f32 (engine/openvino_parts.py), and which example shapes trace.

    venv/bin/python bench/openvino_vae_encoder.py          # full-size SD 1.5 VAE, random weights
    venv/bin/python bench/openvino_vae_encoder.py --tiny   # the tests' tiny VAE (engine.tiny.tiny_vae)

What it does (issue 20, item 4: "the OpenVINO VAE encoder fails to trace on the tiny test model"):
- converts `vae.encoder` with Easel's own `convert_vae_part` (its 9x11 example) and times it;
- finds the smallest square example image that converts (sides 1 to 16) and the error one side
  below it. The trace fails only on examples too small for the net: the tiny VAE's first down block
  keeps 32 channels in 32 GroupNorm groups (one channel per group), so a 1x1 map after its one
  downsample (a 3x3 example or smaller) leaves one value per group and torch's F.group_norm refuses
  it while tracing ("Expected more than 1 value per channel ..."), which OpenVINO reports as
  "Couldn't get TorchScript module by tracing". SD 1.5's VAE (4 to 16 channels per group) takes a
  1x1 map there, but its three downsamples need a side of 8 (a 3x3 kernel on a 1x1 map padded to
  2x2 fails below that). Easel's 9x11 example clears both;
- encodes one seeded --size² image on torch and on the converted graph (as the hook on
  `vae.encoder` does; quant_conv stays in torch) and reports the largest absolute difference of
  the encoder's output (the latent distribution's mean and log-variance) and of the latent mean.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.openvino_unet import bench_parser  # noqa: E402


def vae_of(torch, tiny: bool):
    if tiny:
        from engine.tiny import tiny_vae

        return tiny_vae()
    from diffusers import AutoencoderKL

    from bench.cpu_benchmark import SD15_VAE

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE).eval()


def convert_at(torch, net, shape):
    """(seconds, None) when `net` converts with an example of `shape`, else (seconds, the error's
    first lines: OpenVINO's, then the torch error under it)."""
    import warnings

    from engine.openvino_backend import convert_model  # restores the root logger after a failure
    from engine.openvino_parts import _ConvNetTraceable

    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            convert_model(_ConvNetTraceable(net).eval(), example_input=(torch.randn(*shape),))
        return time.perf_counter() - started, None
    except Exception as error:  # noqa: BLE001 - reported, that is the point
        return time.perf_counter() - started, " / ".join(str(error).strip().splitlines()[:3])


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(__doc__, tiny="VAE", size="encoded image side").parse_args(argv)

    import torch

    from engine import compat  # noqa: F401
    from engine.devices import Hardware
    from engine.openvino_backend import openvino_version
    from engine.openvino_parts import convert_vae_part
    import openvino

    load_before = os.getloadavg()
    hardware = Hardware.detect()
    torch.set_num_threads(hardware.physical_cores)
    vae = vae_of(torch, args.tiny)
    groups = vae.config.norm_num_groups
    per_group = [c // groups for c in vae.config.block_out_channels]

    started = time.perf_counter()
    model = convert_vae_part(vae.encoder, vae.config.in_channels)
    convert_s = time.perf_counter() - started
    probe_error, smallest = None, None
    for side in range(1, 17):
        _, error = convert_at(torch, vae.encoder, (1, vae.config.in_channels, side, side))
        if error is None:
            smallest = side
            break
        probe_error = error

    started = time.perf_counter()
    compiled = openvino.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": hardware.physical_cores})
    compile_s = time.perf_counter() - started

    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def on_torch():
        with torch.inference_mode():
            return vae.encoder(image)

    def on_openvino():
        return torch.from_numpy(compiled([image.numpy()])[0].copy())

    outputs = {"torch": on_torch(), "openvino": on_openvino()}  # warm-up, and the outputs compared
    times: dict = {name: [] for name in outputs}
    for _ in range(args.rounds):
        for name, run in (("torch", on_torch), ("openvino", on_openvino)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    with torch.inference_mode():
        means = {name: vae.quant_conv(out).chunk(2, dim=1)[0] for name, out in outputs.items()}
    reference = outputs["torch"]
    results = {
        "vae": "tiny (tests)" if args.tiny else "SD 1.5 VAE (random weights)",
        "channels_per_group": per_group, "image": f"{args.size}², batch 1",
        "openvino": openvino_version(), "torch": torch.__version__, "threads": hardware.physical_cores,
        "convert_s (9x11 example, Easel's)": round(convert_s, 2), "compile_s": round(compile_s, 2),
        "smallest example side that converts": smallest, "error one side below": probe_error,
        "torch_s": round(min(times["torch"]), 4), "openvino_s": round(min(times["openvino"]), 4),
        "max_abs_diff_moments": float((outputs["openvino"] - reference).abs().max()),
        "max_abs_moments": float(reference.abs().max()),
        "max_abs_diff_latent_mean": float((means["openvino"] - means["torch"]).abs().max()),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
