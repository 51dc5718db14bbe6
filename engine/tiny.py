"""A tiny random-weight SD 1.x model, for `selftest`, `--demo` and the tests.

It has the real families' structure (same blocks, same key layout, the real CLIP tokenizer) at toy
sizes, so every code path runs in well under a second. Its images are noise: it has no training.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers
from engine.tokenizers import load_clip_tokenizer

TEXT_HIDDEN = 64  # one 64-wide head, like every real CLIP text tower's head width


def tiny_text_encoder(seed: int = 0, hidden: int = TEXT_HIDDEN, layers: int = 2, projection: int | None = None,
                      pad_token_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=pad_token_id, hidden_act="quick_gelu", projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_unet(seed: int = 0, in_channels: int = 4, cross_attention_dim: int = TEXT_HIDDEN, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32, **extra,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two blocks: vae_scale_factor 2, not 8 - code that hard-codes 8 fails on this model.
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32,
    ).eval()


def tiny_sd1_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=tiny_unet(seed), vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed),
        tokenizer=load_clip_tokenizer("clip-l"), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def save_sd1_folder(dest: Path, seed: int = 0) -> Path:
    tiny_sd1_pipeline(seed).save_pretrained(str(dest), safe_serialization=True)
    return dest
