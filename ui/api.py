"""The HTTP API under /sdapi/v1, shaped like AUTOMATIC1111's so its clients work unchanged.

Same paths, field names, defaults and response shapes as A1111 (../shared/reference/a1111-compat.md);
`create_api(engine, ...)` builds a FastAPI router that `ui/server.py` mounts beside the page, behind
the same request guard. No torch: everything goes through the Engine object handed in.

- The body models document A1111's fields (the OpenAPI page lists them), but their values are not
  checked by pydantic: they are mapped to request fields by name and validated once, by
  `Engine.make_request`, like the page's and the CLI's. A refusal is HTTP 422 in FastAPI's shape,
  `{"detail": [{"loc": ["body", FIELD], "msg": "FIELD: ...", "type": "value_error"}]}`, naming the
  A1111 field (n_iter, not batch_count).
- Fields Easel has no use for (scripts, alwayson_scripts, ...) are accepted; those
  set to something other than their default are listed in the response's info as "ignored".
- img2img with a `mask` inpaints (engine.inpaint), its fields by A1111's names and numbers;
  txt2img's `hr_resize_x` / `hr_resize_y` become the hires fix's scale (`hires_resize_scale`).
- `skip` (A1111: skip the current image of a batch) stops an API job like `interrupt`: Easel's
  jobs have no per-image skip.
- The list endpoints (sd-vae, loras, embeddings, prompt-styles, cmd-flags, memory, ...) are in
  `ui/api_lists.py`, a base class of `Api`; their routes are rows of `Api.ROUTES` like the others.
- Jobs take their turn on the device with the page's (Engine.turns: first come, first served).
- Credentials: HTTP Basic, any --auth/--auth-file login or an --api-auth one, when there is any;
  wrong passwords count toward the guard's per-address login limit.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import math
import secrets
import threading
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, SkipValidation

from engine.errors import CancelledError, EaselError, ModelNotFoundError, RequestError
from engine.images import decode_base64_image
from engine.infotext import parse_infotext, printable, write_png_with_infotext
from engine.jobs import Job
from engine.request import LIMITS, a1111_count
from engine.samplers import SAMPLERS, SCHEDULES, schedule_label
from ui import api_lists as lists
from ui.api_controlnet import ControlNetRoutes, DetectRequest, api_field, controlnet_units, script_key
from ui.api_options import Options
from ui.progress import preview_every

logger = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
NO_UPSCALER = "None"  # A1111's "None" upscaler: a plain resize, which is Lanczos
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}  # A1111's numbers


def scheduler_label(value: Any) -> Any:
    """A1111 takes a scheduler by name ("karras"), label ("Karras") or alias; the engine by label."""
    if value is None or value == "":
        return "Automatic"
    if not isinstance(value, str):
        return value  # the request's validation names it
    return schedule_label(value) or value


# --- request bodies --------------------------------------------------------------------------------
# SkipValidation: the type is for the OpenAPI document; the engine checks the value (see above).
Raw = SkipValidation


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _GenerationBody(_Body):
    """The fields txt2img and img2img share, with A1111's defaults."""
    prompt: Annotated[str, Raw] = ""
    negative_prompt: Annotated[str, Raw] = ""
    styles: Annotated[list[str] | None, Raw] = None
    seed: Annotated[int, Raw] = -1
    subseed: Annotated[int, Raw] = -1
    subseed_strength: Annotated[float, Raw] = 0
    seed_resize_from_h: Annotated[int, Raw] = -1
    seed_resize_from_w: Annotated[int, Raw] = -1
    sampler_name: Annotated[str | None, Raw] = None
    sampler_index: Annotated[str, Raw] = "Euler"  # used when sampler_name is not given, as A1111 does
    scheduler: Annotated[str | None, Raw] = None
    batch_size: Annotated[int, Raw] = 1
    n_iter: Annotated[int, Raw] = 1
    steps: Annotated[int, Raw] = 50
    cfg_scale: Annotated[float, Raw] = 7.0
    width: Annotated[int, Raw] = 512
    height: Annotated[int, Raw] = 512
    restore_faces: Annotated[bool | None, Raw] = None
    tiling: Annotated[bool | None, Raw] = None
    do_not_save_samples: Annotated[bool, Raw] = False
    do_not_save_grid: Annotated[bool, Raw] = False
    eta: Annotated[float | None, Raw] = None
    s_min_uncond: Annotated[float | None, Raw] = None
    s_churn: Annotated[float | None, Raw] = None
    s_tmax: Annotated[float | None, Raw] = None
    s_tmin: Annotated[float | None, Raw] = None
    s_noise: Annotated[float | None, Raw] = None
    override_settings: Annotated[dict[str, Any] | None, Raw] = None
    override_settings_restore_afterwards: Annotated[bool, Raw] = True
    refiner_checkpoint: Annotated[str | None, Raw] = None
    refiner_switch_at: Annotated[float | None, Raw] = None
    disable_extra_networks: Annotated[bool, Raw] = False
    comments: Annotated[dict[str, Any] | None, Raw] = None
    script_name: Annotated[str | None, Raw] = None
    script_args: Annotated[list, Raw] = []
    send_images: Annotated[bool, Raw] = True
    save_images: Annotated[bool, Raw] = False
    alwayson_scripts: Annotated[dict[str, Any], Raw] = {}
    infotext: Annotated[str | None, Raw] = None
    force_task_id: Annotated[str | None, Raw] = None
    speed: Annotated[str, Raw] = "exact"  # Easel's own: "fast" reuses UNet features between steps


class Txt2ImgRequest(_GenerationBody):
    denoising_strength: Annotated[float | None, Raw] = 0.75
    firstpass_image: Annotated[str | None, Raw] = None
    # Hires fix
    enable_hr: Annotated[bool, Raw] = False
    firstphase_width: Annotated[int, Raw] = 0
    firstphase_height: Annotated[int, Raw] = 0
    hr_scale: Annotated[float, Raw] = 2.0
    hr_upscaler: Annotated[str | None, Raw] = None
    hr_second_pass_steps: Annotated[int, Raw] = 0
    hr_resize_x: Annotated[int, Raw] = 0
    hr_resize_y: Annotated[int, Raw] = 0
    hr_checkpoint_name: Annotated[str | None, Raw] = None
    hr_sampler_name: Annotated[str | None, Raw] = None
    hr_scheduler: Annotated[str | None, Raw] = None
    hr_prompt: Annotated[str, Raw] = ""
    hr_negative_prompt: Annotated[str, Raw] = ""


class Img2ImgRequest(_GenerationBody):
    init_images: Annotated[list[str] | None, Raw] = None  # base64, a data: URL prefix allowed
    resize_mode: Annotated[int, Raw] = 0
    denoising_strength: Annotated[float, Raw] = 0.75
    image_cfg_scale: Annotated[float | None, Raw] = None
    mask: Annotated[str | None, Raw] = None
    mask_blur: Annotated[int | None, Raw] = None
    mask_blur_x: Annotated[int, Raw] = 4
    mask_blur_y: Annotated[int, Raw] = 4
    inpainting_fill: Annotated[int, Raw] = 0
    inpaint_full_res: Annotated[bool, Raw] = True
    inpaint_full_res_padding: Annotated[int, Raw] = 0
    inpainting_mask_invert: Annotated[int, Raw] = 0
    initial_noise_multiplier: Annotated[float | None, Raw] = None
    latent_mask: Annotated[str | None, Raw] = None
    include_init_images: Annotated[bool, Raw] = False


class ExtrasSingleRequest(_Body):
    image: Annotated[str, Raw] = ""
    resize_mode: Annotated[int, Raw] = 0  # 0: by upscaling_resize (the only one Easel does)
    show_extras_results: Annotated[bool, Raw] = True
    gfpgan_visibility: Annotated[float, Raw] = 0
    codeformer_visibility: Annotated[float, Raw] = 0
    codeformer_weight: Annotated[float, Raw] = 0
    upscaling_resize: Annotated[float, Raw] = 2
    upscaling_resize_w: Annotated[int, Raw] = 512
    upscaling_resize_h: Annotated[int, Raw] = 512
    upscaling_crop: Annotated[bool, Raw] = True
    upscaler_1: Annotated[str, Raw] = NO_UPSCALER
    upscaler_2: Annotated[str, Raw] = NO_UPSCALER
    extras_upscaler_2_visibility: Annotated[float, Raw] = 0
    upscale_first: Annotated[bool, Raw] = False


class ExtrasBatchRequest(ExtrasSingleRequest):
    image: Annotated[str, Raw] = ""  # not used here: imageList
    imageList: Annotated[list[dict[str, Any]], Raw] = []


class PngInfoRequest(_Body):
    image: Annotated[str, Raw] = ""


# --- responses -------------------------------------------------------------------------------------
class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str  # a JSON document, as a string (A1111's shape)


class ExtrasSingleResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


# Engine field -> the A1111 field a client sent, for messages; the rest are spelled alike.
GENERATION_NAMES = {"sampler": "sampler_name", "schedule_type": "scheduler", "batch_count": "n_iter",
                    "init_image": "init_images", "model": "override_settings.sd_model_checkpoint"}
EXTRAS_NAMES = {"scale": "upscaling_resize", "upscaler": "upscaler_1", "model": "sd_model_checkpoint"}

HIRES_FIELDS = frozenset({"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
                          "hr_resize_y"})
# Read whenever img2img has a mask; without one they mean nothing, in A1111 too (webuiapi always
# sends them), so they are not reported as ignored.
INPAINT_FIELDS = frozenset({"mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
                            "inpaint_full_res_padding", "inpainting_mask_invert"})
USED_TXT2IMG = frozenset({
    "prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
    "steps", "cfg_scale", "width", "height", "override_settings", "override_settings_restore_afterwards",
    "send_images", "save_images", "speed", "denoising_strength", "tiling", "styles", "restore_faces"}) | HIRES_FIELDS
USED_IMG2IMG = (USED_TXT2IMG - HIRES_FIELDS) | {"init_images", "resize_mode", "include_init_images"} | INPAINT_FIELDS
USED_EXTRAS = frozenset({"image", "imageList", "resize_mode", "upscaling_resize", "upscaler_1"})


def ignored_fields(body: BaseModel, used: frozenset[str]) -> list[str]:
    """The fields a client set that Easel does not use (left at their default or empty: not listed)."""
    ignored = []
    declared = type(body).model_fields
    for name in sorted((body.model_fields_set | set(body.model_extra or {})) - used):
        value = getattr(body, name, None)
        if (name in declared and value == declared[name].default) or value in (None, False, 0, "", [], {}):
            continue
        ignored.append(name)
    return ignored  # override_settings' keys: Options.job_fields


# --- errors ----------------------------------------------------------------------------------------
class Refusal(Exception):
    """A ready HTTP answer, raised from deep inside a handler."""

    def __init__(self, response: JSONResponse):
        self.response = response


def unprocessable(field: str, message: str, value: Any = None) -> JSONResponse:
    """HTTP 422 in FastAPI's validation shape, naming the field (dots: a field inside an object)."""
    return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", *field.split(".")],
                                     "msg": f"{field}: {message}", "input": value}]}, status_code=422)


def failure(status: int, error: str, message: str) -> JSONResponse:
    """A1111's error body (its api_middleware's shape): error type, detail, body, errors."""
    return JSONResponse({"error": error, "detail": message, "body": "", "errors": message}, status_code=status)


def answering(names: dict[str, str]):
    """Turn what the engine raises into A1111-shaped answers; nothing escapes as a crash."""
    def decorate(handler):
        @functools.wraps(handler)
        def wrapped(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Refusal as refusal:
                return refusal.response
            except RequestError as e:
                message = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
                return unprocessable(names.get(e.field, api_field(e.field, _controlnet_key(kwargs))), message)
            except ModelNotFoundError as e:
                return unprocessable(names["model"], str(e).removeprefix("model: "))
            except EaselError as e:
                return failure(400, type(e).__name__, str(e))
            except Exception as e:  # noqa: BLE001 - a bug answers 500 and is logged; the server goes on
                logger.exception("API %s", handler.__name__)
                return failure(500, type(e).__name__, f"internal error ({type(e).__name__}); see the server's log")
        return wrapped
    return decorate


def _controlnet_key(kwargs: dict) -> str:
    """How the handler's body spelled alwayson_scripts' ControlNet key, for naming its fields."""
    body = kwargs.get("body")
    return script_key(getattr(body, "alwayson_scripts", None)) or "controlnet"


def renamed(error: RequestError, field: str) -> RequestError:
    """The same refusal naming the A1111 field a value came from (one engine field, several sources)."""
    message = str(error)
    return RequestError(field, message[len(error.field) + 2:] if message.startswith(f"{error.field}: ") else message)


# --- mapping A1111's fields ------------------------------------------------------------------------
def inpaint_fields(body) -> tuple[dict[str, Any], dict[str, str]]:
    """img2img's inpainting fields for the engine, and engine field -> the A1111 field it came from
    where they differ. The engine takes A1111's numbers itself (inpainting_fill 0-3, 0/1 switches);
    A1111's defaults (fill, only masked, padding 0) come with the body. A1111 blurs by mask_blur_x
    and mask_blur_y unless mask_blur sets both; Easel blurs evenly, so the two must agree."""
    if body.mask_blur is not None:
        blur, source = body.mask_blur, "mask_blur"
    elif body.mask_blur_x == body.mask_blur_y:
        blur, source = body.mask_blur_x, "mask_blur_x"
    else:
        raise RequestError("mask_blur_y", f"Easel blurs the mask evenly: give mask_blur, or mask_blur_y equal to "
                                          f"mask_blur_x ({body.mask_blur_x!r}); got {body.mask_blur_y!r}")
    fields = {"mask": decode_base64_image(body.mask, "mask", keep_alpha=True),  # alpha: a painted layer
              "mask_blur": blur, "inpainting_fill": body.inpainting_fill, "inpaint_full_res": body.inpaint_full_res,
              "inpaint_full_res_padding": body.inpaint_full_res_padding,
              "inpainting_mask_invert": body.inpainting_mask_invert}
    return fields, {"mask_blur": source}


def _pixels(name: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 0:
        raise RequestError(name, f"must be a whole number of pixels (0: use hr_scale), got {value!r}")
    return int(value)


def hires_resize_scale(width: Any, height: Any, resize_x: Any, resize_y: Any) -> tuple[float, str] | None:
    """A1111's hr_resize_x / hr_resize_y as the hires fix's scale, and the field to name in errors;
    None when both are 0 (hr_scale applies). One given: the other side follows the first pass's
    aspect ratio. Both: A1111 enlarges to cover them and crops the rest; Easel does not crop, so
    they must keep the aspect ratio (within A1111's 8-pixel rounding). The engine snaps the result
    down to the model's size step (engine.request.hires_size)."""
    x, y = _pixels("hr_resize_x", resize_x), _pixels("hr_resize_y", resize_y)
    if not (x or y):
        return None
    if isinstance(width, bool) or not isinstance(width, int) or isinstance(height, bool) or not isinstance(height, int) \
            or width <= 0 or height <= 0:
        return None  # the request's validation names width or height
    name = "hr_resize_x" if x else "hr_resize_y"
    if x and y:  # A1111's StableDiffusionProcessingTxt2Img.calculate_target_resolution
        to_x, to_y = (x, x * height // width) if width / height < x / y else (y * width // height, y)
        if (to_x - x) // 8 or (to_y - y) // 8:
            raise RequestError("hr_resize_y", f"{x}x{y} has another aspect ratio than {width}x{height}; Easel's hires "
                                              "fix does not crop: give one of hr_resize_x, hr_resize_y (0 for the "
                                              "other) or both in width:height's ratio")
        name = "hr_resize_x" if to_x == x else "hr_resize_y"
    else:
        to_x, to_y = (x, x * height // width) if x else (y * width // height, y)
    scale = to_x / width if name == "hr_resize_x" else to_y / height
    low, high = LIMITS.ranges["hr_scale"]
    if not low <= scale <= high:
        raise RequestError(name, f"makes {to_x}x{to_y} from the first pass's {width}x{height}, {scale:.3g} times; "
                                 f"hires fix enlarges {low:g} to {high:g} times")
    while int(width * scale) < to_x or int(height * scale) < to_y:  # a float a hair short of the size
        scale = math.nextafter(scale, math.inf)
    return scale, name


# --- helpers ---------------------------------------------------------------------------------------
def png_base64(image, infotext: str | None = None) -> str:
    return base64.b64encode(write_png_with_infotext(image, infotext)).decode("ascii")


class ApiJobs:
    """The API's own jobs, running or waiting their turn (interrupt stops only those, never a page
    user's), and the latest live preview of each (previews come every few steps; progress shows
    the last one). At most `limit` at once: each waiting request holds one of the server's worker
    threads, which the page's events need too, so a flood of API calls cannot take them all."""

    def __init__(self, limit: int):
        self.limit = limit
        self._previews: dict[int, Any] = {}
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()

    def open(self, steps=None) -> Job:
        # keep_partial: interrupt answers with the pictures as far as they got, as A1111 does.
        job = Job(preview_every=preview_every(steps) if steps else 0, keep_partial=True)
        key = id(job)

        def keep_preview(update) -> None:
            if update.preview is not None:
                with self._lock:
                    self._previews[key] = update.preview

        job.on_progress = keep_preview
        with self._lock:
            if len(self._jobs) >= self.limit:
                raise Refusal(failure(503, "QueueFull", f"queue: {self.limit} API jobs are already running or "
                                                        "waiting (--queue-size); try again later"))
            self._jobs[key] = job
        return job

    def close(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(id(job), None)
            self._previews.pop(id(job), None)

    def owns(self, job: Job | None) -> bool:
        with self._lock:
            return job is not None and self._jobs.get(id(job)) is job

    def preview(self, job: Job):
        with self._lock:
            return self._previews.get(id(job))


class ModelChoice:
    """The API's sd_model_checkpoint: set by POST options (or an override not restored
    afterwards); until then, whatever model the engine has loaded."""

    def __init__(self, engine):
        self.engine = engine
        self.name: str | None = None

    def current(self) -> str | None:
        """The model a job without an override uses: the one set, else the loaded one, else the
        first in the list (the engine's own choice); None only with no checkpoint at all. A1111
        always has one loaded, and clients (Open WebUI) read it from /options."""
        if self.name or self.engine.current_model:
            return self.name or self.engine.current_model
        names = self.engine.model_names()
        return names[0] if names else None

    def keep(self) -> None:
        """Hold on to the current model (before an override loads another): later requests
        still use it, as A1111 restores it after an override."""
        if self.name is None:
            self.name = self.current()

    def title(self, name: str | None) -> str | None:
        """A1111's checkpoint title, "name [hash]"; the hash only once the model was loaded (hashing
        a file takes seconds: not done for a listing)."""
        if name is None:
            return None
        loaded = self.engine.manager.current
        if loaded is not None and loaded.entry.name == name:
            return f"{name} [{loaded.hash}]"
        return name


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic` header; None when there is none, or it holds
    nothing readable as user:password."""
    scheme, _, param = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


# Swagger UI's files that /docs loads (from fastapi-offline's package), by name: nothing else is read.
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


# --- the router ------------------------------------------------------------------------------------
class Route(NamedTuple):
    method: str
    path: str
    handler: str  # the name of an Api method
    response_model: Any = None  # a BaseModel, or a list[...] of one
    # The A1111 names of engine fields, for refusals. None: not wrapped in `answering`, which takes
    # sync handlers only; the async ones and those with nothing to refuse answer as FastAPI does.
    names: dict[str, str] | None = None
    in_schema: bool = True  # False: served, but not an A1111 route, so left out of the OpenAPI document


class Api(lists.ListRoutes, ControlNetRoutes):
    """The /sdapi/v1 routes (and /docs, /openapi.json) on `engine`; `router` has them, each route a
    method, registered from ROUTES. `logins`: (user, password) pairs accepted as HTTP Basic
    credentials (none: open, as the page is); `limiter`: the request guard's LoginLimiter, so wrong
    API passwords count with wrong page logins; `queue_size`: API jobs that may wait for their turn
    besides the running one."""

    ROUTES = (
        Route("POST", f"{PREFIX}/txt2img", "txt2img", ImagesResponse, GENERATION_NAMES),
        Route("POST", f"{PREFIX}/img2img", "img2img", ImagesResponse, GENERATION_NAMES),
        Route("POST", f"{PREFIX}/extra-single-image", "extra_single_image", ExtrasSingleResponse, EXTRAS_NAMES),
        Route("POST", f"{PREFIX}/extra-batch-images", "extra_batch_images", ExtrasBatchResponse, EXTRAS_NAMES),
        Route("POST", f"{PREFIX}/png-info", "png_info", PngInfoResponse, {}),
        Route("GET", f"{PREFIX}/progress", "progress"),
        Route("POST", f"{PREFIX}/interrupt", "interrupt"),
        Route("POST", f"{PREFIX}/skip", "skip"),
        Route("GET", f"{PREFIX}/sd-models", "sd_models", names={}),
        Route("POST", f"{PREFIX}/refresh-checkpoints", "refresh_checkpoints", names={}),
        Route("GET", f"{PREFIX}/options", "get_options", names={}),
        Route("POST", f"{PREFIX}/options", "set_options", names=EXTRAS_NAMES),
        Route("GET", f"{PREFIX}/samplers", "samplers"),
        Route("GET", f"{PREFIX}/schedulers", "schedulers"),
        Route("GET", f"{PREFIX}/upscalers", "upscalers", names={}),
        Route("GET", f"{PREFIX}/scripts", "scripts"),
        # The lists (ui/api_lists.py): models on disk, styles, flags, memory.
        Route("GET", f"{PREFIX}/sd-vae", "sd_vae", list[lists.SdVaeItem], {}),
        Route("POST", f"{PREFIX}/refresh-vae", "refresh_list", names={}),
        Route("GET", f"{PREFIX}/loras", "loras", list[lists.LoraItem], {}),
        Route("POST", f"{PREFIX}/refresh-loras", "refresh_list", names={}),
        Route("GET", f"{PREFIX}/embeddings", "embeddings", lists.EmbeddingsResponse, {}),
        Route("POST", f"{PREFIX}/refresh-embeddings", "refresh_list", names={}),
        Route("GET", f"{PREFIX}/realesrgan-models", "realesrgan_models", list[lists.RealesrganItem], {}),
        Route("GET", f"{PREFIX}/latent-upscale-modes", "latent_upscale_modes", list[lists.LatentUpscalerModeItem], {}),
        Route("GET", f"{PREFIX}/face-restorers", "face_restorers", list[lists.FaceRestorerItem], {}),
        Route("GET", f"{PREFIX}/hypernetworks", "hypernetworks", list[lists.HypernetworkItem], {}),
        Route("GET", f"{PREFIX}/prompt-styles", "prompt_styles", list[lists.PromptStyleItem], {}),
        Route("GET", f"{PREFIX}/cmd-flags", "cmd_flags", names={}),
        Route("GET", f"{PREFIX}/memory", "memory", lists.MemoryResponse, {}),
        Route("POST", f"{PREFIX}/interrogate", "interrogate"),
        # sd-webui-controlnet's (ui/api_controlnet.py), outside /sdapi/v1 as the extension mounts them.
        Route("GET", "/controlnet/version", "controlnet_version"),
        Route("GET", "/controlnet/model_list", "controlnet_model_list", names={}),
        Route("GET", "/controlnet/module_list", "controlnet_module_list"),
        Route("POST", "/controlnet/detect", "controlnet_detect", names={}),
        Route("GET", "/internal/ping", "ping"),  # A1111 mounts it outside /sdapi/v1
        # The OpenAPI document and its page, behind the same credentials.
        Route("GET", "/openapi.json", "openapi", in_schema=False),
        Route("GET", "/docs", "docs", in_schema=False),
        Route("GET", "/docs/{name}", "docs_file", in_schema=False),
    )

    def __init__(self, engine, *, logins=(), limiter=None, queue_size: int = 16):
        self.engine = engine
        self.logins = tuple(logins)
        self.limiter = limiter
        self.jobs = ApiJobs(queue_size + 1)
        self.choice = ModelChoice(engine)
        self.options = Options(engine, self.choice)
        self.router = APIRouter(dependencies=[Depends(self.credentials)])
        for route in self.ROUTES:
            handler = getattr(self, route.handler)
            if route.names is not None:
                handler = answering(route.names)(handler)
            self.router.add_api_route(route.path, handler, methods=[route.method], response_model=route.response_model,
                                      tags=["sdapi"] if route.in_schema else None, include_in_schema=route.in_schema)

    def credentials(self, request: Request) -> None:
        # Read by hand, not with FastAPI's HTTPBasic: that refuses an empty "Basic " header with
        # 401 even when no login is asked for, and Open WebUI and SillyTavern send one by default
        # (A1111 without --api-auth ignores it).
        if not self.logins:
            return
        given = basic_credentials(request.headers.get("authorization"))
        address = request.client.host if request.client else "unknown"
        wait = self.limiter.wait_left(address) if self.limiter else 0
        if wait > 0:
            raise HTTPException(429, f"login: too many wrong passwords from {address}; try again in "
                                     f"{math.ceil(wait)} s", headers={"Retry-After": str(math.ceil(wait))})
        if given is None:
            raise HTTPException(401, "Not authenticated", headers={"WWW-Authenticate": "Basic"})
        user, password = given[0].encode(), given[1].encode()
        if not any(secrets.compare_digest(user, u.encode()) & secrets.compare_digest(password, p.encode())
                   for u, p in self.logins):
            if self.limiter:
                self.limiter.failed(address)
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    # --- generation ---
    def txt2img(self, body: Txt2ImgRequest):
        return self.generate(body, "txt2img", USED_TXT2IMG)

    def img2img(self, body: Img2ImgRequest):
        return self.generate(body, "img2img", USED_IMG2IMG)

    def generate(self, body, mode: str, used: frozenset[str]) -> dict:
        override = self.model_override(body)
        model = override or self.choice.current()
        overridden, override_sources, override_ignored, kept = self.options.job_fields(body.override_settings, model)
        fields, sources, ignored = generation_fields(body, mode, used)
        ignored += self.apply_styles(body.styles, fields)
        fields.update(overridden)
        sources.update(override_sources)
        ignored += override_ignored
        if fields["save_images"] is True and not self.options.samples_save(kept):
            fields["save_images"] = False  # A1111 saves only when samples_save and save_images both are on
        try:
            request = self.engine.make_request(fields, model=model)  # the one validation, naming the field
        except RequestError as e:
            if e.field in sources:
                raise renamed(e, sources[e.field]) from None
            raise
        result, interrupted = self.run(request, model)
        if body.override_settings_restore_afterwards is False:  # A1111 keeps the overrides afterwards
            if override:
                self.choice.name = self.engine.library.resolve(override).name
            self.options.keep(kept, model)
        return images_answer(body, mode, request, result, ignored, interrupted)

    def model_override(self, body) -> str | None:
        """override_settings.sd_model_checkpoint, the model for this request only."""
        overrides = body.override_settings if isinstance(body.override_settings, dict) else {}
        override = overrides.get("sd_model_checkpoint")
        if override is not None and not isinstance(override, str):
            raise RequestError("model", f"must be a model name, got {type(override).__name__}")
        if override:
            self.choice.keep()
        return override

    def apply_styles(self, styles: Any, fields: dict[str, Any]) -> list[str]:
        """A1111's `styles`: the named styles of data/styles.csv put into the prompt and negative
        prompt, in order; a name it does not know is left out, as A1111 leaves it (aiyabot sends
        "None"), and listed as ignored. Returns what was ignored."""
        if styles is None or styles == []:
            return []
        if not isinstance(styles, list) or not all(isinstance(name, str) for name in styles):
            raise RequestError("styles", "must be a list of style names")
        known = set(self.engine.style_names())
        if not all(isinstance(fields[k], str) for k in ("prompt", "negative_prompt")):
            return []  # validation names the field
        fields["prompt"], fields["negative_prompt"] = self.engine.apply_styles(
            fields["prompt"], fields["negative_prompt"], [name for name in styles if name in known])
        return [f"styles.{name}" for name in styles if name not in known]

    def run(self, request, model) -> tuple[Any, bool]:
        """The result (None if interrupted before its first picture) and whether the job was
        interrupted (an interrupted job's pictures are as far as they got: Job.keep_partial)."""
        job = self.jobs.open(request.steps)
        try:
            result = self.engine.generate(request, job, model=model)
            return result, job.cancelled.is_set()
        except CancelledError:
            return None, True
        finally:
            self.jobs.close(job)

    # --- extras (the upscalers) ---
    def extra_single_image(self, body: ExtrasSingleRequest):
        image, infotext = self.upscale(body, body.image, "image")
        return {"html_info": extras_info(infotext, body), "image": image}

    def extra_batch_images(self, body: ExtrasBatchRequest):
        entries = body.imageList
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise RequestError("imageList", "must be a list of {\"data\": base64 image, \"name\": text}")
        done = [self.upscale(body, entry.get("data"), f"imageList.{i}.data") for i, entry in enumerate(entries)]
        return {"html_info": extras_info(done[0][1] if done else "", body), "images": [d[0] for d in done]}

    def upscale(self, body: ExtrasSingleRequest, image_b64, field: str) -> tuple[str, str]:
        if body.resize_mode != 0:
            raise RequestError("resize_mode", f"only 0 (scale by upscaling_resize) is supported, got {body.resize_mode!r}")
        upscaler = body.upscaler_1
        if upscaler is None or upscaler == NO_UPSCALER:
            upscaler = "Lanczos"
        image = decode_base64_image(image_b64, field)
        job = self.jobs.open()
        try:
            result = self.engine.upscale(image, upscaler, body.upscaling_resize, job=job, save=False)
        finally:
            self.jobs.close(job)
        return png_base64(result.images[0], result.infotexts[0]), result.infotexts[0]

    # --- PNG info ---
    def png_info(self, body: PngInfoRequest):
        image = decode_base64_image(body.image, "image")
        info = self.engine.png_info(image)
        items = {k: printable(v) for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": info.parameters or "", "items": items, "parameters": dict(info.fields)}

    # --- progress and interrupt (async: answered at once, even while every worker thread waits) ---
    async def progress(self, skip_current_image: bool = False):
        job, update = self.engine.turns.running()
        ours = self.jobs.owns(job)
        preview = self.jobs.preview(job) if ours and not skip_current_image else None
        state = {"skipped": False, "interrupted": bool(job and job.cancelled.is_set()), "stopping_generation": False,
                 "job": "" if job is None else ("api" if ours else "page"),
                 "job_count": (update.batches if update else 1) if job else 0,
                 "job_timestamp": "0", "job_no": update.batch if update else 0,
                 "sampling_step": update.step if update else 0, "sampling_steps": update.steps if update else 0,
                 "queued": self.engine.turns.waiting()}
        return {"progress": update.fraction if update else 0.0,
                "eta_relative": (update.eta or 0.0) if update else 0.0,
                "state": state, "current_image": png_base64(preview) if preview is not None else None,
                "textinfo": None, "current_task": None}

    async def interrupt(self):
        """Stops the running job if the API started it (a page user's job is theirs to cancel)."""
        job, _ = self.engine.turns.running()
        if self.jobs.owns(job):
            job.cancel()
        return {}

    async def skip(self):
        """A1111 skips the current image of a batch; Easel's jobs have no per-image skip, so this
        stops the running API job as interrupt does (a page user's job is left alone)."""
        return await self.interrupt()

    # --- models and settings ---
    def sd_models(self):
        rows = []
        for entry in self.engine.library.entries():
            title = self.choice.title(entry.name)
            config = entry.path.with_suffix(".yaml")
            rows.append({"title": title, "model_name": entry.stem,
                         "hash": title.rsplit(" [", 1)[1][:-1] if title.endswith("]") else None, "sha256": None,
                         # relative to the models folder: no server paths to whoever calls the API
                         "filename": f"Stable-diffusion/{entry.name}",
                         "config": f"Stable-diffusion/{config.name}" if config.is_file() else None})
        return rows

    def refresh_checkpoints(self):
        self.engine.library.refresh()
        return None

    def get_options(self):
        """Every key A1111's /options has, Easel's own values for those it acts on (ui/api_options.py)."""
        return self.options.values()

    def set_options(self, body: dict[str, Any]):
        """Checks every key, then acts on those Easel acts on and stores the rest, which have no effect
        (ui/api_options.NO_EFFECT_NOTE); null, as A1111 answers."""
        self.options.apply(body)
        return None

    def samplers(self):
        """Every sampler takes every schedule type (as A1111 since 1.9); `options.schedule_types` says
        which ones it really follows, the others run on its own timesteps with a note."""
        names = {s.label: s.name for s in SCHEDULES}
        return [{"name": name, "aliases": [],
                 "options": {"schedule_types": ",".join(names[label] for label in SAMPLERS[name].schedules)}}
                for name in self.engine.samplers]

    def schedulers(self):
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.need_inner_model} for s in SCHEDULES]

    def upscalers(self):
        rows = [{"name": NO_UPSCALER, "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
        for name in self.engine.upscaler_names():
            rows.append({"name": name, "model_name": None if name == "Lanczos" else name, "model_path": None,
                         "model_url": None, "scale": 4})
        return rows

    def scripts(self):
        """Easel runs no A1111 scripts; clients (webuiapi) ask to see which extensions exist."""
        return {"txt2img": [], "img2img": []}

    # --- the OpenAPI document and its page ---
    def interrogate(self):
        """A1111's CLIP/DeepBooru captioning: Easel has no captioning model, so a clear 501 rather
        than a 404 that clients read as "API unreachable"."""
        raise HTTPException(501, "interrogate: Easel has no captioning (interrogate) model yet; an image Easel "
                                 "or A1111 made carries its prompt: read it with png-info")

    def openapi(self, request: Request):
        return request.app.openapi()

    def docs(self):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Easel API (A1111-compatible)",
                                   swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                                   swagger_favicon_url="/docs/favicon.png")

    def docs_file(self, name: str):
        """Swagger UI's files, served here: FastAPI's page loads them from a CDN, which a machine
        offline cannot reach (the page stayed blank). fastapi-offline keeps a current copy."""
        if name not in DOCS_FILES:
            raise HTTPException(404, f"name: not one of the API page's files ({', '.join(DOCS_FILES)})")
        data = (resources.files("fastapi_offline") / "static" / name).read_bytes()
        return Response(data, media_type=DOCS_FILES[name], headers={"Cache-Control": "max-age=86400"})


def create_api(engine, *, logins=(), limiter=None, queue_size: int = 16) -> APIRouter:
    """The API's router (see Api for the arguments)."""
    return Api(engine, logins=logins, limiter=limiter, queue_size=queue_size).router


# --- mapping A1111's generation fields and answers -------------------------------------------------
def generation_fields(body, mode: str, used: frozenset[str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The engine's fields for a txt2img or img2img body; engine field -> the A1111 field its value
    came from where they differ, for errors; and the fields Easel ignored."""
    fields = {
        "mode": mode, "prompt": body.prompt, "negative_prompt": body.negative_prompt, "seed": body.seed,
        "sampler": body.sampler_name or body.sampler_index, "schedule_type": scheduler_label(body.scheduler),
        "steps": a1111_count(body.steps), "cfg_scale": body.cfg_scale, "width": body.width, "height": body.height,
        "batch_size": body.batch_size, "batch_count": body.n_iter, "save_images": body.save_images,
        "speed": body.speed, "denoising_strength": body.denoising_strength, "tiling": body.tiling,
        "restore_faces": body.restore_faces,
    }
    ignored = ignored_fields(body, used | {"alwayson_scripts"})
    own, sources, own_ignored = (txt2img_fields if mode == "txt2img" else img2img_fields)(body)
    fields.update(own)
    fields["controlnet"], scripts_ignored = controlnet_units(body.alwayson_scripts)  # the others are ignored
    ignored += scripts_ignored
    if not isinstance(fields["sampler"], str):
        raise RequestError("sampler", f"must be a sampler name, got {type(fields['sampler']).__name__}")
    return fields, sources, ignored + own_ignored


def txt2img_fields(body: Txt2ImgRequest) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    fields = {"enable_hr": body.enable_hr, "hr_scale": body.hr_scale, "hr_upscaler": body.hr_upscaler,
              "hr_second_pass_steps": a1111_count(body.hr_second_pass_steps)}
    sources: dict[str, str] = {}
    resize = hires_resize_scale(body.width, body.height, body.hr_resize_x, body.hr_resize_y) \
        if body.enable_hr is True else None
    if resize:
        fields["hr_scale"], sources["hr_scale"] = resize
    return fields, sources, []


def img2img_fields(body: Img2ImgRequest) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    images = body.init_images
    if not isinstance(images, list) or not images:
        raise RequestError("init_image", "img2img needs one base64 image in init_images")
    fields = {"init_image": decode_base64_image(images[0], "init_images")}
    ignored = ["init_images[1:]"] if len(images) > 1 else []
    if body.resize_mode not in RESIZE_MODES or isinstance(body.resize_mode, bool):
        raise RequestError("resize_mode", f"must be 0 (just resize), 1 (crop and resize) or 2 (resize and "
                                          f"fill), got {body.resize_mode!r}")
    fields["resize_mode"] = RESIZE_MODES[body.resize_mode]
    sources: dict[str, str] = {}
    if body.mask is not None and body.mask != "":  # A1111: an empty mask is none
        inpaint, sources = inpaint_fields(body)
        fields.update(inpaint)
    return fields, sources, ignored


def images_answer(body, mode: str, request, result, ignored: list[str], interrupted: bool) -> dict:
    """txt2img's and img2img's answer, ImagesResponse."""
    parameters = body.model_dump(exclude=set(body.model_extra or {}))
    if mode == "img2img" and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    images = [png_base64(i, t) for i, t in zip(result.images, result.infotexts)] if result else []
    info = generation_info(request, result, ignored, interrupted)
    info["styles"] = list(body.styles or [])  # A1111 echoes the names asked for
    return {"images": images if body.send_images else [], "parameters": parameters, "info": json.dumps(info)}


def extras_info(infotext: str, body) -> str:
    ignored = ignored_fields(body, USED_EXTRAS | {"show_extras_results"})
    return printable(infotext) + (f"\nIgnored by Easel: {', '.join(ignored)}" if ignored else "")


def generation_info(request, result, ignored: list[str], interrupted: bool) -> dict:
    """A1111's `info` object (Processed.js()), from the validated request and the result."""
    seeds = list(result.seeds) if result else []
    infotexts = list(result.infotexts) if result else []
    parsed = parse_infotext(infotexts[0]) if infotexts else {}
    n = len(seeds)
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": request.sampler,
        "scheduler": request.schedule_type, "cfg_scale": request.cfg_scale, "steps": request.steps,
        "batch_size": request.batch_size, "restore_faces": request.restore_faces,
        "face_restoration_model": request.face_restorer if request.restore_faces else None,
        "sd_model_name": parsed.get("Model"), "sd_model_hash": parsed.get("Model hash"),
        "sd_vae_name": parsed.get("VAE"), "sd_vae_hash": parsed.get("VAE hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength if request.mode == "img2img" or request.enable_hr else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": int(parsed.get("Clip skip", 1)),  # the one the job ran with (the infotext's)
        "is_using_inpainting_conditioning": False, "version": parsed.get("Version"),
        "interrupted": interrupted, "ignored": ignored, "notes": list(result.notes) if result else [],
    }
