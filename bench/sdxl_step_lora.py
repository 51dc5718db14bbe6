"""A 4-step SDXL 1024x1024 job with a step LoRA on the CPU's OpenVINO backend, as whole
`app.py txt2img` processes (issue 23, item 3).

    venv/bin/python bench/sdxl_step_lora.py              # build once, then 3 jobs: first use, second, third
    venv/bin/python bench/sdxl_step_lora.py --jobs 1     # one job

The model is SDXL base's full architecture with seeded random weights (UNet 2.6 B parameters,
both text encoders, the VAE), saved once as a diffusers folder in f32 under
`bench/cache/models-sdxl/` (~14 GB; gitignored). The LoRA is a random kohya file named as
SDXL-Lightning's release (`sdxl_lightning_4step_lora`), UNet only as the real one, rank 16 on the
attention projections, the feed-forwards and proj_in/proj_out: the engine recognises it by its
name and runs Euler + SGM Uniform, 4 steps, CFG 1 (engine/lora.py).

Each job is its own process (`--backend openvino --device cpu`, no watermark, seed 1, the data
dir kept between runs: its OpenVINO cache). The first job converts the checkpoint (its time
includes that) and fuses the LoRA set in memory; the second fuses again and stores the fused
graph; the third reads it (engine.openvino_lora.stored_variant). Measured as bench/lora_openvino.py
measures: wall time, peak RSS of the process tree, the notes printed. Writes nothing to docs/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):  # sdxl_unet_step imports its neighbours as top-level modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.lora_openvino import CACHE, cpu_model, loadavg, make_lora, run_job  # noqa: E402
from sdxl_unet_step import SDXL_UNET  # noqa: E402

MODELS = CACHE / "models-sdxl"
NAME = "sdxl-random"
LORA = "sdxl_lightning_4step_lora"
# SDXL base's VAE and text encoders, as data (the released config.json files' architecture fields).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
              projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def ensure_sdxl() -> Path:
    folder = MODELS / "Stable-diffusion" / NAME
    if (folder / "model_index.json").is_file():
        return folder
    import engine.compat  # noqa: F401 - torchvision shim before diffusers
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.tokenizers import load_clip_tokenizer

    print(f"building random-weight SDXL into {folder} (once, ~14 GB)", flush=True)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).eval(),
        tokenizer=load_clip_tokenizer("clip-l"), tokenizer_2=load_clip_tokenizer("open-clip"),
        unet=UNet2DConditionModel(**SDXL_UNET).eval(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"),
    )
    tmp = folder.with_name(folder.name + ".partial")
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=CACHE / "sdxl-step-lora-data")
    args = p.parse_args(argv)
    folder = ensure_sdxl()
    lora = MODELS / "Lora" / f"{LORA}.safetensors"
    if not lora.is_file():
        make_lora(lora, folder, seed=5, lcm=True)  # lcm=True: UNet only, attention + ff + proj_in/out
    work = Path(tempfile.mkdtemp(prefix="sdxl-step-lora-", dir=CACHE))
    print(f"machine: {cpu_model()}, nproc {os.cpu_count()}, load before {loadavg()}", flush=True)
    for n in range(args.jobs):
        r = run_job("lightning4", MODELS, NAME, 4, 1024, args.data_dir, work / f"job{n}")
        print(f"job {n}: {r['seconds']:.1f} s, peak {r['peak_tree_gb']:.2f} GB, rc {r['rc']}, notes: "
              + "; ".join(r["notes"] + r["errors"]), flush=True)
        if r["rc"] or not r["png"]:
            print(r.get("stderr_tail", ""), file=sys.stderr)
            return 1
    print(f"load after {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
