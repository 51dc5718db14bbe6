"""A1111's settings (GET/POST /sdapi/v1/options and a job's override_settings), as Easel keeps them.

`DEFAULTS` is the table of every key A1111's GET /options returns on a default install, with its
default (modules/shared_options.py, its hidden options, and the built-in Lora extension's), as
data. `Options` overlays Easel's real values for the keys it acts on (`ACTED_ON`) and stores every
other key in `<data_dir>/api-options.json` (written atomically, read at start), where it has no
effect (`NO_EFFECT_NOTE`).

- Values are checked as A1111's own settings loader does (`Options.same_type`): a value of the
  default's type, an int where a float is the default, or None; sliders within their range. A key
  A1111 does not know is refused (A1111's `opts.set` raises KeyError), naming it; so is anything
  else wrong, as HTTP 422 naming the key with what it takes.
- The API keys A1111 marks `restrict_api` (api_enable_requests, api_forbid_local_requests,
  api_useragent) are silently left as they are, as A1111 does.
- No torch here: everything goes through the Engine.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.atomic import write_atomic
from engine.errors import RequestError
from engine.request import FACE_RESTORERS

logger = logging.getLogger(__name__)

OPTIONS_FILE = "api-options.json"

# --- A1111's table: key -> default ------------------------------------------------------------------
_SAVING = {
    "samples_save": True, "samples_format": "png", "samples_filename_pattern": "", "save_images_add_number": True,
    "grid_save": True, "grid_format": "png", "grid_extended_filename": False, "grid_only_if_multiple": True,
    "grid_prevent_empty_spots": False, "grid_zip_filename_pattern": "", "n_rows": -1, "font": "",
    "grid_text_active_color": "#000000", "grid_text_inactive_color": "#999999",
    "grid_background_color": "#ffffff", "enable_pnginfo": True, "save_txt": False,
    "save_images_before_face_restoration": False, "save_images_before_highres_fix": False,
    "save_images_before_color_correction": False, "save_mask": False, "save_mask_composite": False,
    "jpeg_quality": 80, "webp_lossless": False, "export_for_4chan": True, "img_downscale_threshold": 4.0,
    "target_side_length": 4000, "img_max_size_mp": 200, "use_original_name_batch": True,
    "use_upscaler_name_as_suffix": False, "save_selected_only": True, "save_init_img": False, "temp_dir": "",
    "clean_temp_dir_at_start": False, "save_incomplete_images": False,
    "outdir_samples": "", "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images", "outdir_extras_samples": "outputs/extras-images",
    "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
    "outdir_save": "log/images", "outdir_init_images": "outputs/init-images",
    "save_to_dirs": True, "grid_save_to_dirs": True, "use_save_to_dirs_for_ui": False,
    "directories_filename_pattern": "[date]", "directories_max_prompt_words": 8,
}
_SYSTEM = {
    "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "upscaler_for_img2img": None, "face_restoration": False, "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5, "face_restoration_unload": False, "auto_launch_browser": "Local",
    "show_warnings": False, "show_gradio_deprecation_warnings": True, "memmon_poll_rate": 8,
    "samples_log_stdout": False, "multiple_tqdm": True, "print_hypernet_extra": False, "list_hidden_files": True,
    "disable_mmap_load_safetensors": False, "hide_ldm_prints": True, "api_enable_requests": True,
    "api_forbid_local_requests": True, "api_useragent": "", "unload_models_when_training": False,
    "pin_memory": False, "save_optimizer_state": False, "save_training_settings_to_txt": True,
    "dataset_filename_word_regex": "", "dataset_filename_join_string": " ", "training_image_repeats_per_epoch": 1,
    "training_write_csv_every": 500, "training_xattention_optimizations": False,
    "training_enable_tensorboard": False, "training_tensorboard_save_images": False,
    "training_tensorboard_flush_every": 120,
}
_SD = {
    "sd_model_checkpoint": None, "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0, "sd_unet": "Automatic", "enable_quantization": False, "enable_emphasis": True,
    "enable_batch_seeds": True, "comma_padding_backtrack": 20, "CLIP_stop_at_last_layers": 1, "upcast_attn": False,
    "randn_source": "GPU", "tiling": False, "sdxl_crop_top": 0, "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5, "sdxl_refiner_high_aesthetic_score": 6.0,
    "sd_vae_checkpoint_cache": 0, "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True,
    "auto_vae_precision": True, "sd_vae_encode_method": "Full", "sd_vae_decode_method": "Full",
    "inpainting_mask_weight": 1.0, "initial_noise_multiplier": 1.0, "img2img_extra_noise": 0.0,
    "img2img_color_correction": False, "img2img_fix_steps": False, "img2img_background_color": "#ffffff",
    "img2img_editor_height": 720, "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff", "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False, "return_mask_composite": False, "cross_attention_optimization": "Automatic",
    "s_min_uncond": 0.0, "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0, "pad_cond_uncond": False, "persistent_cond_cache": True,
    "batch_cond_uncond": True, "use_old_emphasis_implementation": False, "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False, "use_old_hires_fix_width_height": False,
    "dont_fix_second_order_samplers_schedule": False, "hires_fix_use_firstpass_conds": False,
    "use_old_scheduling": False,
}
_UI = {
    "interrogate_keep_models_in_memory": False, "interrogate_return_ranks": False, "interrogate_clip_num_beams": 1,
    "interrogate_clip_min_length": 24, "interrogate_clip_max_length": 48, "interrogate_clip_dict_limit": 1500,
    "interrogate_clip_skip_categories": [], "interrogate_deepbooru_score_threshold": 0.5,
    "deepbooru_sort_alpha": True, "deepbooru_use_spaces": True, "deepbooru_escape": True, "deepbooru_filter_tags": "",
    "extra_networks_show_hidden_directories": True, "extra_networks_hidden_models": "When searched",
    "extra_networks_default_multiplier": 1.0, "extra_networks_card_width": 0, "extra_networks_card_height": 0,
    "extra_networks_card_text_scale": 1.0, "extra_networks_card_show_desc": True,
    "extra_networks_add_text_separator": " ", "ui_extra_networks_tab_reorder": "",
    "textual_inversion_print_at_load": False, "textual_inversion_add_hashes_to_infotext": True,
    "sd_hypernetwork": "None", "localization": "None", "gradio_theme": "Default", "gradio_themes_cache": True,
    "gallery_height": "", "return_grid": True, "do_not_show_images": False, "send_seed": True, "send_size": True,
    "js_modal_lightbox": True, "js_modal_lightbox_initially_zoomed": True, "js_modal_lightbox_gamepad": False,
    "js_modal_lightbox_gamepad_repeat": 250, "show_progress_in_title": True, "samplers_in_dropdown": True,
    "dimensions_and_batch_together": True, "keyedit_precision_attention": 0.1, "keyedit_precision_extra": 0.05,
    "keyedit_delimiters": ".,\\/!?%^*;:{}=`~()", "keyedit_move": True, "quicksettings_list": ["sd_model_checkpoint"],
    "ui_tab_order": [], "hidden_tabs": [], "ui_reorder_list": [], "hires_fix_show_sampler": False,
    "hires_fix_show_prompts": False, "disable_token_counters": False, "add_model_hash_to_info": True,
    "add_model_name_to_info": True, "add_user_name_to_info": False, "add_version_to_infotext": True,
    "disable_weights_auto_swap": True, "infotext_styles": "Apply if any", "show_progressbar": True,
    "live_previews_enable": True, "live_previews_image_format": "png", "show_progress_grid": True,
    "show_progress_every_n_steps": 10, "show_progress_type": "Approx NN", "live_preview_allow_lowvram_full": False,
    "live_preview_content": "Prompt", "live_preview_refresh_period": 1000, "live_preview_fast_interrupt": False,
}
_SAMPLING = {
    "hide_samplers": [], "eta_ddim": 0.0, "eta_ancestral": 1.0, "ddim_discretize": "uniform", "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "k_sched_type": "Automatic", "sigma_min": 0.0, "sigma_max": 0.0,
    "rho": 0.0, "eta_noise_seed_delta": 0, "always_discard_next_to_last_sigma": False, "uni_pc_variant": "bh1",
    "uni_pc_skip_type": "time_uniform", "uni_pc_order": 3, "uni_pc_lower_order_final": True,
    "postprocessing_enable_in_main_ui": [], "postprocessing_operation_order": [], "upscaling_max_images_in_cache": 5,
    "disabled_extensions": [], "disable_all_extensions": "none", "restore_config_state_file": "",
    "sd_checkpoint_hash": "",
    # extensions-builtin/Lora, on every default install
    "sd_lora": "None", "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True,
    "lora_show_all": False, "lora_hide_unknown_for_versions": [], "lora_in_memory_limit": 0, "lora_functional": False,
}
DEFAULTS: dict[str, Any] = {**_SAVING, **_SYSTEM, **_SD, **_UI, **_SAMPLING}

# A1111's sliders: the range a value must be in.
RANGES: dict[str, tuple[float, float]] = {
    "n_rows": (-1, 16), "jpeg_quality": (1, 100), "directories_max_prompt_words": (1, 20), "ESRGAN_tile": (0, 512),
    "ESRGAN_tile_overlap": (0, 48), "code_former_weight": (0, 1), "memmon_poll_rate": (0, 40),
    "sd_checkpoints_limit": (1, 10), "sd_checkpoint_cache": (0, 10), "comma_padding_backtrack": (0, 74),
    "CLIP_stop_at_last_layers": (1, 12), "sd_vae_checkpoint_cache": (0, 10), "inpainting_mask_weight": (0, 1),
    "initial_noise_multiplier": (0, 1.5), "img2img_extra_noise": (0, 1), "img2img_editor_height": (80, 1600),
    "s_min_uncond": (0, 15), "token_merging_ratio": (0, 0.9), "token_merging_ratio_img2img": (0, 0.9),
    "token_merging_ratio_hr": (0, 0.9), "interrogate_clip_num_beams": (1, 16), "interrogate_clip_min_length": (1, 128),
    "interrogate_clip_max_length": (1, 256), "interrogate_deepbooru_score_threshold": (0, 1),
    "extra_networks_default_multiplier": (0, 2), "extra_networks_card_text_scale": (0, 2),
    "keyedit_precision_attention": (0.01, 0.2), "keyedit_precision_extra": (0.01, 0.2),
    "show_progress_every_n_steps": (-1, 32), "eta_ddim": (0, 1), "eta_ancestral": (0, 1), "s_churn": (0, 100),
    "s_tmin": (0, 10), "s_tmax": (0, 999), "s_noise": (0, 1.1), "uni_pc_order": (1, 50),
    "upscaling_max_images_in_cache": (0, 10),
}
RESTRICT_API = frozenset({"api_enable_requests", "api_forbid_local_requests", "api_useragent"})

# --- what Easel does with them ----------------------------------------------------------------------
OUTDIRS = {"outdir_samples": None, "outdir_txt2img_samples": "txt2img", "outdir_img2img_samples": "img2img"}
ACTED_ON = frozenset({"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "samples_save", "samples_format",
                      "face_restoration_model", "code_former_weight", *OUTDIRS})
# Kept by the engine already (per checkpoint) or a view of its state: not written to api-options.json.
NOT_STORED = frozenset({"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", *OUTDIRS})
FORMATS = ("png",)  # Easel saves PNG only (engine/outputs.py)
NO_EFFECT_NOTE = (
    "Easel acts on these A1111 options: sd_model_checkpoint (loads it), sd_vae (the VAE remembered for the current "
    "checkpoint), CLIP_stop_at_last_layers (the CLIP skip remembered for the current checkpoint), samples_save "
    "(False: API jobs save nothing even with save_images), samples_format (png only), face_restoration_model "
    "(GFPGAN or CodeFormer: the one restore_faces uses, when its model is on disk) and code_former_weight, and outdir_samples / "
    "outdir_txt2img_samples / outdir_img2img_samples (a read-only view of Easel's output folders). Every other key, "
    "jpeg_quality, enable_pnginfo, eta_ddim, eta_ancestral and eta_noise_seed_delta included, is checked, stored in "
    f"<data_dir>/{OPTIONS_FILE} and returned by GET /options, and has no effect on Easel's jobs.")


def _kind(value: Any) -> type:
    return float if type(value) is int else type(value)  # A1111's Options.typemap: an int counts as a float


def check(key: str, value: Any) -> Any:
    """`value` for A1111 option `key`, or RequestError naming the key with what it takes."""
    if key not in DEFAULTS:
        raise RequestError(key, "is not an A1111 option (GET /sdapi/v1/options lists them)")
    default = DEFAULTS[key]
    if value is None or default is None:
        return value  # A1111's same_type: None goes with anything
    if _kind(value) is not _kind(default):
        raise RequestError(key, f"must be {_describe(key, default)}, got {value!r}")
    if key in RANGES and not RANGES[key][0] <= value <= RANGES[key][1]:
        raise RequestError(key, f"must be {_describe(key, default)}, got {value!r}")
    return value


def _describe(key: str, default: Any) -> str:
    names = {bool: "true or false", str: "text", list: "a list", float: "a number", dict: "an object"}
    what = names.get(_kind(default), type(default).__name__)
    if key in RANGES:
        low, high = RANGES[key]
        what += f" from {low} to {high}"
    return what


class OptionStore:
    """The A1111 options a client set, in a JSON file (atomic writes); a bad file reads as empty."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, Any] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable (%s); A1111 options start from their defaults", self.path, e)
            loaded = {}
        if isinstance(loaded, dict):
            self.data = {k: v for k, v in loaded.items() if k in DEFAULTS and k not in NOT_STORED}

    def get(self, key: str) -> Any:
        return self.data.get(key, DEFAULTS[key])

    def values(self) -> dict[str, Any]:
        return {**DEFAULTS, **self.data}

    def update(self, values: dict[str, Any]) -> None:
        values = {k: v for k, v in values.items() if k not in NOT_STORED}
        if values:
            self.data.update(values)
            write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True))


class Options:
    """The API's A1111 options on `engine`; `choice` is the API's ModelChoice (the current checkpoint)."""

    def __init__(self, engine, choice):
        self.engine = engine
        self.choice = choice
        self.store = OptionStore(Path(engine.config.data_dir) / OPTIONS_FILE)
        self._noted: set[str] = set()

    def outdirs(self) -> dict[str, str]:
        outdir = Path(self.engine.outputs.outdir)
        return {key: str(outdir / mode if mode else outdir) for key, mode in OUTDIRS.items()}

    def values(self) -> dict[str, Any]:
        """GET /options: every A1111 key, Easel's real values for those it acts on."""
        values = self.store.values()
        model = self.choice.current()
        values.update(self.outdirs())
        values["sd_model_checkpoint"] = self.choice.title(model)
        values["sd_vae"] = self.engine.model_vae(model) if model else DEFAULTS["sd_vae"]
        values["CLIP_stop_at_last_layers"] = self.engine.model_clip_skip(model) if model else 1
        return values

    def checked(self, key: str, value: Any, model: str | None) -> Any:
        """`value` checked for `key`, also against what Easel can do for the keys it acts on."""
        value = check(key, value)
        if key == "sd_model_checkpoint" and not isinstance(value, str):
            raise RequestError(key, f"must be a checkpoint name (GET /sdapi/v1/sd-models), got {value!r}")
        if key == "sd_vae":
            if not isinstance(value, str) or self.engine.find_vae(value) is None:
                raise RequestError(key, f"must be Automatic, None or a file name from models/VAE "
                                        f"({', '.join(self.engine.vae_names())}), got {value!r}")
            if not model:
                raise RequestError(key, "there is no checkpoint to remember a VAE for")
        if key == "CLIP_stop_at_last_layers":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise RequestError(key, f"must be a whole number from 1 to 12, got {value!r}")
        if key == "samples_format" and value not in FORMATS:
            raise RequestError(key, f"Easel saves only {', '.join(FORMATS)}, got {value!r}")
        if key == "face_restoration_model" and value not in FACE_RESTORERS:
            raise RequestError(key, f"must be one of {', '.join(FACE_RESTORERS)}, got {value!r}")
        if key == "samples_save" and not isinstance(value, bool):
            raise RequestError(key, f"must be true or false, got {value!r}")
        if key in OUTDIRS and value != self.outdirs()[key]:
            raise RequestError(key, f"is Easel's output folder, set when it starts (--outdir): only its current "
                                    f"value {self.outdirs()[key]!r} is taken, got {value!r}")
        return value

    def apply(self, body: Any) -> None:
        """POST /options: all keys checked first (nothing changes when one is refused), then acted on."""
        if not isinstance(body, dict):
            raise RequestError("body", "must be an object of A1111 option: value")
        name = body.get("sd_model_checkpoint")
        model = self.engine.library.resolve(name).name if isinstance(name, str) else self.choice.current()
        values = {k: self.checked(k, v, model) for k, v in body.items() if k not in RESTRICT_API}
        if values.get("sd_model_checkpoint") is not None:
            self.engine.load_model(model)
            self.choice.name = model
        self.keep(values, model)

    def keep(self, values: dict[str, Any], model: str | None) -> None:
        """Make checked values the current ones: per-checkpoint ones for `model`, the rest stored."""
        if "sd_vae" in values:
            self.engine.set_model_vae(model, values["sd_vae"])
        if values.get("CLIP_stop_at_last_layers") is not None:
            self.engine.set_model_clip_skip(model, values["CLIP_stop_at_last_layers"])
        self.store.update(values)
        quiet = sorted(set(values) - ACTED_ON - self._noted)
        if quiet:
            self._noted.update(quiet)
            logger.info("A1111 options stored with no effect on Easel: %s", ", ".join(quiet))

    def job_fields(self, overrides: Any, model: str | None) -> tuple[dict[str, Any], dict[str, str], list[str], dict]:
        """override_settings for one job: the request fields they set, request field -> the key it
        came from, the keys Easel ignores, and the checked values (to keep when not restored)."""
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise RequestError("override_settings", "must be an object of A1111 option: value")
        fields: dict[str, Any] = {}
        sources: dict[str, str] = {}
        ignored: list[str] = []
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key == "sd_model_checkpoint" or key in RESTRICT_API:
                continue  # the model: Api.model_override
            if key not in ACTED_ON or key in OUTDIRS:
                ignored.append(f"override_settings.{key}")
                if key in DEFAULTS:
                    check_as(f"override_settings.{key}", key, value)
                continue
            values[key] = checked_as(f"override_settings.{key}", lambda: self.checked(key, value, model))
        if "sd_vae" in values:
            fields["vae"], sources["vae"] = values["sd_vae"], "override_settings.sd_vae"
        if values.get("CLIP_stop_at_last_layers") is not None:
            fields["clip_skip"] = values["CLIP_stop_at_last_layers"]
            sources["clip_skip"] = "override_settings.CLIP_stop_at_last_layers"
        fields.update(self.face_fields(values))
        return fields, sources, sorted(ignored), values

    def face_fields(self, values: dict[str, Any]) -> dict[str, Any]:
        """restore_faces' restorer and CodeFormer weight from the job's overrides, else the stored
        options. The restorer is a preference: A1111's default (CodeFormer) or a stored name whose
        model is not on disk leaves the choice to the engine (the first on disk), since A1111 would
        download the missing one and clients post /options back whole."""
        restorer = values.get("face_restoration_model", self.store.data.get("face_restoration_model"))
        fields = {"codeformer_weight": values.get("code_former_weight", self.store.get("code_former_weight"))}
        if restorer in self.engine.face_restorer_names():
            fields["face_restorer"] = restorer
        return fields

    def samples_save(self, values: dict[str, Any]) -> bool:
        """Whether this job may save at all (A1111: samples_save and the body's save_images)."""
        return values.get("samples_save", self.store.get("samples_save")) is not False


def checked_as(field: str, checking) -> Any:
    """checking(), its refusal naming `field` (override_settings.KEY) instead of KEY."""
    try:
        return checking()
    except RequestError as e:
        message = str(e)
        message = message[len(e.field) + 2:] if message.startswith(f"{e.field}: ") else message
        raise RequestError(field, message) from None


def check_as(field: str, key: str, value: Any) -> Any:
    return checked_as(field, lambda: check(key, value))
