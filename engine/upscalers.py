"""Upscaling an image: Lanczos, or an ESRGAN-family model (ESRGAN, Real-ESRGAN, SwinIR ...) from the
models folder, run in overlapping tiles, then published like any other image (mode "upscale").

- The list: "Lanczos" (always there, no weights) and every weight file in `models/ESRGAN`,
  `models/RealESRGAN` and `models/SwinIR` (the library's "Upscalers"). A name is looked up among
  the scanned entries only, never joined onto a path.
- Loading: the state dict comes from `engine.safe_files.read_tensors` (a pickle that would run code
  is refused before anything is unpickled); spandrel only recognises the architecture from key
  names and shapes and builds the module (`ModelLoader().load_from_state_dict`), it never opens the
  file itself. An architecture spandrel does not know is one error naming the file.
- Tiling: tiles of at most `tile` input pixels overlapping by at least `overlap`, as few as that
  allows, spread evenly (`engine.tiling.tile_span`); each tile's output is weighted by a
  linear feather (0 at an inner tile edge, 1 from `overlap` pixels in) and the weighted sum is
  divided by the summed weights, so tiles meet without a seam. Only one tile is in the model at a
  time: the model's memory is bounded by the tile size, not the image (the output buffer grows with
  the image: 16 bytes per output pixel). Progress per tile, cancel between tiles.
- Scale: a 4x model asked for 2 or 3 runs at 4x, then Lanczos brings it down to the asked scale;
  a scale above the model's is refused (`scale`).
- The SD x4 upscaler: every checkpoint in `models/Stable-diffusion` whose family (read by
  `ModelManager.facts`, no load) is the SD x4 upscaler is listed as "SD x4: <model name>" and
  resolved back through the library's entries only. It is loaded by the manager for the purpose
  "upscale" (generation with it stays refused), used inside the manager's in-use scope, placed as
  its DevicePlan says, and run by `engine.sd_upscaler.upscale_sd_x4` (out of memory: the manager's
  `with_fallback`). It is a 4x model like any other here: 2 or 3 is 4x then Lanczos down. Its own
  options (`SdOptions`: prompt, negative prompt, steps, noise level, seed) are ignored by the other
  upscalers; a tile of 0 is the whole image in one tile, no tile given is its native 128.
- Publishing: `Publisher` (watermark on the final, upscaled pixels), the source image's infotext
  plus A1111's extras keys `Postprocess upscale by: N, Postprocess upscaler: NAME` (and, for the
  SD x4 upscaler, `Postprocess prompt / negative prompt / steps / noise level / seed`).
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from PIL import Image

from engine.errors import RequestError, UnknownCheckpointError
from engine.infotext import parse_infotext, quote, read_infotext
from engine.jobs import GenerationResult, Job, ProgressUpdate, check_cancelled
from engine.library import ModelLibrary
from engine.publish import Publisher
from engine.tiling import tile_span

LANCZOS = "Lanczos"
UPSCALER_KIND = "Upscalers"  # engine.library.EXTRA_KINDS key: ESRGAN/, RealESRGAN/, SwinIR/
SCALES = (2, 3, 4)
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 16  # input pixels; when not given, at most a quarter of the tile
MIN_TILE, MAX_TILE = 32, 2048  # tile 0: the whole image in one piece
# The accumulation buffers take 16 bytes per output pixel (RGB + weight, float32): 50 MP is 800 MB.
MAX_OUTPUT_PIXELS = 50_000_000
MODE = "upscale"  # the output folder (A1111 calls it extras-images; its infotext keys keep the "Postprocess" names)
SD_X4_PREFIX = "SD x4: "  # an SD x4 upscaler checkpoint's name in the list: "SD x4: <model name>"
SD_X4_TILE = 128  # its native input size (engine.sd_upscaler.DEFAULT_TILE), the tile when none is given
SD_X4_STEPS = (1, 150)  # as the generation request's steps
SD_X4_DEFAULT_STEPS = 20
SD_X4_DEFAULT_NOISE_LEVEL = 20  # 0..the model's max_noise_level (350 for the released one)
SD_X4_DEFAULT_GUIDANCE = 9.0  # diffusers' StableDiffusionUpscalePipeline default
SD_X4_GUIDANCE = (0.0, 30.0)  # as the generation request's cfg_scale
SEED_MAX = 2 ** 32 - 1
# Postprocess keys, in the order they are written; an upscale replaces the earlier upscale's ones.
_SD_KEYS = ("Postprocess prompt", "Postprocess negative prompt", "Postprocess steps", "Postprocess CFG scale",
            "Postprocess noise level", "Postprocess seed")
_PP_KEYS = ("Postprocess upscale by", "Postprocess upscaler", *_SD_KEYS)


@dataclass(frozen=True)
class Upscaler:
    name: str               # what users see and type; for a model, the file name without extension
    path: Path | None       # None: Lanczos
    checkpoint: str | None = None  # the SD x4 upscaler: its model name (a library entry's name)

    @property
    def sd_x4(self) -> bool:
        return self.checkpoint is not None


@dataclass(frozen=True)
class SdOptions:
    """The SD x4 upscaler's own options, validated (see check_sd_options)."""
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = SD_X4_DEFAULT_STEPS
    noise_level: int = SD_X4_DEFAULT_NOISE_LEVEL
    seed: int = 0
    guidance: float = SD_X4_DEFAULT_GUIDANCE

    def infotext_fields(self) -> dict:
        return {"Postprocess prompt": self.prompt or None, "Postprocess negative prompt": self.negative_prompt or None,
                "Postprocess steps": self.steps, "Postprocess CFG scale": f"{self.guidance:g}",
                "Postprocess noise level": self.noise_level,
                "Postprocess seed": self.seed}


def list_upscalers(library: ModelLibrary, sd_x4_checkpoints=()) -> list[Upscaler]:
    """Lanczos, then the model files (by stem; by path relative to the models folder when two
    files share a stem), then the SD x4 upscaler checkpoints given (library entry names)."""
    entries = library.extra_entries(UPSCALER_KIND)
    stems = [PurePosixPath(e.name).stem for e in entries]
    found = [Upscaler(LANCZOS, None)]
    for entry, stem in zip(entries, stems):
        unique = stems.count(stem) == 1 and stem.lower() != LANCZOS.lower()
        found.append(Upscaler(stem if unique else entry.name, entry.path))
    entries = {e.name: e for e in library.entries()}
    for checkpoint in sd_x4_checkpoints:
        if checkpoint in entries:
            found.append(Upscaler(SD_X4_PREFIX + checkpoint, entries[checkpoint].path, checkpoint))
    return found


def resolve_upscaler(library: ModelLibrary, name: str | None, available: list[Upscaler] | None = None) -> Upscaler:
    wanted = (name or LANCZOS).strip()
    available = list_upscalers(library) if available is None else available
    for up in available:
        if up.name == wanted or up.name.lower() == wanted.lower() and up.path is None:
            return up
    for up in available:  # the full relative name also works ("ESRGAN/4x-foo.pth")
        if up.path is not None and not up.sd_x4 and up.path.relative_to(library.models_dir).as_posix() == wanted:
            return up
    names = ", ".join(up.name for up in available)
    raise RequestError("upscaler", f"{wanted!r} is not an upscaler; available: {names}")


# --- loading ---------------------------------------------------------------------------------------

def load_model(path: Path, device: str = "cpu"):
    """The spandrel ImageModelDescriptor for a weight file, in eval mode on `device`."""
    from engine.safe_files import read_tensors

    path = Path(path)
    state_dict = read_tensors(path)  # refuses code-running pickles and forged files, by name
    import engine.compat  # noqa: F401 - spandrel imports torchvision: the operator shim first
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader(device="cpu").load_from_state_dict(state_dict)
    except UnsupportedModelError:
        raise UnknownCheckpointError(
            f"{path.name}: not an upscaler architecture Easel knows (ESRGAN, Real-ESRGAN, SwinIR and "
            f"the others spandrel reads)") from None
    except Exception as e:  # noqa: BLE001 - a known architecture with inconsistent shapes
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnknownCheckpointError(f"{path.name}: looks like an upscaler but cannot be built ({text})") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.input_channels != 3 \
            or descriptor.output_channels != 3:
        raise UnknownCheckpointError(f"{path.name}: is a {descriptor.architecture.name} model, not an RGB upscaler")
    descriptor.model.eval()
    return descriptor.to(device)


# --- tiles -----------------------------------------------------------------------------------------

def _ramp(n: int, fade: int, left: bool, right: bool):
    """Per-pixel weights along one axis of a tile's output: a linear feather over `fade` pixels at
    each edge that has a neighbour, strictly above 0 so every output pixel has some weight."""
    import torch

    w = torch.ones(n)
    if fade > 0:
        ramp = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        fade = min(fade, n)
        if left:
            w[:fade] = torch.minimum(w[:fade], ramp[:fade])
        if right:
            w[n - fade:] = torch.minimum(w[n - fade:], ramp[:fade].flip(0))
    return w


def run_tiled(model: Callable, pixels, scale: int, tile: int, overlap: int, *,
              multiple_of: int = 1, minimum: int = 0,
              on_tile: Callable[[int, int], None] | None = None, job: Job | None = None):
    """The model's output for `pixels` (1x3xHxW, 0..1), computed tile by tile and feather-blended.

    `model` maps 1x3xhxw to 1x3x(h*scale)x(w*scale). Tiles are padded (replicated edge) to the
    model's size requirements and the padding cropped off its output. `on_tile(done, total)` after
    each tile; `job` is checked for cancel before each one."""
    import torch
    import torch.nn.functional as F

    _, channels, height, width = pixels.shape
    (ys, th), (xs, tw) = tile_span(height, tile, overlap), tile_span(width, tile, overlap)
    out = torch.zeros(1, channels, height * scale, width * scale)
    weight = torch.zeros(1, 1, height * scale, width * scale)
    total, done = len(ys) * len(xs), 0
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            if job is not None:
                check_cancelled(job)
            piece = pixels[:, :, y:y + th, x:x + tw]
            ph, pw = _padded(th, multiple_of, minimum), _padded(tw, multiple_of, minimum)
            if (ph, pw) != (th, tw):
                piece = F.pad(piece, (0, pw - tw, 0, ph - th), mode="replicate")
            with torch.inference_mode():
                result = model(piece).float().cpu()
            result = result[:, :, :th * scale, :tw * scale].clamp(0, 1)
            if result.shape[-2:] != (th * scale, tw * scale):
                raise UnknownCheckpointError(
                    f"the model gave {tuple(result.shape[-2:])} for a {th}x{tw} tile, not {scale}x that")
            fade = overlap * scale
            wy = _ramp(th * scale, fade, iy > 0, iy < len(ys) - 1)
            wx = _ramp(tw * scale, fade, ix > 0, ix < len(xs) - 1)
            w = (wy[:, None] * wx[None, :])[None, None]
            oy, ox = y * scale, x * scale
            out[:, :, oy:oy + th * scale, ox:ox + tw * scale] += result * w
            weight[:, :, oy:oy + th * scale, ox:ox + tw * scale] += w
            del result, piece
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return out.div_(weight)


def _padded(n: int, multiple_of: int, minimum: int) -> int:
    n = max(n, minimum)
    return -(-n // multiple_of) * multiple_of if multiple_of > 1 else n


def _to_tensor(image: Image.Image):
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def _to_image(tensor) -> Image.Image:
    array = (tensor[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(dtype=__import__("torch").uint8)
    return Image.fromarray(array.numpy(), "RGB")


# --- checks and infotext ---------------------------------------------------------------------------

def whole(value, field: str) -> int:
    if isinstance(value, bool):
        raise RequestError(field, f"must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(field, f"must be a whole number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise RequestError(field, f"must be a whole number, got {value!r}")
    return int(number)


def check_sd_options(prompt=None, negative_prompt=None, steps=None, noise_level=None, seed=None,
                     guidance=None) -> SdOptions:
    """The SD x4 upscaler's options; None takes the default (seed None or -1: a random one).
    The noise level's upper bound is the model's own (`max_noise_level`), checked once it is loaded."""
    for value, name in ((prompt, "prompt"), (negative_prompt, "negative_prompt")):
        if value is not None and not isinstance(value, str):
            raise RequestError(name, f"must be text, got {type(value).__name__}")
    steps = SD_X4_DEFAULT_STEPS if steps is None else whole(steps, "steps")
    if not SD_X4_STEPS[0] <= steps <= SD_X4_STEPS[1]:
        raise RequestError("steps", f"must be from {SD_X4_STEPS[0]} to {SD_X4_STEPS[1]}, got {steps}")
    noise_level = SD_X4_DEFAULT_NOISE_LEVEL if noise_level is None else whole(noise_level, "noise_level")
    if noise_level < 0:
        raise RequestError("noise_level", f"must be from 0 to the model's max_noise_level (350), got {noise_level}")
    seed = -1 if seed is None else whole(seed, "seed")
    if not -1 <= seed <= SEED_MAX:
        raise RequestError("seed", f"must be -1 (random) or from 0 to {SEED_MAX}, got {seed}")
    if seed == -1:
        seed = random.randint(0, SEED_MAX)
    guidance = SD_X4_DEFAULT_GUIDANCE if guidance is None else _number(guidance, "cfg_scale")
    if not SD_X4_GUIDANCE[0] <= guidance <= SD_X4_GUIDANCE[1]:
        raise RequestError("cfg_scale", f"must be from {SD_X4_GUIDANCE[0]:g} to {SD_X4_GUIDANCE[1]:g}, got {guidance:g}")
    return SdOptions(prompt or "", negative_prompt or "", steps, noise_level, seed, guidance)


def _number(value, field: str) -> float:
    if isinstance(value, bool):
        raise RequestError(field, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(field, f"must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise RequestError(field, f"must be a finite number, got {value!r}")
    return number


def check_options(image: Image.Image, scale, tile, overlap) -> tuple[int, int, int]:
    scale, tile = whole(scale, "scale"), whole(tile, "tile")
    # Not given: 16 px, less for small tiles (a quarter of the tile at most).
    overlap = min(DEFAULT_OVERLAP, max(tile, 0) // 4) if overlap is None else whole(overlap, "tile_overlap")
    if scale not in SCALES:
        raise RequestError("scale", f"must be one of {', '.join(map(str, SCALES))}, got {scale}")
    if tile != 0 and not MIN_TILE <= tile <= MAX_TILE:
        raise RequestError("tile", f"must be 0 (no tiling) or from {MIN_TILE} to {MAX_TILE} pixels, got {tile}")
    if overlap < 0 or (tile and overlap * 2 >= tile):
        raise RequestError("tile_overlap", f"must be from 0 to less than half the tile ({tile}), got {overlap}")
    w, h = image.size
    if w * h * scale * scale > MAX_OUTPUT_PIXELS:
        raise RequestError("scale", f"{w}x{h} at {scale}x would be {w * scale}x{h * scale} = "
                                    f"{w * h * scale * scale} pixels; at most {MAX_OUTPUT_PIXELS} are allowed "
                                    f"(a smaller scale or image)")
    return scale, tile, overlap


def upscale_infotext(source: str | None, upscaler: str, scale: int, extra: dict | None = None) -> str:
    """The source's parameters with A1111's extras keys appended to its parameter line (an earlier
    upscale's keys are replaced); the keys alone when the source had none. `extra`: more
    "Postprocess ..." keys (the SD x4 upscaler's options); None values are left out."""
    added = f"Postprocess upscale by: {scale}, Postprocess upscaler: {quote(upscaler)}"
    for key, value in (extra or {}).items():
        if value is not None:
            added += f", {key}: {quote(value)}"
    if not source or not source.strip():
        return added
    text = source.rstrip()
    *lines, last = text.split("\n")
    for key in _PP_KEYS:  # a re-upscaled image: the latest upscale's keys only
        last = re.sub(rf"(^|,\s*){re.escape(key)}:\s*(\"(?:[^\"\\]|\\.)*\"|[^,]*)", "", last).strip().strip(",").strip()
    if last and len(parse_infotext(last)) > 2:  # a parameter line (Prompt and Negative prompt are always there)
        last = f"{last}, {added}"
    else:
        lines.append(last)
        last = added
    return "\n".join([*lines, last]).strip("\n")


def _seed_of(source: str | None) -> int:
    if source:
        seed = parse_infotext(source).get("Seed")
        if isinstance(seed, str) and seed.isdigit():
            return int(seed)
    return 0


# --- running ---------------------------------------------------------------------------------------

class Upscalers:
    """The upscalers of one models folder; keeps the last ESRGAN-family model used loaded (the SD x4
    upscaler is the manager's, loaded like a checkpoint)."""

    def __init__(self, library: ModelLibrary, publisher: Publisher, device: str = "cpu", manager=None):
        self.library, self.publisher, self.device = library, publisher, device
        self.manager = manager  # engine.manager.ModelManager: without one, no SD x4 upscaler is listed
        self._loaded: tuple[tuple, object] | None = None

    def sd_x4_checkpoints(self) -> list[str]:
        """Names of the checkpoints whose family is the SD x4 upscaler (headers and configs only)."""
        if self.manager is None:
            return []
        found = []
        for entry in self.library.entries():
            try:
                if self.manager.facts(entry).info.upscaler:
                    found.append(entry.name)
            except Exception:  # noqa: BLE001 - a file that cannot be identified is not listed here (`app.py models` says why)
                continue
        return found

    def available(self) -> list[Upscaler]:
        return list_upscalers(self.library, self.sd_x4_checkpoints())

    def names(self) -> list[str]:
        return [up.name for up in self.available()]

    def resolve(self, name: str | None) -> Upscaler:
        """The upscaler `name` names (RequestError naming `upscaler` when none does)."""
        wanted = (name or LANCZOS).strip()
        if not wanted.startswith(SD_X4_PREFIX):  # no need to identify every checkpoint
            return resolve_upscaler(self.library, wanted, list_upscalers(self.library))
        return resolve_upscaler(self.library, wanted, self.available())

    def default_tile(self, name: str | None) -> int:
        """The tile an upscaler uses when none is given: the SD x4 upscaler's native 128 input
        pixels (its memory grows fast with the tile), 256 for the others."""
        return SD_X4_TILE if self.resolve(name).sd_x4 else DEFAULT_TILE

    def hires_names(self) -> list[str]:
        """The upscaler models hires fix may enlarge with: the ESRGAN-family files. (Lanczos is one
        of the request's built-ins; the SD x4 upscaler is a diffusion pass of its own, not offered.)"""
        return [up.name for up in list_upscalers(self.library) if up.path is not None]

    def enlarge(self, image: Image.Image, name: str, size: tuple[int, int], job: Job | None = None) -> Image.Image:
        """`image` enlarged to exactly `size` by the upscaler model `name` (hires fix's first pass):
        the model at its own scale, in tiles, then Lanczos to the size asked (as A1111 does).
        `job` is checked for cancel between tiles."""
        chosen = self.resolve(name)
        if chosen.path is None or chosen.sd_x4:
            raise RequestError("hr_upscaler", f"{chosen.name} is not an upscaler model hires fix can use")
        descriptor = self._model(chosen.path)
        req = descriptor.size_requirements
        pixels = _to_tensor(image).to(self.device)
        out = run_tiled(descriptor, pixels, descriptor.scale, DEFAULT_TILE, DEFAULT_OVERLAP,
                        multiple_of=req.multiple_of, minimum=req.minimum, job=job)
        result = _to_image(out)
        del out, pixels
        return result if result.size == tuple(size) else result.resize(tuple(size), Image.LANCZOS)

    def _model(self, path: Path):
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, self.device)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None
            self._loaded = (key, load_model(path, self.device))
        return self._loaded[1]

    def upscale_image(self, image: Image.Image, upscaler: str | None = None, scale=4, tile=None,
                      overlap=None, job: Job | None = None, sd: SdOptions | None = None) -> tuple[Image.Image, str]:
        """The upscaled image (exactly scale x the input) and the upscaler's name, not published.
        `tile` None: the upscaler's own default. `sd`: the SD x4 upscaler's options (others ignore them)."""
        result, chosen, _ = self._upscale(image, upscaler, scale, tile, overlap, job, sd or SdOptions())
        return result, chosen.name

    def _upscale(self, image: Image.Image, upscaler: str | None, scale, tile, overlap, job: Job | None,
                 sd: SdOptions) -> tuple[Image.Image, Upscaler, list[str]]:
        job = job or Job()
        chosen = self.resolve(upscaler)
        if tile is None:
            tile = SD_X4_TILE if chosen.sd_x4 else DEFAULT_TILE
        scale, tile, overlap = check_options(image, scale, tile, overlap)
        started = time.monotonic()
        target = (image.width * scale, image.height * scale)
        notes: list[str] = []

        def report(done: int, total: int) -> None:
            if job.on_progress is not None:
                job.on_progress(ProgressUpdate(step=done, steps=total, batch=0, batches=1,
                                               elapsed=time.monotonic() - started))

        check_cancelled(job)
        if chosen.path is None:
            result = image.convert("RGB").resize(target, Image.LANCZOS)
            report(1, 1)
            return result, chosen, notes
        if chosen.sd_x4:
            result = self._run_sd_x4(image.convert("RGB"), chosen, sd, tile, overlap, job, notes)
        else:
            descriptor = self._model(chosen.path)
            if descriptor.scale < scale:
                raise RequestError("scale", f"{chosen.name} is a {descriptor.scale}x model: it cannot reach {scale}x "
                                            f"(ask {descriptor.scale} or less, or use {LANCZOS})")
            req = descriptor.size_requirements
            pixels = _to_tensor(image).to(self.device)
            out = run_tiled(descriptor, pixels, descriptor.scale, tile, overlap, multiple_of=req.multiple_of,
                            minimum=req.minimum, on_tile=report, job=job)
            result = _to_image(out)
            del out, pixels
        if result.size != target:  # a 4x model asked for 2 or 3: Lanczos down to the asked scale
            result = result.resize(target, Image.LANCZOS)
        return result, chosen, notes

    def _run_sd_x4(self, image: Image.Image, chosen: Upscaler, sd: SdOptions, tile: int, overlap: int,
                   job: Job, notes: list[str]) -> Image.Image:
        """4x by the SD x4 upscaler checkpoint, loaded by the manager for upscaling and held for the run."""
        from engine.sd_upscaler import upscale_sd_x4

        if tile == 0:  # the whole image in one tile
            tile, overlap = max(image.width, image.height, 8), 0
        with self.manager.use(chosen.checkpoint, purpose="upscale") as loaded:
            # Read the pipeline and encoder afresh on each attempt: a step down re-places them.
            return self.manager.with_fallback(loaded, lambda: upscale_sd_x4(
                loaded.pipe, image, prompt=sd.prompt, negative_prompt=sd.negative_prompt, steps=sd.steps,
                noise_level=sd.noise_level, seed=sd.seed, guidance=sd.guidance, tile=tile, overlap=overlap, job=job,
                encoder=loaded.encoder), notes)

    def run(self, image: Image.Image, upscaler: str | None = None, scale=4, tile=None,
            overlap=None, job: Job | None = None, *, save: bool = True, sd: SdOptions | None = None) -> GenerationResult:
        """Upscale and publish: watermark on the final pixels, infotext, atomic save in outputs/upscale."""
        job = job or Job()
        source = read_infotext(image)
        sd = sd or SdOptions()
        result, chosen, notes = self._upscale(image, upscaler, scale, tile, overlap, job, sd)
        scale = int(float(scale))
        infotext = upscale_infotext(source, chosen.name, scale, sd.infotext_fields() if chosen.sd_x4 else None)
        seed = _seed_of(source)
        publication = self.publisher.begin(MODE, save=save, job=job)
        publication.add(result, seed, infotext)
        published = publication.finish()
        notes = (*notes, published.save_error) if published.save_error else tuple(notes)
        return GenerationResult(published.images, (seed,), (infotext,), published.paths, None, notes,
                                published.save_error)
