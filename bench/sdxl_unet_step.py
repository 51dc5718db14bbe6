"""SDXL-size UNet step time on this machine: 1024x1024 (128x128 latents), CFG batch 2, random weights.

    venv/bin/python bench/sdxl_unet_step.py [--precision fp32|bf16] [--steps 2]

Builds SDXL base's UNet architecture (2.6 B parameters, ~10.3 GB in fp32) with random weights in
memory - nothing is saved - and times UNet calls after one warm-up call. Prints one line; the
numbers go into docs/benchmarks.md by hand, with the machine line this prints.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.compat  # noqa: E402,F401 - torchvision shim before diffusers
from cpu_benchmark import machine_info  # noqa: E402

# SDXL base's UNet, as data (the released unet/config.json's architecture fields).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def main() -> int:
    import torch
    from diffusers import UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(**SDXL_UNET).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    build_s = time.perf_counter() - start
    params = sum(t.numel() for t in unet.parameters()) / 1e9
    latents = torch.randn(2, 4, 128, 128, dtype=dtype)
    context = torch.randn(2, 77, 2048, dtype=dtype)
    added = {"text_embeds": torch.randn(2, 1280, dtype=dtype),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, dtype=dtype)}
    times = []
    with torch.inference_mode():
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            unet(latents, 999, encoder_hidden_states=context, added_cond_kwargs=added)
            if i:  # the first call pays oneDNN's kernel selection
                times.append(time.perf_counter() - t0)
    m = machine_info()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"machine: {m['cpu']} | flags: {m['flags']} | native bf16: {m['mkldnn_bf16']} | torch {m['torch']}")
    print(f"SDXL UNet 1024x1024 CFG batch 2, {args.precision}: {params:.2f} B params, build {build_s:.0f} s, "
          f"{sum(times) / len(times):.1f} s/step (mean of {len(times)}), peak RSS {rss:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
