"""Inpainting: img2img that redraws only where a mask is white, as A1111 does it.

Steps for one job (`InpaintJob.prepare`, then per image `composite`):
1. The mask: its alpha where it has transparency (strokes painted on a transparent layer), else
   its brightness; inverted for "Inpaint not masked"; blurred by `mask_blur` pixels.
2. Inpaint area "Only masked" (`inpaint_full_res`): the mask's bounding box plus the padding,
   widened to the request's aspect ratio (diffusers' `VaeImageProcessor.get_crop_region`), is cut
   out and worked on at the request's size; otherwise the whole picture is.
3. Masked content: "original" keeps the picture under the mask; "fill" replaces it with colours
   blurred in from around the mask first; "latent noise" / "latent nothing" replace its latents with
   noise / zeros after encoding (`fill_latents`).
4. The family's inpaint pipeline runs (an inpainting checkpoint's 9-channel UNet sees mask and
   masked picture; an ordinary 4-channel UNet gets the unmasked latents blended back each step).
5. After decoding, the result is pasted back into the original picture through the blurred mask
   (diffusers' `apply_overlay`): wherever the blurred mask is 0 the original's pixels are kept
   exactly. This happens before publishing, so the watermark, when on, is applied to the whole
   finished picture like every other Easel image: with it on, unmasked pixels differ from the
   original only by the watermark; with it off (`--no-watermark`, Settings) they are identical.

No torch at import: engine.request (imported by the torch-free ui) uses `mask_from_image`.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from engine.errors import RequestError

# A1111's "Masked content" choices, in the order of its API's `inpainting_fill` numbers 0-3.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = {False: "Whole picture", True: "Only masked"}
MASK_MODES = {False: "Inpaint masked", True: "Inpaint not masked"}


def mask_from_image(image: Image.Image) -> Image.Image:
    """The "L" mask an image stands for (white: redraw): its alpha when it has transparent pixels,
    else its brightness."""
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return image.convert("L")


def check_mask(mask: Image.Image, init: Image.Image, invert: bool) -> None:
    """RequestError naming `mask` when it does not match the init image or marks nothing."""
    if mask.size != init.size:
        raise RequestError("mask", f"is {mask.width}x{mask.height} but the init image is {init.width}x{init.height}; "
                                   "the mask must be the init image's size")
    low, high = mask.getextrema()
    if (high if not invert else 255 - low) == 0:
        raise RequestError("mask", "marks nothing to redraw (all black" + (" once inverted" if invert else "")
                                   + "); white marks the area to redraw")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with colours blurred in from around it, coarse to fine."""
    outside = Image.new("RGBa", image.size)
    outside.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = outside.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


@dataclass
class InpaintJob:
    """One request's inpainting, worked out once: what the pipeline gets and how to put it back."""
    init: Image.Image              # the init image at the request's size
    mask: Image.Image              # blurred, inverted if asked, at the request's size: the composite mask
    crop: tuple | None             # (x1, y1, x2, y2) of "Only masked", else None
    image: Image.Image             # what the pipeline starts from, at the request's size
    pipeline_mask: Image.Image     # its mask, at the request's size
    fill: str                      # one of MASKED_CONTENT

    @classmethod
    def prepare(cls, request, init: Image.Image, mask: Image.Image) -> "InpaintJob":
        """`init` and `mask`: the init image and the request's mask, both at the request's size
        (resized the same way, by the request's resize mode)."""
        from diffusers.image_processor import VaeImageProcessor

        size = (request.width, request.height)
        mask = mask.convert("L")
        if request.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if request.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
        crop, image, pipeline_mask = None, init, mask
        if request.inpaint_full_res:
            crop = VaeImageProcessor.get_crop_region(mask, request.width, request.height,
                                                     pad=request.inpaint_full_res_padding)
            image = init.crop(crop).resize(size, Image.LANCZOS)
            pipeline_mask = mask.crop(crop).resize(size, Image.LANCZOS)
        if request.inpainting_fill == "fill":
            image = fill_masked(image, pipeline_mask)
        return cls(init, mask, crop, image, pipeline_mask, request.inpainting_fill)

    def pipeline_inputs(self, pipe, seeds_generators, unet_channels: int) -> dict:
        """Keyword arguments for the inpaint pipeline: the picture (or, for the latent fills, its
        latents with the masked part replaced) and the mask."""
        extra = dict(image=self.image, mask_image=self.pipeline_mask)
        if self.fill in ("latent noise", "latent nothing"):
            extra.update(self._latent_inputs(pipe, seeds_generators, unet_channels))
        return extra

    def _latent_inputs(self, pipe, generators, unet_channels: int) -> dict:
        import torch
        import torch.nn.functional as F

        n = len(generators)
        device, dtype = pipe._execution_device, pipe.vae.dtype
        pixels = pipe.image_processor.preprocess(self.image).to(device=device, dtype=dtype).repeat(n, 1, 1, 1)
        mask = pipe.mask_processor.preprocess(self.pipeline_mask).to(device=device, dtype=dtype)
        latents = pipe._encode_vae_image(pixels, generators)
        small = F.interpolate(mask, size=latents.shape[-2:])
        if self.fill == "latent noise":
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=torch.float32) for g in generators])
            replacement = noise.to(device=device, dtype=latents.dtype)
        else:
            replacement = torch.zeros_like(latents)
        start = latents * (1 - small) + replacement * small
        # The inpainting UNet also sees the picture outside the mask: encoded as the pipeline would.
        # (A 4-channel UNet never reads it, but the pipeline cannot derive it from latents itself.)
        masked = pipe._encode_vae_image(pixels * (mask < 0.5), generators) if unet_channels == 9 else start
        return {"image": start, "masked_image_latents": masked}

    def composite(self, image: Image.Image) -> Image.Image:
        """The generated picture put back into the original through the blurred mask: unmasked
        pixels (mask 0) are the original's exactly."""
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor().apply_overlay(self.mask, self.init, image, self.crop)

