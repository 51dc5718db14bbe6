"""Cheap live previews: latents -> RGB with a fixed linear map, no VAE, no extra weights.

The 4x3 factors are least-squares fits of each latent channel's contribution to RGB, the same
"approximate cheap" idea A1111 uses for its live preview. They are data, chosen per latent space.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# rows: latent channels; columns: R, G, B
_SD_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_preview(latents: torch.Tensor, sdxl: bool = False) -> list[Image.Image]:
    """One small RGB image per latent in the batch (1/vae_scale_factor of the final size)."""
    factors = torch.tensor(_SDXL_FACTORS if sdxl else _SD_FACTORS, dtype=torch.float32)
    bias = torch.tensor(_SDXL_BIAS if sdxl else (0.0, 0.0, 0.0), dtype=torch.float32)
    lat = latents.detach().to("cpu", torch.float32)[:, :4]
    rgb = torch.einsum("bchw,cr->bhwr", lat, factors) + bias  # roughly -1..1
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
