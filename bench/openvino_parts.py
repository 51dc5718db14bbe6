"""VAE decode and text encoder on the CPU: torch fp32 vs OpenVINO (engine/openvino_parts.py), same weights, same inputs.

    venv/bin/python bench/openvino_parts.py              # full-size SD 1.5 VAE and text encoder, random weights
    venv/bin/python bench/openvino_parts.py --rounds 5   # more interleaved rounds
    venv/bin/python bench/openvino_parts.py --tiny       # the tests' tiny modules: checks the script only

What is timed is what a job runs:
- VAE decode of one 512² image (64x64 latents, batch 1): `vae.decode` on torch; on OpenVINO the 1x1
  post_quant_conv in torch, then the converted decoder (as the hook Easel puts on `vae.decoder`).
- The text encoder on one 77-token chunk, batch 2 (prompt and negative prompt, as CFG needs): the
  CLIP model on torch; on OpenVINO the token lookup in torch, then the converted rest.
OpenVINO f32 always, bf16 too where the CPU has it natively (engine.devices.Hardware.cpu_bf16).
Reports the conversion and compile times, the best of interleaved rounds (a change in the
machine's load hits every variant alike), the output's distance from torch fp32 (relative RMS;
for the decode also the largest difference in 8-bit levels), and the load average.
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

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"


def modules(torch, tiny: bool):
    """(vae, text encoder, vae scale factor): SD 1.5's architectures with seeded random weights (the
    time does not depend on the weights' values), or the tests' tiny ones."""
    if tiny:
        from engine.tiny import tiny_text_encoder, tiny_vae

        return tiny_vae(), tiny_text_encoder(), 2
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.cpu_benchmark import SD15_TEXT_ENCODER, SD15_VAE

    torch.manual_seed(0)
    return AutoencoderKL(**SD15_VAE).eval(), CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).eval(), 8


def rel_rms(out, reference) -> float:
    return float(((out - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())


def main(argv: list[str] | None = None) -> int:
    args = bench_parser(__doc__, tiny="modules", size="decoded image side").parse_args(argv)

    import torch

    from engine import compat  # noqa: F401
    from engine.devices import Hardware
    from engine.openvino_backend import openvino_version
    from engine.openvino_parts import convert_text_encoder, convert_vae_part
    from engine.tokenizers import load_clip_tokenizer
    import openvino

    load_before = os.getloadavg()
    hardware = Hardware.detect()
    torch.set_num_threads(hardware.physical_cores)
    vae, text_encoder, factor = modules(torch, args.tiny)
    side = args.size // factor
    latents = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    tokenizer = load_clip_tokenizer("clip-l")
    ids = tokenizer([PROMPT, NEGATIVE], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids

    started = time.perf_counter()
    models = {"vae decode": convert_vae_part(vae.decoder, vae.config.latent_channels)}
    convert_s = {"vae decode": time.perf_counter() - started}
    started = time.perf_counter()
    models["text encoder"] = convert_text_encoder(text_encoder)
    convert_s["text encoder"] = time.perf_counter() - started

    core = openvino.Core()
    precisions = ["f32"] + (["bf16"] if hardware.cpu_bf16 else [])
    compiled, compile_s = {}, {}
    for part, model in models.items():
        for precision in precisions:
            started = time.perf_counter()
            compiled[part, precision] = core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": hardware.physical_cores})
            compile_s[f"{part} {precision}"] = round(time.perf_counter() - started, 1)

    def torch_decode():
        with torch.inference_mode():
            return vae.decode(latents, return_dict=False)[0]

    def ov_decode(precision):
        def run():
            with torch.inference_mode():
                z = vae.post_quant_conv(latents)
            return torch.from_numpy(compiled["vae decode", precision]([z.numpy()])[0].copy())
        return run

    def torch_text():
        with torch.inference_mode():
            return text_encoder(ids).last_hidden_state

    def ov_text(precision):
        def run():
            with torch.inference_mode():
                embeds = text_encoder.get_input_embeddings()(ids)
            return torch.from_numpy(compiled["text encoder", precision]([ids.numpy(), embeds.numpy()])[0].copy())
        return run

    variants = {("vae decode", "torch fp32"): torch_decode,
                **{("vae decode", f"openvino {p}"): ov_decode(p) for p in precisions},
                ("text encoder", "torch fp32"): torch_text,
                **{("text encoder", f"openvino {p}"): ov_text(p) for p in precisions}}
    outputs = {name: run() for name, run in variants.items()}  # warm-up, and the outputs compared
    times: dict = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)

    rows = []
    for (part, backend), seconds in times.items():
        reference = outputs[part, "torch fp32"]
        out = outputs[part, backend]
        row = {"part": part, "backend": backend, "s": round(min(seconds), 4),
               "vs_torch": round(min(times[part, "torch fp32"]) / min(seconds), 2)}
        if backend != "torch fp32":
            row["rel_rms"] = rel_rms(out, reference)
            if part == "vae decode":  # pixels in [-1, 1]: 8-bit levels as the image gets them
                row["max_levels"] = float(((out - reference).abs().max() * 127.5).round())
        rows.append(row)
    results = {
        "modules": "tiny (tests)" if args.tiny else "SD 1.5 VAE and text encoder (random weights)",
        "decode": f"{args.size}² ({side}x{side} latents), batch 1", "text": "77 tokens, batch 2",
        "openvino": openvino_version(), "torch": torch.__version__, "threads": hardware.physical_cores,
        "cpu_bf16": hardware.cpu_bf16, "rounds": args.rounds, "convert_s": {k: round(v, 1) for k, v in convert_s.items()},
        "compile_s": compile_s, "rows": rows, "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    print("| part | backend | s (best of rounds) | vs torch fp32 | relative RMS vs torch fp32 | max 8-bit levels |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        rms = f"{row['rel_rms']:.1e}" if "rel_rms" in row else "—"
        print(f"| {row['part']} | {row['backend']} | {row['s']:.3f} | {row['vs_torch']:.2f}x | {rms} | "
              f"{row.get('max_levels', '—')} |")
    print(f"converting {results['convert_s']} s, compiling {compile_s} s, load average "
          f"{tuple(round(x, 2) for x in load_before)} before, {tuple(round(x, 2) for x in results['load_average_after'])} after")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
