"""Which Stable Diffusion family a checkpoint belongs to, decided from its key names and shapes.

Pure data and rules: no torch here. The one question the keys cannot answer - whether an SD 2.x
UNet predicts noise (512 base) or v (768) - is left to `engine.checkpoints`, which runs the UNet
once the way A1111 does. `detect_family` says so through `needs_prediction_test`; it never guesses.
"""
from __future__ import annotations

import enum
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from engine.errors import UnknownCheckpointError


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SD2_V = "sd2-v"
    SDXL = "sdxl"
    SD1_INPAINT = "sd1-inpaint"
    SD2_INPAINT = "sd2-inpaint"
    SD_X4_UPSCALER = "sd-x4-upscaler"


# Key names of the original (LDM / sgm) single-file layout.
UNET_PREFIX = "model.diffusion_model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
UPSCALER_CLASS_KEY = UNET_PREFIX + "label_emb.weight"  # the x4 upscaler's noise-level embedding
SDXL_ADM_KEY = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's size/crop conditioning MLP
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP-L in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H in open_clip's layout
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
VAE_PREFIX = "first_stage_model."



@dataclass(frozen=True)
class TextEncoderSpec:
    """One text tower of a family: which tokenizer, where its weights sit in a single file, and
    which of its outputs the UNet reads."""
    tokenizer: str            # "clip-l" (OpenAI CLIP-L) or "open-clip" (OpenCLIP ViT-H/bigG)
    prefix: str               # its keys' prefix in the original single-file layout
    with_projection: bool = False  # SDXL's second tower: its pooled, projected output conditions the UNet too
    penultimate: bool = False      # the UNet reads the last-but-one layer's hidden states (SD 2.x)


CLIP_L = TextEncoderSpec("clip-l", CLIP_PREFIX)
OPEN_CLIP_H = TextEncoderSpec("open-clip", OPEN_CLIP_PREFIX, penultimate=True)
SDXL_ENCODERS = (TextEncoderSpec("clip-l", SDXL_CLIP_PREFIX),
                 TextEncoderSpec("open-clip", SDXL_OPEN_CLIP_PREFIX, with_projection=True))

# Easel watermarks and (not) safety-checks in its own code, the same way for every family, so each
# pipeline is built without its own watermarker / safety checker.
_SD_EXTRAS = types.MappingProxyType({"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
_SDXL_EXTRAS = types.MappingProxyType({"add_watermarker": False})
_UPSCALER_EXTRAS = types.MappingProxyType({"safety_checker": None, "feature_extractor": None, "watermarker": None})


@dataclass(frozen=True)
class FamilyInfo:
    """Everything Easel knows about a family, as data: adding a family (or a mode) is one entry."""
    family: Family
    label: str
    prediction_type: str  # "epsilon" | "v_prediction"
    native_size: int  # pixels; the upscaler's is its input size
    upcast_attention: bool  # SD 2.x attention overflows in fp16 unless computed in fp32
    text_encoder_specs: tuple[TextEncoderSpec, ...]
    ldm_config: str  # file name under engine/configs/
    pipeline: str  # diffusers pipeline class name (txt2img, or the family's only pipeline)
    img2img_pipeline: str | None = None  # None: the family cannot generate from an image
    pipeline_extras: Mapping[str, object] = field(default_factory=lambda: _SD_EXTRAS)  # keyword arguments its pipeline class is built with
    inpaint_unet: bool = False  # the UNet takes image + mask channels (9 in): always given an image and a mask
    fp16_vae_overflows: bool = False  # its VAE gives NaN/inf in fp16: keep the VAE in fp32 on fp16 plans
    size_conditioning: bool = False  # SDXL's UNet takes size/crop conditioning (addition_embed_type text_time)
    latent_preview: str = "sd"  # which latent -> RGB approximation the live preview uses ("sd" | "sdxl")
    upscaler: bool = False  # it upscales an image (latent = the input image) instead of generating one

    @property
    def text_encoders(self) -> int:
        return len(self.text_encoder_specs)

    @property
    def generates(self) -> bool:
        return not self.upscaler


FAMILIES: Mapping[Family, FamilyInfo] = types.MappingProxyType({
    Family.SD1: FamilyInfo(Family.SD1, "SD 1.x", "epsilon", 512, False, (CLIP_L,),
                           "v1-inference.yaml", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    Family.SD2: FamilyInfo(Family.SD2, "SD 2.x (512, epsilon)", "epsilon", 512, True, (OPEN_CLIP_H,),
                           "v2-inference.yaml", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    Family.SD2_V: FamilyInfo(Family.SD2_V, "SD 2.x (768, v-prediction)", "v_prediction", 768, True, (OPEN_CLIP_H,),
                             "v2-inference-v.yaml", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    Family.SDXL: FamilyInfo(Family.SDXL, "SDXL base", "epsilon", 1024, False, SDXL_ENCODERS,
                            "sd_xl_base.yaml", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                            pipeline_extras=_SDXL_EXTRAS, fp16_vae_overflows=True, size_conditioning=True,
                            latent_preview="sdxl"),
    Family.SD1_INPAINT: FamilyInfo(Family.SD1_INPAINT, "SD 1.x inpainting", "epsilon", 512, False, (CLIP_L,),
                                   "v1-inpainting-inference.yaml", "StableDiffusionInpaintPipeline",
                                   "StableDiffusionInpaintPipeline", inpaint_unet=True),
    Family.SD2_INPAINT: FamilyInfo(Family.SD2_INPAINT, "SD 2.x inpainting", "epsilon", 512, True, (OPEN_CLIP_H,),
                                   "v2-inpainting-inference.yaml", "StableDiffusionInpaintPipeline",
                                   "StableDiffusionInpaintPipeline", inpaint_unet=True),
    Family.SD_X4_UPSCALER: FamilyInfo(Family.SD_X4_UPSCALER, "SD x4 upscaler", "v_prediction", 128, False,
                                      (OPEN_CLIP_H,), "x4-upscaling.yaml", "StableDiffusionUpscalePipeline",
                                      pipeline_extras=_UPSCALER_EXTRAS, upscaler=True),
})

_ARCH_BY_CHANNELS = {  # (text encoder kind, UNet input channels) -> family
    ("clip", 4): Family.SD1,
    ("clip", 9): Family.SD1_INPAINT,
    ("open_clip", 4): Family.SD2,
    ("open_clip", 9): Family.SD2_INPAINT,
    ("open_clip", 7): Family.SD_X4_UPSCALER,
    ("sdxl", 4): Family.SDXL,
}


def _has_prefix(keys: Mapping[str, tuple[int, ...]], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def sgm_sd2_as_ldm(keys: Mapping) -> Mapping:
    """An SD 2.x checkpoint saved by Stability's generative-models trainer ("sgm" layout: SD-Turbo's
    own sd_turbo.safetensors) keeps its OpenCLIP under `conditioner.embedders.0.model.`, the prefix
    the SDXL refiner uses too. Its UNet tells them apart: the refiner has SDXL's size-conditioning
    MLP (label_emb), SD 2.x has none. Returns the same mapping with the SD 2.x text encoder under the
    LDM prefix the rest of Easel reads (values untouched: shapes or tensors); anything else as it is."""
    if SDXL_ADM_KEY in keys or _has_prefix(keys, SDXL_OPEN_CLIP_PREFIX) or not _has_prefix(keys, SDXL_REFINER_PREFIX):
        return keys
    cut = len(SDXL_REFINER_PREFIX)
    return {OPEN_CLIP_PREFIX + k[cut:] if k.startswith(SDXL_REFINER_PREFIX) else k: v for k, v in keys.items()}


def text_encoder_kind(keys: Mapping[str, tuple[int, ...]]) -> str | None:
    """'clip' (SD 1.x), 'open_clip' (SD 2.x), 'sdxl' (both, SDXL base), 'sdxl_refiner', or None."""
    if _has_prefix(keys, SDXL_CLIP_PREFIX) and _has_prefix(keys, SDXL_OPEN_CLIP_PREFIX):
        return "sdxl"
    if _has_prefix(keys, SDXL_REFINER_PREFIX):
        return "sdxl_refiner"
    if _has_prefix(keys, OPEN_CLIP_PREFIX):
        return "open_clip"
    if _has_prefix(keys, CLIP_PREFIX):
        return "clip"
    return None


def _text_width(keys: Mapping[str, tuple[int, ...]], kind: str) -> int:
    """Width of the hidden states the UNet cross-attends to (SDXL: both encoders concatenated)."""
    def token_width(prefix: str, name: str) -> int:
        for key, shape in keys.items():
            if key.startswith(prefix) and key.endswith(name):
                return shape[-1]
        return 0

    if kind == "clip":
        return token_width(CLIP_PREFIX, "token_embedding.weight")
    if kind == "open_clip":
        return token_width(OPEN_CLIP_PREFIX, "token_embedding.weight")
    return (token_width(SDXL_CLIP_PREFIX, "token_embedding.weight")
            + token_width(SDXL_OPEN_CLIP_PREFIX, "token_embedding.weight"))


def _context_width(keys: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in keys.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return shape[-1]
    return None


def family_from_keys(keys_and_shapes: Mapping[str, tuple[int, ...]], path: Path) -> Family:
    """The architecture the weights alone show. SD2 here still means "SD 2.x, eps or v unknown"."""
    name = Path(path).name
    in_shape = keys_and_shapes.get(UNET_IN_KEY)
    if in_shape is None or len(in_shape) != 4:
        raise UnknownCheckpointError(
            f"{name}: no Stable Diffusion UNet weights ({UNET_IN_KEY}); is it a VAE, LoRA or embedding?")
    in_channels = in_shape[1]
    kind = text_encoder_kind(keys_and_shapes)
    if kind is None:
        raise UnknownCheckpointError(
            f"{name}: no text encoder weights (cond_stage_model.* or conditioner.embedders.*); "
            "Easel needs a full checkpoint")
    if kind == "sdxl_refiner":
        raise UnknownCheckpointError(f"{name}: an SDXL refiner; Easel supports SDXL base only")
    family = _ARCH_BY_CHANNELS.get((kind, in_channels))
    if family is None:
        raise UnknownCheckpointError(
            f"{name}: a {kind} UNet with {in_channels} input channels matches no supported family "
            "(SD 1.x, SD 2.x, SDXL base, SD inpainting, SD x4 upscaler)")
    if family is Family.SD_X4_UPSCALER and UPSCALER_CLASS_KEY not in keys_and_shapes:
        raise UnknownCheckpointError(f"{name}: 7 input channels but no noise-level embedding; not the x4 upscaler")
    if family is Family.SDXL and SDXL_ADM_KEY not in keys_and_shapes:
        raise UnknownCheckpointError(f"{name}: SDXL text encoders but no size conditioning in the UNet")
    context, width = _context_width(keys_and_shapes), _text_width(keys_and_shapes, kind)
    if context is not None and context != width:
        # A merge of mismatched parts; loading it would fail later with a shape error.
        raise UnknownCheckpointError(
            f"{name}: the UNet attends to {context}-wide text states but its text encoder gives {width}")
    return family


# --- sidecar yaml (the original LDM config A1111 reads from <checkpoint>.yaml) ----------------------

def _model_params(sidecar: dict) -> dict:
    model = sidecar.get("model") if isinstance(sidecar, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    return params if isinstance(params, dict) else {}


def sidecar_unet_params(sidecar: dict) -> dict:
    params = _model_params(sidecar)
    for key in ("unet_config", "network_config"):  # LDM / sgm names
        section = params.get(key)
        if isinstance(section, dict) and isinstance(section.get("params"), dict):
            return section["params"]
    return {}


def sidecar_prediction_type(sidecar: dict) -> str:
    """LDM's `parameterization` ("eps" unless set), or sgm's denoiser scaling class."""
    params = _model_params(sidecar)
    if params.get("parameterization") == "v":
        return "v_prediction"
    scaling = ((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}
    if str(scaling.get("target", "")).endswith("VScaling"):
        return "v_prediction"
    return "epsilon"


def _check_sidecar(family: Family, in_channels: int, sidecar: dict, name: str) -> None:
    if not _model_params(sidecar):
        raise UnknownCheckpointError(f"{name}: its sidecar yaml has no model.params section; not an LDM config")
    declared = sidecar_unet_params(sidecar).get("in_channels")
    if declared is not None and declared != in_channels:
        raise UnknownCheckpointError(
            f"{name}: its sidecar yaml says in_channels {declared} but the UNet weights take {in_channels}")


def detect_family(keys_and_shapes: Mapping[str, tuple[int, ...]], path: Path, sidecar: dict | None = None) -> Family:
    """Family of a single-file checkpoint from its key names and shapes, honouring a sidecar yaml.

    For an SD 2.x UNet with no sidecar this returns Family.SD2 provisionally: check
    `needs_prediction_test(family, sidecar)` and settle it with the UNet test
    (`engine.checkpoints.identify_model` does both).
    """
    name = Path(path).name
    family = family_from_keys(keys_and_shapes, path)
    if sidecar is None:
        return family
    _check_sidecar(family, keys_and_shapes[UNET_IN_KEY][1], sidecar, name)
    return with_prediction(family, sidecar_prediction_type(sidecar), f"{name}: its sidecar yaml asks for")


def with_prediction(family: Family, prediction: str, source: str) -> Family:
    """The family a stated prediction type makes of `family` (SD 2.x + v -> SD2_V); a combination
    no released model has is refused. `source` opens the message, e.g. 'x.safetensors: its yaml asks for'."""
    if family is Family.SD2 and prediction == "v_prediction":
        return Family.SD2_V
    if prediction != FAMILIES[family].prediction_type:
        raise UnknownCheckpointError(
            f"{source} {prediction} but {FAMILIES[family].label} models use "
            f"{FAMILIES[family].prediction_type}; that combination is not supported")
    return family


def needs_prediction_test(family: Family, sidecar: dict | None) -> bool:
    """True when `family` came from keys alone and eps vs v must still be measured on the UNet."""
    return family is Family.SD2 and sidecar is None


def resolve_prediction(family: Family, is_v_prediction: bool) -> Family:
    """The settled family once the UNet test has answered."""
    if family is not Family.SD2:
        raise ValueError(f"only SD 2.x needs a prediction test, not {family.value}")
    return Family.SD2_V if is_v_prediction else Family.SD2
