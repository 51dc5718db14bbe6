"""ControlNet preprocessors ("modules", sd-webui-controlnet's names): a picture in, the control map
the ControlNet was trained on out (an edge map, a threshold mask, the picture itself).

The ones here need no weights: OpenCV (cv2.Canny) and Pillow do the work. Each takes the unit's
`processor_res` and `threshold_a`/`threshold_b` as sd-webui-controlnet reads them. The annotators
that need networks (depth, openpose, lineart, softedge, normal) are refused by name until their
weights can come through the download catalogue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[[Image.Image, int, float, float], Image.Image]  # (picture, resolution, a, b) -> map
    threshold_a: tuple[str, float, float, float] | None = None  # (label, default, low, high)
    threshold_b: tuple[str, float, float, float] | None = None
    default_res: int = 512
    uses_resolution: bool = True


def _cv2():
    import cv2

    return cv2


def at_resolution(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """sd-webui-controlnet's resize_image_with_pad: the picture with its short side at `resolution`
    (cubic when enlarging, area when shrinking), its edges repeated out to a multiple of 64; and the
    size to crop the map back to."""
    cv2 = _cv2()
    h, w = pixels.shape[:2]
    k = resolution / min(h, w)
    nh, nw = max(1, round(h * k)), max(1, round(w * k))
    pixels = cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    ph, pw = -nh % 64, -nw % 64
    return np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge"), (nh, nw)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _none(image: Image.Image, _res: int, _a: float, _b: float) -> Image.Image:
    return image.convert("RGB")


def _invert(image: Image.Image, _res: int, _a: float, _b: float) -> Image.Image:
    """A white-background drawing made the black-background map line ControlNets take."""
    return ImageOps.invert(image.convert("RGB"))


def _canny(image: Image.Image, res: int, low: float, high: float) -> Image.Image:
    padded, (h, w) = at_resolution(_rgb(image), res)
    edges = _cv2().Canny(padded, int(low), int(high))[:h, :w]
    return Image.fromarray(edges).convert("RGB")


def _threshold(image: Image.Image, res: int, level: float, _b: float) -> Image.Image:
    """White where every channel is above `level` (0-255), black elsewhere."""
    padded, (h, w) = at_resolution(_rgb(image), res)
    mask = padded[:h, :w].min(axis=2) > level
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")


def _scribble_xdog(image: Image.Image, res: int, level: float, _b: float) -> Image.Image:
    """A scribble from the picture's edges: the difference of two Gaussian blurs (sigma 0.5 and 5),
    white where it is over `level` (sd-webui-controlnet's scribble_xdog)."""
    cv2 = _cv2()
    padded, (h, w) = at_resolution(_rgb(image), res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    mask = 2 * (255 - dog.astype(np.int32)) > level
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)[:h, :w]).convert("RGB")


def _tile_resample(image: Image.Image, _res: int, down: float, _b: float) -> Image.Image:
    """The picture shrunk by `down` (the tile ControlNet adds the detail back); under 1.1, as it is."""
    pixels = _rgb(image)
    if down < 1.1:
        return Image.fromarray(pixels)
    h, w = pixels.shape[:2]
    size = (max(1, int(w / down)), max(1, int(h / down)))
    return Image.fromarray(_cv2().resize(pixels, size, interpolation=_cv2().INTER_AREA))


PREPROCESSORS = {p.name: p for p in (
    Preprocessor("none", _none, uses_resolution=False),
    Preprocessor("invert", _invert, uses_resolution=False),
    Preprocessor("canny", _canny, ("Canny Low Threshold", 100, 1, 255), ("Canny High Threshold", 200, 1, 255)),
    Preprocessor("threshold", _threshold, ("Binarization Threshold", 127, 0, 255)),
    Preprocessor("scribble_xdog", _scribble_xdog, ("XDoG Threshold", 32, 1, 64)),
    Preprocessor("tile_resample", _tile_resample, ("Down Sampling Rate", 1.0, 1.0, 8.0), uses_resolution=False),
)}
# sd-webui-controlnet's modules that need annotator networks: named so a request for one gets a clear refusal.
NEEDS_WEIGHTS = ("depth", "depth_midas", "depth_anything", "openpose", "openpose_full", "lineart", "lineart_realistic",
                 "softedge_hed", "softedge_pidinet", "normal_bae", "mlsd", "seg_ofade20k", "inpaint_only",
                 "scribble_hed", "scribble_pidinet", "shuffle", "reference_only")


def preprocess(name: str, image: Image.Image, resolution: int, threshold_a: float | None,
               threshold_b: float | None) -> Image.Image:
    """The control map of `image` by the preprocessor `name` (validated: a key of PREPROCESSORS)."""
    p = PREPROCESSORS[name]
    a = p.threshold_a[1] if threshold_a is None and p.threshold_a else threshold_a
    b = p.threshold_b[1] if threshold_b is None and p.threshold_b else threshold_b
    return p.run(image, resolution, a, b)
