"""One tile of the SD x4 upscaler at full size on this machine: seconds per UNet step, the VAE decode,
peak RSS, and the time that extrapolates to for a whole image.

    venv/bin/python bench/x4_upscale.py [--tile 128] [--steps 2] [--target 512]

Builds stabilityai/stable-diffusion-x4-upscaler's UNet (in 7, 256-512-512-1024, cross-attention
1024, noise-level class embedding) and VAE (128-256-512, x4) from their config values, typed below
as data, with random weights in memory (no hub access, nothing saved); the text encoder is a
1-layer stand-in of the real width (it runs once per image, not per tile). Then runs
`engine.sd_upscaler.upscale_sd_x4` on one `tile` x `tile` input (exactly one tile, CFG on: UNet
batch 2, VAE tiling on as in the engine) and prints one summary. Random weights: the time and
memory are the architecture's, the pixels are noise.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.compat  # noqa: E402,F401 - torchvision shim before diffusers

# stabilityai/stable-diffusion-x4-upscaler unet/config.json (architecture fields)
X4_UNET = dict(
    sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
    block_out_channels=(256, 512, 512, 1024),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=(True, True, True, False), attention_head_dim=8, cross_attention_dim=1024,
    use_linear_projection=True, num_class_embeds=1000, norm_num_groups=32, act_fn="silu",
)
# ... vae/config.json
X4_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=32, sample_size=256, scaling_factor=0.08333,
)
# ... scheduler/scheduler_config.json and low_res_scheduler
X4_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
X4_LOW_RES = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.sd_upscaler import plan_tiles, upscale_sd_x4
    from engine.tokenizers import load_clip_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--target", type=int, default=512, help="input side to extrapolate to (output is 4x)")
    p.add_argument("--target-steps", type=int, default=20)
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--image", type=int, default=0, help="input side of the run (default: one tile); a larger one "
                   "shows the peak RSS does not grow with the image beyond its buffers")
    args = p.parse_args()

    base = rss_mb()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**X4_UNET).eval()
    vae = AutoencoderKL(**X4_VAE).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")).eval()
    pipe = StableDiffusionUpscalePipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer("open-clip"),
        low_res_scheduler=DDPMScheduler(**X4_LOW_RES), scheduler=DDIMScheduler(**X4_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350)
    params = sum(t.numel() for t in unet.parameters()) / 1e6, sum(t.numel() for t in vae.parameters()) / 1e6
    loaded = rss_mb()

    unet_times, vae_times, marks = [], [], {}

    def pre(name):
        return lambda m, a: marks.__setitem__(name, time.perf_counter())

    def post(name, out):
        return lambda m, a, o: out.append(time.perf_counter() - marks[name])

    unet.register_forward_pre_hook(pre("unet"))
    unet.register_forward_hook(post("unet", unet_times))
    vae.decoder.register_forward_pre_hook(pre("vae"))
    vae.decoder.register_forward_hook(post("vae", vae_times))

    side = args.image or args.tile
    image = Image.new("RGB", (side, side), (120, 140, 160))
    run_tiles = len(plan_tiles(side, side, args.tile, args.overlap))
    start = time.perf_counter()
    out = upscale_sd_x4(pipe, image, steps=args.steps, seed=0, tile=args.tile, overlap=args.overlap)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert out.size == (4 * side, 4 * side)

    step = sum(unet_times[1:]) / max(1, len(unet_times) - 1) if len(unet_times) > 1 else unet_times[0]
    decode = sum(vae_times)
    tiles = len(plan_tiles(args.target, args.target, args.tile, args.overlap))
    per_tile = args.target_steps * step + decode
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; UNet {params[0]:.0f} M params, "
          f"VAE {params[1]:.0f} M params (fp32)")
    decode /= run_tiles  # per tile
    print(f"{side}x{side} input in {run_tiles} tile(s) of {args.tile} -> {4 * side}x{4 * side}, CFG batch 2, "
          f"{args.steps} steps: UNet step {step:.2f} s (first {unet_times[0]:.2f} s), VAE decode {decode:.2f} s a tile "
          f"({len(vae_times) // run_tiles} VAE tiles each), whole call {total:.1f} s")
    print(f"RSS: before models {base:.0f} MB, models built {loaded:.0f} MB, peak {peak:.0f} MB "
          f"(one tile's working memory ~{peak - loaded:.0f} MB over the weights)")
    print(f"extrapolated {args.target}x{args.target} -> {4 * args.target}x{4 * args.target} at "
          f"{args.target_steps} steps: {tiles} tiles (overlap {args.overlap}) x ({args.target_steps} x {step:.2f} s + "
          f"{decode:.2f} s) = {tiles * per_tile / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
