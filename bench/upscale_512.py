"""512x512 -> 2048x2048 through Easel's upscalers at full size: time, peak RSS and the ETA's accuracy.

    venv/bin/python bench/upscale_512.py esrgan --tile 256     # one run in this process
    venv/bin/python bench/upscale_512.py sdx4 --steps 2
    venv/bin/python bench/upscale_512.py all [--sd-steps 2]    # each run in a fresh process, then a table

- esrgan: a full-size RRDBNet x4 (Real-ESRGAN x4plus: 64 features, 23 blocks) with random weights,
  saved as `models/ESRGAN/bench-rrdb-x4.safetensors` in a temporary models folder and run through
  `Engine.upscale` (the tab's and the CLI's path: safe read, spandrel, tiles, publish).
- sdx4: the SD x4 upscaler's full-size UNet and VAE (architectures from bench/x4_upscale.py, random
  weights) through `engine.sd_upscaler.upscale_sd_x4` in 128 px tiles, the engine's default. The ETA
  shown after each tile (`ProgressUpdate.eta`: mean tile time x tiles left) is compared with the time
  that was really left.

Peak RSS is the process's ru_maxrss (weights included); each run gets its own process so one run's
peak does not hide another's. Random weights: time and memory are the architecture's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDE = 512


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rrdb_x4_state_dict(feat: int = 64, blocks: int = 23, grow: int = 32) -> dict:
    """Real-ESRGAN x4plus's RRDBNet keys and shapes, random weights (scaled so activations stay sane)."""
    import torch

    sd, gen = {}, torch.Generator().manual_seed(0)

    def conv(name, cout, cin):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (1.0 / (cin * 9)) ** 0.5
        sd[f"{name}.bias"] = torch.zeros(cout)

    conv("conv_first", feat, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{k}", feat if k == 5 else grow, feat + (k - 1) * grow)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, feat, feat)
    conv("conv_last", 3, feat)
    return sd


def run_esrgan(tile: int) -> dict:
    from PIL import Image
    from safetensors.torch import save_file

    from engine.engine import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        (models / "ESRGAN").mkdir(parents=True)
        save_file(rrdb_x4_state_dict(), str(models / "ESRGAN" / "bench-rrdb-x4.safetensors"))
        engine = Engine(EngineConfig(models, Path(tmp) / "outputs", Path(tmp) / "data"))
        image = Image.new("RGB", (SIDE, SIDE), (120, 140, 160))
        before = peak_mb()
        start = time.perf_counter()
        result = engine.upscale(image, "bench-rrdb-x4", 4, tile)
        seconds = time.perf_counter() - start
        assert result.images[0].size == (4 * SIDE, 4 * SIDE)
    return {"run": f"ESRGAN x4, tile {tile or 'none'}", "seconds": seconds, "peak_mb": peak_mb(),
            "peak_before_mb": before}


def run_sdx4(steps: int, tile: int) -> dict:
    from PIL import Image

    from bench.x4_upscale import X4_LOW_RES, X4_SCHEDULER, X4_UNET, X4_VAE
    import engine.compat  # noqa: F401
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.jobs import Job
    from engine.sd_upscaler import upscale_sd_x4
    from engine.tokenizers import load_clip_tokenizer

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")).eval()
    pipe = StableDiffusionUpscalePipeline(
        unet=UNet2DConditionModel(**X4_UNET).eval(), vae=AutoencoderKL(**X4_VAE).eval(), text_encoder=text,
        tokenizer=load_clip_tokenizer("open-clip"), low_res_scheduler=DDPMScheduler(**X4_LOW_RES),
        scheduler=DDIMScheduler(**X4_SCHEDULER), safety_checker=None, feature_extractor=None, watermarker=None,
        max_noise_level=350)
    seen = []  # (time of the update, tiles done, tiles, ETA it showed)
    job = Job(on_progress=lambda u: seen.append((time.perf_counter(), u.step, u.steps, u.eta)))
    image = Image.new("RGB", (SIDE, SIDE), (120, 140, 160))
    start = time.perf_counter()
    out = upscale_sd_x4(pipe, image, steps=steps, seed=0, tile=tile, job=job)
    end = time.perf_counter()
    assert out.size == (4 * SIDE, 4 * SIDE)
    checks = []
    for when, done, total, eta in seen:
        if done < total:
            real = end - when
            checks.append({"tiles_done": done, "tiles": total, "eta_s": round(eta, 1), "real_s": round(real, 1),
                           "error": round((eta - real) / real, 3)})
    return {"run": f"SD x4, tile {tile}, {steps} steps", "seconds": end - start, "peak_mb": peak_mb(),
            "eta": checks}


def run_all(sd_steps: int) -> int:
    runs = [["esrgan", "--tile", "256"], ["esrgan", "--tile", "0"], ["sdx4", "--steps", str(sd_steps)]]
    results = []
    for args in runs:
        print("running", " ".join(args), flush=True)
        out = subprocess.run([sys.executable, __file__, *args, "--json"], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(f"\nload average before the last run: {os.getloadavg()}")
    print("| run | time | peak RSS |\n| --- | --- | --- |")
    for r in results:
        print(f"| {r['run']} | {r['seconds']:.0f} s | {r['peak_mb'] / 1024:.2f} GiB |")
    for r in results:
        for c in r.get("eta", []):
            print(f"after tile {c['tiles_done']}/{c['tiles']}: ETA {c['eta_s']} s, really {c['real_s']} s "
                  f"({c['error']:+.0%})")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("esrgan", "sdx4", "all"))
    p.add_argument("--tile", type=int, default=None, help="esrgan: 256 (default) or 0 for none; sdx4: 128")
    p.add_argument("--steps", type=int, default=2, help="sdx4: denoising steps per tile")
    p.add_argument("--sd-steps", type=int, default=2, help="all: the sdx4 run's steps")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (used by `all`)")
    args = p.parse_args()
    if args.what == "all":
        return run_all(args.sd_steps)
    import torch

    result = run_esrgan(256 if args.tile is None else args.tile) if args.what == "esrgan" else \
        run_sdx4(args.steps, 128 if args.tile is None else args.tile)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
