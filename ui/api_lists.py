"""A1111's list endpoints (sd-vae, loras, embeddings, prompt-styles, cmd-flags, memory, ...) in its
response shapes, for `ui.api.Api` (a base class of it: the routes are rows of `Api.ROUTES`).

- Everything is read from the models folder as it is now: every list is scanned when asked, so
  the refresh-* routes have nothing to rescan and answer null, as A1111's do.
- File paths are relative to the models folder ("VAE/x.safetensors", "Lora/y.safetensors"), as
  sd-models' are: no server paths to whoever calls the API.
- Weight files are read only through `engine.safe_files` (a safetensors header, the restricted
  unpickler): nothing in a file runs. No torch here: the engine's objects do the reading.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from engine.errors import EaselError
from engine.faces import RESTORERS
from engine.request import HIRES_UPSCALERS
from engine.safe_files import inspect_weights, read_metadata
from engine.styles import STYLES_FILE  # the data folder's styles.csv, the one the page reads

logger = logging.getLogger(__name__)

# A text encoder's input width by its tokenizer and projection (engine.families' specs): what an
# embedding's vectors must be as wide as.
ENCODER_WIDTHS = {("clip-l", False): 768, ("open-clip", False): 1024, ("open-clip", True): 1280}
_SCALE = re.compile(r"(?<![0-9a-z])(?:x([1-8])|([1-8])x)(?![0-9])", re.IGNORECASE)  # x2plus, 4x-UltraSharp


# --- response shapes (A1111's modules/api/models.py) ----------------------------------------------
class SdVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):  # A1111's Lora extension (extensions-builtin/Lora)
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None


class LatentUpscalerModeItem(BaseModel):
    name: str


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class HypernetworkItem(BaseModel):
    name: str
    path: str | None


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


# --- A1111's command-line flags ---------------------------------------------------------------------
# Every flag of A1111's modules/cmd_args.py (and the Lora extension's), at A1111's default; the
# ones Easel has an equivalent of are set from it in `cmd_flags`. Default paths are given relative
# to the webui folder, as they are laid out there.
A1111_FLAGS: dict[str, Any] = {
    "f": False, "update_all_extensions": False, "skip_python_version_check": False, "skip_torch_cuda_test": False,
    "reinstall_xformers": False, "reinstall_torch": False, "update_check": False, "test_server": False,
    "log_startup": False, "skip_prepare_environment": False, "skip_install": False, "dump_sysinfo": False,
    "loglevel": None, "do_not_download_clip": False, "data_dir": ".", "models_dir": None, "config": None,
    "ckpt": None, "ckpt_dir": None, "vae_dir": None, "gfpgan_dir": "./GFPGAN", "gfpgan_model": None,
    "no_half": False, "no_half_vae": False, "no_progressbar_hiding": False, "max_batch_count": 16,
    "embeddings_dir": "embeddings", "textual_inversion_templates_dir": "textual_inversion_templates",
    "hypernetwork_dir": "models/hypernetworks", "localizations_dir": "localizations", "allow_code": False,
    "medvram": False, "medvram_sdxl": False, "lowvram": False, "lowram": False, "always_batch_cond_uncond": False,
    "unload_gfpgan": False, "precision": "autocast", "upcast_sampling": False, "share": False, "ngrok": None,
    "ngrok_region": "", "ngrok_options": {}, "enable_insecure_extension_access": False,
    "codeformer_models_path": "models/Codeformer", "gfpgan_models_path": "models/GFPGAN",
    "esrgan_models_path": "models/ESRGAN", "bsrgan_models_path": "models/BSRGAN",
    "realesrgan_models_path": "models/RealESRGAN", "dat_models_path": "models/DAT", "clip_models_path": None,
    "xformers": False, "force_enable_xformers": False, "xformers_flash_attention": False, "deepdanbooru": False,
    "opt_split_attention": False, "opt_sub_quad_attention": False, "sub_quad_q_chunk_size": 1024,
    "sub_quad_kv_chunk_size": None, "sub_quad_chunk_threshold": None, "opt_split_attention_invokeai": False,
    "opt_split_attention_v1": False, "opt_sdp_attention": False, "opt_sdp_no_mem_attention": False,
    "disable_opt_split_attention": False, "disable_nan_check": False, "use_cpu": [], "use_ipex": False,
    "disable_model_loading_ram_optimization": False, "listen": False, "port": None, "show_negative_prompt": False,
    "ui_config_file": "ui-config.json", "hide_ui_dir_config": False, "freeze_settings": False,
    "freeze_settings_in_sections": None, "freeze_specific_settings": None, "ui_settings_file": "config.json",
    "gradio_debug": False, "gradio_auth": None, "gradio_auth_path": None, "gradio_img2img_tool": None,
    "gradio_inpaint_tool": None, "gradio_allowed_path": [], "opt_channelslast": False,
    "styles_file": [STYLES_FILE], "autolaunch": False, "theme": None, "use_textbox_seed": False,
    "disable_console_progressbars": False, "enable_console_prompts": False, "vae_path": None,
    "disable_safe_unpickle": False, "api": True, "api_auth": None, "api_log": False, "nowebui": False,
    "ui_debug_mode": False, "device_id": None, "administrator": False, "cors_allow_origins": None,
    "cors_allow_origins_regex": None, "tls_keyfile": None, "tls_certfile": None, "disable_tls_verify": None,
    "server_name": None, "gradio_queue": True, "no_gradio_queue": False, "skip_version_check": False,
    "no_hashing": False, "no_download_sd_model": False, "subpath": None, "add_stop_route": False,
    "api_server_stop": False, "timeout_keep_alive": 30, "disable_all_extensions": False,
    "disable_extra_extensions": False, "skip_load_model_at_start": False, "unix_filenames_sanitization": False,
    "filenames_max_length": 128, "no_prompt_history": False,
    "lora_dir": "models/Lora", "lyco_dir_backcompat": "models/LyCORIS",
}


class ListRoutes:
    """The list endpoints, as methods of `ui.api.Api` (which has `engine` and `choice`)."""

    engine: Any
    choice: Any

    # --- models on disk ---
    def sd_vae(self):
        """The files in models/VAE, by the name the VAE picker (and `sd_vae`) takes."""
        names = self.engine.vae_names()[1:]  # [0] is "Automatic", the checkpoint's own
        return [{"model_name": name, "filename": f"VAE/{name}"} for name in names]

    def loras(self):
        """models/Lora and models/LyCORIS; the first file of a name wins, as <lora:NAME> takes it.
        alias: the name it was trained under (ss_output_name), as A1111 shows it."""
        rows, seen = [], set()
        for entry in self.engine.library.extra_entries("LoRA"):
            name = PurePosixPath(entry.name).name.rsplit(".", 1)[0]
            if name in seen or not entry.path.is_file():
                continue
            seen.add(name)
            try:
                metadata = read_metadata(entry.path)
            except EaselError as e:  # an unreadable file says why when a prompt uses it
                logger.warning("loras: %s", e)
                metadata = {}
            rows.append({"name": name, "alias": metadata.get("ss_output_name") or name, "path": entry.name,
                         "metadata": metadata})
        return rows

    def embeddings(self):
        """Each readable embedding, under "loaded" when its widths fit the current model's text
        encoders and "skipped" otherwise (A1111's split). The current model is the one the next
        job would use; when it is not loaded its widths come from its family (headers only: no
        load for a listing). With no checkpoint at all, nothing fits: every embedding is skipped.
        step and sd_checkpoint(_name) are A1111's training notes, which only unpickling a .pt
        would tell: None, as A1111 gives for files that lack them."""
        widths = self._encoder_widths()
        loaded, skipped = {}, {}
        for entry in self.engine.library.extra_entries("Embeddings"):
            name = PurePosixPath(entry.name).name.rsplit(".", 1)[0]
            parts = embedding_parts(entry.path) if name not in loaded else None  # the first that fits wins
            if parts is None:
                continue
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": sum(p[1] for p in parts), "vectors": parts[0][0]}
            if widths is not None and tuple(p[1] for p in parts) == widths:
                loaded[name] = item
                skipped.pop(name, None)
            else:
                skipped.setdefault(name, item)
        return {"loaded": loaded, "skipped": skipped}

    def _encoder_widths(self) -> tuple[int, ...] | None:
        current = self.engine.manager.current
        name = self.choice.current() or (current.entry.name if current else None)
        if name is None:
            names = self.engine.model_names()
            name = names[0] if names else None
        if current is not None and current.entry.name == name:
            return tuple(int(e.get_input_embeddings().weight.shape[1]) for e in current.encoder.text_encoders)
        if name is None:
            return None
        try:
            specs = self.engine.model_facts(name).info.text_encoder_specs
        except Exception:  # noqa: BLE001 - a checkpoint that cannot be identified fits nothing; the list still answers
            return None
        widths = tuple(ENCODER_WIDTHS.get((s.tokenizer, s.with_projection)) for s in specs)
        return widths if widths and None not in widths else None

    def realesrgan_models(self):
        """The upscaler files in models/RealESRGAN, by the name extras and hires fix take. Their scale
        is read from the name ("x2", "4x"; 4 otherwise): knowing it for sure means building the model."""
        rows = []
        for upscaler in self.engine.upscalers.available():
            if upscaler.path is None or upscaler.sd_x4:
                continue
            relative = upscaler.path.relative_to(self.engine.library.models_dir).as_posix()
            if relative.split("/", 1)[0] == "RealESRGAN":
                rows.append({"name": upscaler.name, "path": relative, "scale": name_scale(upscaler.path.stem)})
        return rows

    def latent_upscale_modes(self):
        """The latent modes hires fix runs (engine.request's HIRES_UPSCALERS)."""
        return [{"name": name} for name in HIRES_UPSCALERS if name.lower().startswith("latent")]

    def face_restorers(self):
        """The restorers restore_faces can use: those with a model file on disk (engine.faces),
        each with the folder it was found in."""
        models = self.engine.library.models_dir
        return [{"name": name, "cmd_dir": str(models / RESTORERS[name][0])} for name in self.engine.face_restorer_names()]

    def hypernetworks(self):
        return []  # Easel runs no hypernetworks

    def refresh_list(self):
        """refresh-vae, refresh-loras, refresh-embeddings: the lists are scanned when asked."""
        return None

    # --- settings and the server ---
    def prompt_styles(self):
        return self.engine.styles()  # data/styles.csv, read as the page reads it (engine.styles)

    def cmd_flags(self, request: Request):
        """A1111's flags, with Easel's values where it has the same setting. Logins (gradio_auth,
        api_auth) are never shown: A1111 hands them to any caller."""
        config = self.engine.config
        models = Path(config.models_dir)
        host, port = (request.scope.get("server") or (None, None))[:2]
        flags = dict(A1111_FLAGS)
        flags.update({
            "data_dir": ".", "models_dir": models.name, "ckpt_dir": f"{models.name}/Stable-diffusion",
            "vae_dir": f"{models.name}/VAE", "lora_dir": f"{models.name}/Lora",
            "lyco_dir_backcompat": f"{models.name}/LyCORIS", "embeddings_dir": "embeddings",
            "esrgan_models_path": f"{models.name}/ESRGAN", "realesrgan_models_path": f"{models.name}/RealESRGAN",
            "gfpgan_models_path": f"{models.name}/GFPGAN", "codeformer_models_path": f"{models.name}/Codeformer",
            "no_half": config.precision == "fp32", "precision": "full" if config.precision == "fp32" else "autocast",
            "use_cpu": ["all"] if config.device == "cpu" else [],
            # The address this request came in on (the server's --listen is not handed to the API):
            # a loopback one reads as not listening on the network.
            "listen": host is not None and host not in ("127.0.0.1", "::1", "localhost"),
            "port": port, "api": True, "nowebui": False, "disable_safe_unpickle": False,
        })
        return flags

    def memory(self):
        try:
            cuda = self.engine.cuda_memory() or {"error": "unavailable"}  # A1111's words without CUDA
        except Exception as e:  # noqa: BLE001 - a driver's error is this part's answer, as in A1111
            cuda = {"error": f"{type(e).__name__}: {e}"}
        return {"ram": ram_memory(), "cuda": cuda}

    async def ping(self):
        return {}


# --- reading ----------------------------------------------------------------------------------------
def embedding_parts(path: Path) -> list[tuple[int, int]] | None:
    """(vectors, width) of each part of an embedding file, by its shapes alone (the rules of
    engine.embeddings.read_embedding): one tensor, or A1111's string_to_param, or SDXL's clip_l and
    clip_g; None for anything else."""
    info = inspect_weights(path)
    if not info.ok:
        return None
    shapes = info.shapes
    params = {k: s for k, s in shapes.items() if k.startswith("string_to_param.")}
    shapes = params or shapes
    if "clip_l" in shapes and "clip_g" in shapes:
        parts = [shapes["clip_l"], shapes["clip_g"]]
    elif len(shapes) == 1:
        parts = list(shapes.values())
    else:
        return None
    parts = [(1, s[0]) if len(s) == 1 else s for s in parts]
    if any(len(p) != 2 or p[0] < 1 for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    return [(int(p[0]), int(p[1])) for p in parts]


def name_scale(stem: str) -> int:
    found = _SCALE.search(stem)
    return int(found.group(1) or found.group(2)) if found else 4


def ram_memory() -> dict:
    """A1111's ram part: this process's resident memory as used, the machine's total, their difference
    as free (only a process's RSS is the same on every system)."""
    try:
        import psutil

        used, total = psutil.Process(os.getpid()).memory_info().rss, psutil.virtual_memory().total
    except Exception as e:  # noqa: BLE001 - psutil missing or refused: A1111 answers the error
        return {"error": f"{type(e).__name__}: {e}"}
    return {"free": total - used, "used": used, "total": total}
