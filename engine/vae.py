"""VAE choice: decode (and encode) with a file from `models/VAE/` instead of the checkpoint's own
VAE, as A1111's "SD VAE" setting does.

A VAE file is read through the safe reader (`engine.safe_files`: nothing in it runs). Files in the
original LDM layout (`encoder.down.0.block.0...`, as vae-ft-mse-840000-ema-pruned and most
downloads are) are converted with diffusers' own converter (`convert_ldm_vae_checkpoint`, the code
behind `AutoencoderKL.from_single_file`); files already in diffusers' layout are taken as they are.
The new VAE gets the checkpoint's own VAE config, so every tensor must have the shape the
checkpoint's VAE has: a VAE of another architecture (SD3/Flux's 16 latent channels, the x4
upscaler's 3 levels) is refused by its shapes.

What shapes cannot tell: the SD 1.x/2.x VAE and the SDXL VAE have the same architecture and key
shapes; they differ in the latent scale they were trained for (scaling factor 0.18215 vs 0.13025)
and in fp16 behaviour (SDXL's overflows). SD 1.x and 2.x VAEs are the same kind and interchangeable.
So the kind of a VAE file is told, in this order, from a diffusers `config.json` beside it
(its scaling_factor), its safetensors metadata (`modelspec.architecture`), or its file name
(`sdxl`/`xl` in it, as sdxl_vae.safetensors and sdxl-vae-fp16-fix are named). A file that says
none of these is taken to be the SD kind, which is what almost every such file is; an SDXL VAE
renamed to say nothing cannot be told from its tensors and would give washed-out colours.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import compat  # noqa: F401 - torchvision shim before diffusers
from engine.errors import RequestError
from engine.families import Family
from engine.safe_files import read_tensors, weight_format

AUTOMATIC = "Automatic"  # the checkpoint's own VAE (A1111's name for it)
VAE_FOLDER = "VAE"
SD_SCALE, SDXL_SCALE = 0.18215, 0.13025
_XL_NAME = re.compile(r"(^|[^a-z0-9])(sdxl|xl)", re.IGNORECASE)


@dataclass(frozen=True)
class VaeFile:
    name: str   # relative to models/VAE with forward slashes: what the picker shows and infotexts record
    path: Path


def vae_files(library) -> list[VaeFile]:
    """The files in `models/VAE/` (scanned now), by the name users see."""
    return [VaeFile(e.name.removeprefix(VAE_FOLDER + "/"), e.path) for e in library.extra_entries("VAE")]


def vae_choices(library) -> list[str]:
    return [AUTOMATIC, *(f.name for f in vae_files(library))]


def resolve_vae(library, name: str | None) -> VaeFile | None:
    """The VAE file a user's name means (None: Automatic), looked up only among the files scanned
    in models/VAE, so a name can never reach outside it. Exact name, "VAE/<name>", or a unique
    file name / name without extension; RequestError naming `vae` otherwise."""
    wanted = str(name or AUTOMATIC).strip()
    if wanted.lower() in (AUTOMATIC.lower(), "none", ""):
        return None
    files = vae_files(library)
    for f in files:
        if wanted in (f.name, f"{VAE_FOLDER}/{f.name}"):
            return f
    matches = [f for f in files if wanted in (Path(f.name).name, Path(f.name).stem)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f.name for f in files) or f"none (put VAE files in {Path(library.models_dir) / VAE_FOLDER})"
    raise RequestError("vae", f"{wanted!r} is not a file in {Path(library.models_dir) / VAE_FOLDER}; "
                              f"choose {AUTOMATIC} or one of: {known}")


def checkpoint_vae_kind(family: Family) -> str:
    """'sdxl' or 'sd' (SD 1.x and 2.x share one VAE kind)."""
    return "sdxl" if family is Family.SDXL else "sd"


def vae_kind(file: VaeFile) -> tuple[str | None, str]:
    """('sdxl' | 'sd' | None, how it was told); None: the file does not say (see the module doc)."""
    config = file.path.parent / "config.json"
    if config.is_file():
        try:
            scale = json.loads(config.read_text(encoding="utf-8")).get("scaling_factor")
        except (OSError, ValueError, AttributeError):
            scale = None
        if isinstance(scale, (int, float)):
            kind = "sdxl" if abs(scale - SDXL_SCALE) < 1e-3 else "sd" if abs(scale - SD_SCALE) < 1e-3 else None
            if kind:
                return kind, f"its config.json's scaling_factor {scale}"
    if weight_format(file.path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file.path), framework="pt") as f:
                arch = str((f.metadata() or {}).get("modelspec.architecture", ""))
        except Exception:  # noqa: BLE001 - metadata is a hint; the tensors are read and checked later
            arch = ""
        if arch:
            return ("sdxl" if "xl" in arch.lower() else "sd"), f"its metadata's architecture {arch!r}"
    if _XL_NAME.search(Path(file.name).stem):
        return "sdxl", "its file name says XL"
    return None, ""


def check_vae_kind(file: VaeFile, family: Family, label: str) -> None:
    """Refuse a VAE that is known to belong to the other kind than the checkpoint's."""
    kind, why = vae_kind(file)
    wanted = checkpoint_vae_kind(family)
    if kind is not None and kind != wanted:
        names = {"sdxl": "an SDXL VAE", "sd": "an SD 1.x/2.x VAE"}
        raise RequestError("vae", f"{file.name} is {names[kind]} ({why}) and the checkpoint is {label}; "
                                  f"choose {names[wanted].removeprefix('an ')} or {AUTOMATIC}")


def _is_ldm_layout(keys) -> bool:
    return any(re.search(r"(^|\.)(encoder\.down\.\d+\.block|decoder\.up\.\d+\.block)\.", k) for k in keys)


def load_vae(file: VaeFile, like, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL with `like`'s config (the checkpoint's own VAE) and the file's weights, on
    the CPU. RequestError naming `vae` when the file is no VAE or does not fit `like`."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from engine.checkpoints import _adopt, _empty

    state = read_tensors(file.path)
    config = {k: v for k, v in dict(like.config).items() if not k.startswith("_")}
    if _is_ldm_layout(state):
        weights = convert_ldm_vae_checkpoint(state, config)
    elif any(k.startswith("encoder.down_blocks.") for k in state):
        weights = state
    else:
        raise RequestError("vae", f"{file.name} holds no VAE weights (no encoder/decoder blocks in either the "
                                  "original or the diffusers layout); is it a LoRA or a checkpoint?")
    expected = {k: tuple(v.shape) for k, v in like.state_dict().items()}
    latent = weights.get("decoder.conv_in.weight")
    if latent is not None and latent.shape[1] != config["latent_channels"]:
        raise RequestError("vae", f"{file.name} works with {latent.shape[1]} latent channels and this checkpoint's "
                                  f"VAE with {config['latent_channels']}: it belongs to another model family")
    missing = [k for k in expected if k not in weights]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != expected[k]]
    if missing or wrong:
        key = (wrong or missing)[0]
        detail = (f"{key} is {tuple(weights[key].shape)}, this checkpoint's VAE has {expected[key]}" if wrong
                  else f"{len(missing)} weights are missing, e.g. {key}")
        raise RequestError("vae", f"{file.name} does not fit this checkpoint's VAE ({detail})")
    return _adopt(_empty(lambda: AutoencoderKL.from_config(config)), {k: weights[k] for k in expected}, dtype,
                  "VAE", file.path)
