"""Reading checkpoints safely and turning them into diffusers pipelines, with no network access.

Single files (`.safetensors`, or `.ckpt`/`.pt` through `torch.load(weights_only=True)` only, after
`engine.safe_files` has checked them without running anything in them) are read once, identified by
`engine.families`, and converted with diffusers' own LDM converters
(`diffusers.loaders.single_file_utils`, the code behind `from_single_file`). We call those
converters directly instead of `Pipeline.from_single_file`: that entry point reads the file again
itself, looks for hub configs first, does not insist that every weight is present, and (offline,
without a scheduler passed in) guesses SD 2.x prediction from `global_step`. Here the file is read
once through the safe reader, every weight must be present, and nothing is guessed.

The original LDM config comes from a sidecar `<checkpoint>.yaml` when there is one (A1111's rule),
else from the family's shipped config in `engine/configs/`. Text encoder sizes come from the
tensors themselves, so fine-tunes with unusual shapes still load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from engine.errors import UnknownCheckpointError
from engine.families import (
    FAMILIES,
    Family,
    FamilyInfo,
    detect_family,
    needs_prediction_test,
    resolve_prediction,
    sgm_sd2_as_ldm,
    with_prediction,
)
from engine.safe_files import WEIGHT_SUFFIXES, read_shapes, read_tensors
from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
CLIP_HEAD_WIDTH = 64  # every released CLIP text tower uses 64-wide attention heads
BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407


# --- reading files -------------------------------------------------------------------------------

def sidecar_yaml(path: Path) -> Path | None:
    """The A1111-style `<checkpoint>.yaml` beside a single-file checkpoint, if there is one."""
    path = Path(path)
    if path.is_dir():
        return None
    candidate = path.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def read_sidecar(path: Path) -> dict | None:
    yaml_path = sidecar_yaml(path)
    return None if yaml_path is None else read_ldm_yaml(yaml_path)


def read_ldm_yaml(yaml_path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(yaml_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UnknownCheckpointError(f"{Path(yaml_path).name}: not a readable LDM yaml ({type(e).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UnknownCheckpointError(f"{Path(yaml_path).name}: not an LDM config (no top-level 'model' section)")
    return data


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint; safetensors memory-mapped, pickles only if plain
    tensors (see `engine.safe_files`: nothing in the file runs, sizes are checked before reading).
    An SD 2.x file in generative-models' layout (SD-Turbo) comes back in the LDM one."""
    return sgm_sd2_as_ldm(read_tensors(path))


def read_keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key names and tensor shapes, cheaply: only the safetensors header is read."""
    return sgm_sd2_as_ldm(read_shapes(path))


# --- identification ------------------------------------------------------------------------------

def shipped_config(family: Family, config_dir: Path | None = None) -> Path:
    return (config_dir or CONFIG_DIR) / FAMILIES[family].ldm_config


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UnknownCheckpointError(f"{folder.name}: not a diffusers folder ({path.relative_to(folder)} missing or unreadable)") from None


def _identify_folder(folder: Path) -> Family:
    index = _read_json(folder / "model_index.json", folder)
    unet = _read_json(folder / "unet" / "config.json", folder)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", folder)
    class_name, in_channels = index.get("_class_name"), unet.get("in_channels")
    # SD 2.x transformers project with linear layers, SD 1.x with 1x1 convolutions: true of every
    # released SD 2.x model, and the same difference the single-file keys show.
    sd2 = bool(unet.get("use_linear_projection"))
    family = {
        ("StableDiffusionXLPipeline", 4): Family.SDXL,
        ("StableDiffusionUpscalePipeline", 7): Family.SD_X4_UPSCALER,
        ("StableDiffusionPipeline", 4): Family.SD2 if sd2 else Family.SD1,
        ("StableDiffusionPipeline", 9): Family.SD2_INPAINT if sd2 else Family.SD1_INPAINT,
        ("StableDiffusionInpaintPipeline", 9): Family.SD2_INPAINT if sd2 else Family.SD1_INPAINT,
    }.get((class_name, in_channels))
    if family is None:
        raise UnknownCheckpointError(
            f"{folder.name}: a {class_name} with a {in_channels}-channel UNet matches no supported family")
    return with_prediction(family, scheduler.get("prediction_type", "epsilon"), f"{folder.name}: its scheduler uses")


def identify_model(path: Path, *, config_dir: Path | None = None) -> Family:
    """The family of a single-file checkpoint or a diffusers folder; UnknownCheckpointError if unsure.

    An SD 2.x file with no sidecar is settled by running its UNet once (see `is_v_prediction`),
    built from the shipped config in `config_dir` (default `engine/configs/`).
    """
    path = Path(path)
    if path.is_dir():
        if path.suffix.lower() in WEIGHT_SUFFIXES and not (path / "model_index.json").is_file():
            raise UnknownCheckpointError(f"{path.name}: is a folder, not a checkpoint file (and not a diffusers folder)")
        return _identify_folder(path)
    if not path.is_file():
        raise UnknownCheckpointError(f"{path.name}: no such file")
    sidecar = read_sidecar(path)
    family = detect_family(read_keys_and_shapes(path), path, sidecar)
    if needs_prediction_test(family, sidecar):
        state_dict = read_state_dict(path)
        original = read_ldm_yaml(shipped_config(family, config_dir))
        unet = build_unet(state_dict, original, FAMILIES[family], torch.float32, path)
        family = resolve_prediction(family, is_v_prediction(unet))
    return family


@torch.no_grad()
def is_v_prediction(unet) -> bool:
    """A1111's probe (`is_using_v_parameterization_for_sd2`), on the diffusers UNet.

    x = 0.5 everywhere (8x8 latent), t = 999, text context = 0.5 everywhere; v-prediction when
    mean(out - x) < -1. At t = 999 the input is almost pure noise, so an eps-model gives back about
    its input (out - x near 0), while a v-model's target there is about -x0: far below.
    """
    param = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 77, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - x.float()).mean().item() < -1


# --- building components -------------------------------------------------------------------------

def _empty(factory):
    """Build a model without allocating random weights (they are about to be replaced)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _adopt(model, weights: dict[str, torch.Tensor], dtype: torch.dtype, what: str, path: Path):
    """Give `model` the checkpoint's tensors; every weight the model has must be among them."""
    # Always a fresh copy: tensors memory-mapped from a safetensors file sit at arbitrary byte
    # offsets, and unaligned weights take slower kernels whose results differ in the last bit.
    weights = {k: v.to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in weights.items()}
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:3])
        raise UnknownCheckpointError(
            f"{Path(path).name}: {what} weights missing for its config ({len(result.missing_keys)} keys, e.g. {shown})")
    if result.unexpected_keys:
        logger.info("%s: %d unused %s keys, e.g. %s", Path(path).name, len(result.unexpected_keys), what,
                    result.unexpected_keys[:3])
    return model.eval()


def _unet_params(original: dict) -> dict:
    params = original["model"]["params"]
    section = params.get("unet_config") or params.get("network_config") or {}
    return section.get("params", {})


def _vae_scale(original: dict) -> int:
    return 2 ** (len(original["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)


def read_model_configs(path: Path, family: Family, config_dir: Path | None = None) -> tuple[int, dict | None]:
    """(VAE scale factor, UNet config or None) from a checkpoint's config files alone, no weights:
    a diffusers folder's vae/ and unet/ config.json; a single file's sidecar yaml or the family's
    shipped one (a single file carries no diffusers UNet config: None)."""
    path = Path(path)
    if path.is_dir():
        vae = _read_json(path / "vae" / "config.json", path)
        unet = _read_json(path / "unet" / "config.json", path)
        return 2 ** (len(vae.get("block_out_channels") or [0]) - 1), unet
    original = read_sidecar(path) or read_ldm_yaml(shipped_config(family, config_dir))
    try:
        return _vae_scale(original), None
    except (KeyError, TypeError):
        raise UnknownCheckpointError(f"{path.name}: its LDM config has no first_stage_config ddconfig ch_mult") from None


def _sdxl_time_embed_dim(original: dict) -> int:
    emb_models = ((original["model"]["params"].get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    for emb in emb_models:
        if str(emb.get("target", "")).endswith("ConcatTimestepEmbedderND"):
            return int(emb["params"]["outdim"])
    return 256


def build_unet(state_dict: dict, original: dict, info: FamilyInfo, dtype: torch.dtype, path: Path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original, state_dict)
    config["upcast_attention"] = info.upcast_attention
    # The upscaler's latent is its input image size; the others' is the image over the VAE factor.
    config["sample_size"] = info.native_size if info.upscaler else info.native_size // _vae_scale(original)
    if info.size_conditioning:
        # diffusers recognises SDXL by a 2048/1280 context width only; decide by family instead,
        # so narrower SDXL-shaped models (and our tiny test ones) get the size conditioning too.
        config.update(class_embed_type=None, addition_embed_type="text_time",
                      addition_time_embed_dim=_sdxl_time_embed_dim(original),
                      projection_class_embeddings_input_dim=_unet_params(original)["adm_in_channels"])
    weights = convert_ldm_unet_checkpoint(state_dict, config)
    return _adopt(_empty(lambda: UNet2DConditionModel.from_config(config)), weights, dtype, "UNet", path)


def build_vae(state_dict: dict, original: dict, info: FamilyInfo, dtype: torch.dtype, path: Path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(original, state_dict)
    config["sample_size"] = info.native_size * _vae_scale(original) if info.upscaler else info.native_size
    weights = convert_ldm_vae_checkpoint(state_dict, config)
    return _adopt(_empty(lambda: AutoencoderKL.from_config(config)), weights, dtype, "VAE", path)


def _shape(state_dict: dict, key: str, path: Path) -> tuple[int, ...]:
    if key not in state_dict:
        raise UnknownCheckpointError(f"{Path(path).name}: text encoder weight {key} is missing")
    return tuple(state_dict[key].shape)


def _count_layers(state_dict: dict, prefix: str) -> int:
    indices = {k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)}
    return len({i for i in indices if i.isdigit()})


def _text_config(vocab: int, hidden: int, positions: int, layers: int, intermediate: int, act: str,
                 projection: int | None, path: Path):
    from transformers import CLIPTextConfig

    if hidden % CLIP_HEAD_WIDTH:
        raise UnknownCheckpointError(f"{Path(path).name}: text encoder width {hidden} is not a multiple of {CLIP_HEAD_WIDTH}")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // CLIP_HEAD_WIDTH, max_position_embeddings=positions, hidden_act=act,
        projection_dim=projection or hidden, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        layer_norm_eps=1e-5,
    )


def _fit_text_keys(model, weights: dict) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the projection model
    # still has it. Normalise to whatever this model's own state dict uses.
    flat = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        return flat
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in flat.items()}


def build_clip_text_encoder(state_dict: dict, prefix: str, dtype: torch.dtype, path: Path):
    """OpenAI CLIP ViT-L text tower in transformers' layout (SD 1.x; SDXL's first encoder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    inner = prefix + "text_model." if any(k.startswith(prefix + "text_model.") for k in state_dict) else prefix
    vocab, hidden = _shape(state_dict, inner + "embeddings.token_embedding.weight", path)
    positions = _shape(state_dict, inner + "embeddings.position_embedding.weight", path)[0]
    intermediate = _shape(state_dict, inner + "encoder.layers.0.mlp.fc1.weight", path)[0]
    layers = _count_layers(state_dict, inner + "encoder.layers.")
    config = _text_config(vocab, hidden, positions, layers, intermediate, "quick_gelu", None, path)
    model = _empty(lambda: CLIPTextModel(config))
    weights = convert_ldm_clip_checkpoint({k: v for k, v in state_dict.items() if k.startswith(prefix)})
    return _adopt(model, _fit_text_keys(model, weights), dtype, "text encoder", path)


def build_open_clip_text_encoder(state_dict: dict, prefix: str, dtype: torch.dtype, path: Path, *,
                                 with_projection: bool, penultimate: bool):
    """OpenCLIP text tower (SD 2.x's ViT-H, SDXL's bigG) converted to transformers' CLIP classes.

    `penultimate`: SD 2.x reads the second-to-last layer, so the last resblock is dropped (as
    diffusers' SD 2.x text encoders have 23 of ViT-H's 24 layers).
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, hidden = _shape(state_dict, prefix + "token_embedding.weight", path)
    positions = _shape(state_dict, prefix + "positional_embedding", path)[0]
    intermediate = _shape(state_dict, prefix + "transformer.resblocks.0.mlp.c_fc.weight", path)[0]
    layers = _count_layers(state_dict, prefix + "transformer.resblocks.")
    projection = state_dict.get(prefix + "text_projection")
    if with_projection and projection is None:
        raise UnknownCheckpointError(f"{Path(path).name}: text encoder weight {prefix}text_projection is missing")
    own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if penultimate:
        layers -= 1
        own = {k: v for k, v in own.items() if not k.startswith(f"{prefix}transformer.resblocks.{layers}.")}
    if not with_projection:
        own.pop(prefix + "text_projection", None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = _text_config(vocab, hidden, positions, layers, intermediate, "gelu",
                          projection.shape[1] if with_projection else None, path)
    model = _empty(lambda: cls(config))
    # The converter splits the fused q/k/v projections at text_projection's width, or at the
    # width in `model.config` when there is none.
    weights = convert_open_clip_checkpoint(model, own, prefix=prefix)
    return _adopt(model, _fit_text_keys(model, weights), dtype, "text encoder", path)


def build_scheduler(original: dict, info: FamilyInfo):
    """Euler with the model's training noise schedule; samplers swap the class via from_config."""
    from diffusers import EulerDiscreteScheduler

    params = original["model"]["params"]
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=int(params.get("timesteps", 1000)),
        beta_start=float(params.get("linear_start", 0.00085)),
        beta_end=float(params.get("linear_end", 0.012)),
        beta_schedule="scaled_linear",  # LDM's "linear" schedule: linear in sqrt(beta)
        prediction_type=info.prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )
    # Carried in the config (as diffusers' own SD configs do) so a DDIM/PNDM made from it with
    # from_config gets SD's settings instead of their class defaults (clip_sample=True would clamp).
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return scheduler


def _build_low_res_scheduler(original: dict):
    from diffusers import DDPMScheduler

    low = (original["model"]["params"].get("low_scale_config") or {}).get("params") or {}
    noise = low.get("noise_schedule_config") or {}
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=float(noise.get("linear_start", 0.0001)),
        beta_end=float(noise.get("linear_end", 0.02)), beta_schedule="scaled_linear", clip_sample=True,
        prediction_type="epsilon", variance_type="fixed_small",
    ), int(low.get("max_noise_level", 350))


def build_text_encoders(state_dict: dict, family: Family, dtype: torch.dtype, path: Path) -> dict:
    """The family's text towers (`FamilyInfo.text_encoder_specs`) with their tokenizers, named as
    diffusers' pipelines expect: text_encoder/tokenizer, then text_encoder_2/tokenizer_2."""
    from engine.tokenizers import load_clip_tokenizer

    parts = {}
    for n, spec in enumerate(FAMILIES[family].text_encoder_specs):
        suffix = "" if n == 0 else f"_{n + 1}"
        if spec.tokenizer == "clip-l":
            encoder = build_clip_text_encoder(state_dict, spec.prefix, dtype, path)
        else:
            encoder = build_open_clip_text_encoder(state_dict, spec.prefix, dtype, path,
                                                   with_projection=spec.with_projection, penultimate=spec.penultimate)
        parts[f"text_encoder{suffix}"] = encoder
        parts[f"tokenizer{suffix}"] = load_clip_tokenizer(spec.tokenizer)
    return parts


def _pipeline_class(info: FamilyInfo):
    import diffusers

    return getattr(diffusers, info.pipeline)


def _load_single_file(path: Path, family: Family | None, dtype: torch.dtype, config_dir: Path | None):
    state_dict = read_state_dict(path)
    sidecar = read_sidecar(path)
    detected = detect_family({k: tuple(v.shape) for k, v in state_dict.items()}, path, sidecar)
    untested = needs_prediction_test(detected, sidecar)
    # A caller's family (from identify_model) settles SD 2.x eps vs v; without one, measure it.
    probe = family is None and untested
    if family is None:
        family = detected
    elif family is not detected and not (untested and family in (Family.SD2, Family.SD2_V)):
        raise UnknownCheckpointError(f"{path.name}: holds {FAMILIES[detected].label}, not {FAMILIES[family].label}")
    original = sidecar or read_ldm_yaml(shipped_config(family, config_dir))
    unet = build_unet(state_dict, original, FAMILIES[family], dtype, path)
    if probe:
        family = resolve_prediction(family, is_v_prediction(unet))
        unet.register_to_config(sample_size=FAMILIES[family].native_size // _vae_scale(original))
    info = FAMILIES[family]
    parts = {"unet": unet, "vae": build_vae(state_dict, original, info, dtype, path),
             "scheduler": build_scheduler(original, info), **build_text_encoders(state_dict, family, dtype, path)}
    if info.upscaler:
        parts["low_res_scheduler"], parts["max_noise_level"] = _build_low_res_scheduler(original)
    return _pipeline_class(info)(**parts, **dict(info.pipeline_extras))


def load_pipeline(path: Path, family: Family | None = None, torch_dtype: torch.dtype = torch.float32, *,
                  config_dir: Path | None = None):
    """A diffusers pipeline on the CPU from a single file or a diffusers folder, without network.

    `family`, when the caller already has it from `identify_model`, is checked against the weights
    and settles SD 2.x eps vs v without running the UNet probe a second time.
    """
    path = Path(path)
    if path.is_dir():
        info = FAMILIES[family or _identify_folder(path)]
        return _pipeline_class(info).from_pretrained(
            str(path), local_files_only=True, dtype=torch_dtype, **dict(info.pipeline_extras))
    if not path.is_file():
        raise UnknownCheckpointError(f"{path.name}: no such file")
    return _load_single_file(path, family, torch_dtype, config_dir)
