"""Tiny random-weight Stable Diffusion models, built in-process as diffusers' own tests do.

The shapes follow the real families (same block types, same key layout) at toy sizes, so every
code path a real checkpoint takes runs here in well under a second. The text encoder keeps the
real 49408-token vocabulary because the tokenizer is the real CLIP tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch

import engine.compat  # noqa: F401 - installs the torchvision shim before transformers is imported
from engine.tokenizers import load_clip_tokenizer

# The SD 1.x builders live in the engine (selftest and --demo use them); the other families are
# only needed by tests and live here.
from engine.tiny import TEXT_HIDDEN, save_sd1_folder, tiny_sd1_pipeline, tiny_text_encoder, tiny_unet, tiny_vae  # noqa: E402,F401


def tiny_open_clip_text_encoder(seed: int = 0, hidden: int = TEXT_HIDDEN, layers: int = 2, projection: int | None = None):
    """OpenCLIP-style text tower (SD 2.x, SDXL's second encoder): plain GELU, unlike OpenAI CLIP's quick-GELU."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_act="gelu",
        projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _sd_scheduler(prediction_type: str = "epsilon", beta_start: float = 0.00085, beta_end: float = 0.012):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=beta_start, beta_end=beta_end, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, prediction_type=prediction_type,
    )


def tiny_sd2_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline

    # SD 2.x: OpenCLIP text tower, linear projections in the UNet's transformers.
    return StableDiffusionPipeline(
        unet=tiny_unet(seed, use_linear_projection=True, upcast_attention=True),
        vae=tiny_vae(seed),
        text_encoder=tiny_open_clip_text_encoder(seed),
        tokenizer=load_clip_tokenizer("open-clip"),
        scheduler=_sd_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_inpaint_pipeline(seed: int = 0, sd2: bool = False):
    from diffusers import StableDiffusionInpaintPipeline

    # 9 input channels: latents + mask + masked-image latents.
    if sd2:
        unet = tiny_unet(seed, in_channels=9, use_linear_projection=True, upcast_attention=True)
        text_encoder, tokenizer = tiny_open_clip_text_encoder(seed), load_clip_tokenizer("open-clip")
    else:
        unet = tiny_unet(seed, in_channels=9)
        text_encoder, tokenizer = tiny_text_encoder(seed), load_clip_tokenizer("clip-l")
    return StableDiffusionInpaintPipeline(
        unet=unet, vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


SDXL_PROJECTION = 32
SDXL_TIME_EMBED = 8


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    # Context = both encoders' hidden states side by side; the size/crop conditioning MLP takes
    # the pooled projection plus six Fourier-embedded numbers.
    unet = tiny_unet(
        seed, cross_attention_dim=2 * TEXT_HIDDEN, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_PROJECTION + 6 * SDXL_TIME_EMBED,
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed), tokenizer=load_clip_tokenizer("clip-l"),
        text_encoder_2=tiny_open_clip_text_encoder(seed + 1, projection=SDXL_PROJECTION),
        tokenizer_2=load_clip_tokenizer("open-clip"),
        scheduler=_sd_scheduler(), add_watermarker=False,
    )


def tiny_upscaler_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Three blocks: a x4 VAE, like the real upscaler's.
    return AutoencoderKL(
        block_out_channels=(32, 32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.08333,
    ).eval()


def tiny_upscaler_pipeline(seed: int = 0):
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    # 7 input channels: latents + the low-resolution RGB image; the noise level enters through a
    # class embedding; the cross-attention level attends to text only, as in the real model.
    unet = tiny_unet(seed, in_channels=7, use_linear_projection=True, num_class_embeds=1000,
                     only_cross_attention=[False, True])
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000,
                            clip_sample=True, prediction_type="epsilon", variance_type="fixed_small")
    return StableDiffusionUpscalePipeline(
        unet=unet, vae=tiny_upscaler_vae(seed), text_encoder=tiny_open_clip_text_encoder(seed),
        tokenizer=load_clip_tokenizer("open-clip"), low_res_scheduler=low_res,
        scheduler=_sd_scheduler("v_prediction", 0.0001, 0.02), max_noise_level=350,
    )


def save_folder(pipe, dest: Path) -> Path:
    pipe.save_pretrained(str(dest), safe_serialization=True)
    return dest


def tiny_pipeline(family: str, seed: int = 0):
    """A tiny pipeline of the given engine Family value ('sd1', 'sd2-v', 'sdxl', ...)."""
    builders = {
        "sd1": lambda: tiny_sd1_pipeline(seed),
        "sd2": lambda: tiny_sd2_pipeline(seed),
        "sd2-v": lambda: tiny_sd2_pipeline(seed, prediction_type="v_prediction"),
        "sdxl": lambda: tiny_sdxl_pipeline(seed),
        "sd1-inpaint": lambda: tiny_inpaint_pipeline(seed),
        "sd2-inpaint": lambda: tiny_inpaint_pipeline(seed, sd2=True),
        "sd-x4-upscaler": lambda: tiny_upscaler_pipeline(seed),
    }
    return builders[str(getattr(family, "value", family))]()


@torch.no_grad()
def make_unet_output_constant(unet, value: float):
    """Zero the last conv and set its bias, so the UNet outputs `value` everywhere whatever its input.

    Lets a test decide what A1111's eps/v probe (mean(out - 0.5) < -1) will measure.
    """
    unet.conv_out.weight.zero_()
    unet.conv_out.bias.fill_(value)
    return unet


def models_linking_tiny_sd1(root: Path, tiny_models_dir: Path) -> Path:
    """A models folder of its own under `root` whose Stable-diffusion/tiny-sd1 links the session's
    tiny SD 1.x folder (nothing copied); other kinds of file are the caller's to add."""
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "tiny-sd1").symlink_to(tiny_models_dir / "Stable-diffusion" / "tiny-sd1",
                                                          target_is_directory=True)
    return models
