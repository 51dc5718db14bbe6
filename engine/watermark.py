"""Invisible watermark that marks images as made by Easel (invisible-watermark, "dwtDct").

dwtDct is the method the original SD scripts and A1111 use: a Haar DWT of the U (chroma)
channel, then one bit per 4x4 block of the half-size approximation band, the message repeated
over all blocks and decoded by majority vote. It survives PNG round trips and costs ~15 ms at
256 px, ~70 ms at 512 px on one core.

Embedding runs the library's own per-block step (`EmbedMaxDct.encode_frame`, scale 36 on U, as
`WatermarkEncoder.encode(..., "dwtDct")` does) but does the DWT round trip here, because
imwatermark 0.2.0's `encode` rebuilds the channel with the horizontal and vertical detail bands
swapped and truncates to uint8. On textured 512 px images that costs PSNR 29.5 dB (blue channel
off by up to 90 levels, i.e. visible); with the bands in order and rounding it is 41.5 dB
(max 32 levels). The approximation band that carries the bits is the same either way, so
`WatermarkDecoder` (ours and anyone's) reads the same bits, measured identical detection rates.
"""
from __future__ import annotations

import cv2
import numpy as np
import pywt
from PIL import Image

from engine.errors import EaselError

try:
    from imwatermark import WatermarkDecoder
    from imwatermark.maxDct import EmbedMaxDct
except ImportError:  # `pip install .` cannot bring it (see MISSING); the launcher's installer does
    WatermarkDecoder = EmbedMaxDct = None

# invisible-watermark's metadata asks for opencv-python, which needs the system's libGL, so Easel
# lists opencv-python-headless instead and installs invisible-watermark without its dependencies.
MISSING = ("invisible-watermark is not installed: run `pip install --no-deps invisible-watermark==0.2.0` "
           "(./launch.sh does it for you; --no-deps because it would pull opencv-python, which needs libGL)")

WATERMARK_TEXT = "Easel"
METHOD = "dwtDct"
_SCALE = 36  # imwatermark's default dwtDct strength on the U channel (scales=[0, 36, 36])
_BLOCK = 4   # imwatermark's default block size in the DWT band
_CROP = 4    # imwatermark marks (and reads) the image cropped to a multiple of 4 pixels

# Smallest width AND height we embed into. The library itself refuses images under 256*256
# pixels in area; asking for 256 on both sides keeps every accepted image clear of that check and
# gives each of the 40 bits of "Easel" at least 1024/40 ~ 25 block votes. Measured (12 images per
# kind, see MATCH_THRESHOLD): at 256x256 textured images read back with >= 95% of bits right.
MIN_SIZE = 256

# Share of watermark bits that must match to call the mark found. Measured on 256 and 512 px
# images (random noise, smooth noise upscaled 8x and 32x, linear gradients, flat colours):
# - images without the mark matched at most 70% of bits (random agreement centres on 50%);
# - marked textured images matched >= 95% (noise, 8x smooth noise); 32x smooth noise matched
#   >= 80% at 256 px (median 91%) and >= 95% at 512 px.
# 85% (34 of 40 bits) sits between the two; if the bits were coin flips a clean image would pass
# with probability ~4e-6. Flat colours and long smooth gradients cannot hold the mark at any
# size (the library's "0" bits decode at chance where a 4x4 block has no dominant coefficient),
# so detect() honestly answers False for them; generated images are textured.
MATCH_THRESHOLD = 0.85


def _to_bgr(image: Image.Image) -> np.ndarray:
    # imwatermark works on OpenCV's BGR uint8 arrays.
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


class Watermarker:
    """Embeds and detects one fixed text. Holds no state beyond the text's bits."""

    def __init__(self, text: str = WATERMARK_TEXT):
        if WatermarkDecoder is None:
            raise EaselError(MISSING)
        payload = text.encode("utf-8")
        if not payload:
            raise ValueError("watermark text must not be empty")
        self.text = text
        self.min_size = MIN_SIZE
        self._bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(bool)

    def fits(self, image: Image.Image) -> bool:
        """Whether the image is large enough to carry the mark."""
        return min(image.size) >= self.min_size

    def embed(self, image: Image.Image) -> Image.Image:
        """A new watermarked image (RGB, or RGBA keeping the alpha); too-small images come back
        as an unchanged copy."""
        if not self.fits(image):
            return image.copy()
        yuv = cv2.cvtColor(_to_bgr(image), cv2.COLOR_BGR2YUV)
        rows, cols = yuv.shape[0] // _CROP * _CROP, yuv.shape[1] // _CROP * _CROP
        approx, details = pywt.dwt2(yuv[:rows, :cols, 1].astype(np.float64), "haar")
        EmbedMaxDct(self._bits.astype(int).tolist(), wmLen=len(self._bits), block=_BLOCK).encode_frame(approx, _SCALE)
        yuv[:rows, :cols, 1] = np.clip(np.rint(pywt.idwt2((approx, details), "haar")), 0, 255)
        marked = Image.fromarray(cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB))
        if "A" in image.getbands():
            marked.putalpha(image.getchannel("A"))
        return marked

    def match_ratio(self, image: Image.Image) -> float | None:
        """Share of the mark's bits read back from the image; None if too small to tell."""
        if not self.fits(image):
            return None
        decoder = WatermarkDecoder("bits", len(self._bits))
        read = np.asarray(decoder.decode(_to_bgr(image), METHOD), dtype=bool)
        return float((read == self._bits).mean())

    def detect(self, image: Image.Image) -> bool | None:
        """True: our mark is there; False: it is not; None: image too small to tell."""
        ratio = self.match_ratio(image)
        return None if ratio is None else ratio >= MATCH_THRESHOLD
