"""Opening images that come from outside (uploads, CLI files, base64 in API requests), safely.

Every door that takes an image (CLI --init-img and pnginfo, the UI's img2img upload and PNG info,
the HTTP API) goes through `open_image` (or `decode_base64_image`), which refuses, with one
`RequestError` line naming the field:
- more than MAX_INPUT_BYTES of file, checked before anything is parsed;
- a header that claims more than MAX_INPUT_PIXELS pixels, checked after Pillow has read the header
  and BEFORE any pixel is decoded (a 420 KB PNG can claim 12000x12000 = 432 MB of RGB);
- text chunks over Pillow's bounds (PngImagePlugin.MAX_TEXT_CHUNK per chunk, MAX_TEXT_MEMORY in
  all): a zTXt bomb stops at the bound instead of inflating;
- zero-byte, truncated, corrupt and non-image files.

What comes back is a decoded RGB image: EXIF rotation applied; 16-bit greyscale scaled (not
clipped) to 8 bits; CMYK, palette and greyscale converted; transparency (LA, RGBA, palette with
transparency) flattened onto white, as A1111 does for img2img. Animated images (GIF, APNG, WebP):
the first frame is used. The file's text metadata (PNG text chunks, EXIF) stays in `.info`, so
`engine.infotext.read_infotext` works on the result.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin

from engine.errors import RequestError

MAX_INPUT_BYTES = 50 * 1024 * 1024  # a file this big is no init image or PNG-info input
# A 24-megapixel photo (6000x4000) still opens: img2img shrinks it into the request's pixel budget
# (engine.request.MAX_PIXELS). Decoded as RGB that is at most 72 MB (twice that while converting).
MAX_INPUT_PIXELS = 24_000_000
# Text chunks: Pillow's own bounds (1 MB per decompressed chunk, 64 MB in all), named here so the
# tests and the messages use the same numbers.
MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_CHUNK
MAX_TEXT_MEMORY = PngImagePlugin.MAX_TEXT_MEMORY
BACKGROUND = (255, 255, 255)  # what transparent pixels become

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def describe_source(source: Any) -> str:
    """A short printable name for the input, for messages (never raw control characters)."""
    if isinstance(source, (str, Path)):
        name = Path(source).name or str(source)
    elif isinstance(source, (bytes, bytearray)):
        name = "the uploaded data"
    else:
        name = "the image"
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name)


def open_image(source: Any, field: str = "image", *, max_bytes: int = MAX_INPUT_BYTES,
               max_pixels: int = MAX_INPUT_PIXELS, keep_alpha: bool = False) -> Image.Image:
    """A decoded RGB image from a path, bytes, a binary file object or an already decoded PIL
    image (its size is still checked); refusals are RequestError(field, one line). `keep_alpha`:
    an image with transparency comes back RGBA instead of flattened (an inpainting mask painted
    on a transparent layer is its alpha)."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, field, max_pixels, describe_source(source))
        return _to_rgb(source, field, describe_source(source), keep_alpha)
    name = describe_source(source)
    data = _read_bounded(source, field, max_bytes, name)
    if not data:
        raise RequestError(field, f"{name} is empty (0 bytes); expected a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own MAX_IMAGE_PIXELS and raises above twice that; we check
            # our (lower) limit ourselves right after the header, so neither applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: refused in the header too
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise RequestError(field, f"{name} claims {claimed.group(1) if claimed else 'too many'} pixels; "
                                  f"at most {max_pixels} are allowed (e.g. 6000x4000)") from None
    except Image.UnidentifiedImageError:
        raise RequestError(field, f"{name} is not an image Easel can read (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except ValueError as e:  # Pillow's text-chunk bounds, hit while reading the header
        raise _decode_error(field, name, e) from None
    except Exception as e:  # noqa: BLE001 - any failure parsing an outside file is that file's fault
        raise _decode_error(field, name, e) from None
    _check_pixels(image.size, field, max_pixels, name)
    try:
        image.seek(0)  # animated: the first frame
        image.load()
        info = dict(image.info)
        if isinstance(image, PngImagePlugin.PngImageFile):
            info.update(image.text)  # text chunks after the image data, read by load()
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, text-chunk bomb after the pixels
        raise _decode_error(field, name, e) from None
    image.info = info
    return _to_rgb(image, field, name, keep_alpha)


def decode_base64_image(text: Any, field: str = "image", *, max_bytes: int = MAX_INPUT_BYTES,
                        max_pixels: int = MAX_INPUT_PIXELS, keep_alpha: bool = False) -> Image.Image:
    """An image from base64 text (a bare string or a `data:image/...;base64,` URL), for the HTTP API;
    `keep_alpha` as for `open_image` (an inpainting mask)."""
    if not isinstance(text, str):
        raise RequestError(field, f"must be base64 text, got {type(text).__name__}")
    body = _DATA_URL.sub("", text.strip(), count=1)
    body = re.sub(r"\s+", "", body)
    if len(body) > (max_bytes + 2) // 3 * 4:
        raise RequestError(field, f"is over {max_bytes // (1024 * 1024)} MB once decoded; "
                                  f"at most {max_bytes} bytes are allowed")
    if not body:
        raise RequestError(field, "is empty; expected a base64-encoded PNG, JPEG or WebP image")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64 (expected a base64-encoded PNG, JPEG or WebP image)") from None
    return open_image(data, field, max_bytes=max_bytes, max_pixels=max_pixels, keep_alpha=keep_alpha)


def _read_bounded(source: Any, field: str, max_bytes: int, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise _too_big(field, name, len(data), max_bytes)
        return data
    if isinstance(source, (str, Path)):
        try:
            size = os.stat(source).st_size
            if size > max_bytes:
                raise _too_big(field, name, size, max_bytes)
            with open(source, "rb") as f:
                data = _read_upto(f, max_bytes + 1)
        except RequestError:
            raise
        except FileNotFoundError:
            raise RequestError(field, f"{name} does not exist") from None
        except IsADirectoryError:
            raise RequestError(field, f"{name} is a folder, not an image file") from None
        except OSError as e:
            raise RequestError(field, f"cannot read {name}: {e.strerror or type(e).__name__}") from None
    elif hasattr(source, "read"):
        data = _read_upto(source, max_bytes + 1)
    else:
        raise RequestError(field, f"must be an image file, got {type(source).__name__}")
    if len(data) > max_bytes:
        raise _too_big(field, name, len(data), max_bytes)
    return data


def _read_upto(stream, limit: int) -> bytes:
    """At most `limit` bytes, read in pieces (read(limit) would reserve `limit` bytes up front)."""
    parts, total = [], 0
    while total < limit:
        piece = stream.read(min(1 << 20, limit - total))
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)


def _too_big(field: str, name: str, size: int, max_bytes: int) -> RequestError:
    return RequestError(field, f"{name} is over {max_bytes} bytes ({max_bytes // (1024 * 1024)} MB); "
                               f"a smaller file is needed")


def _check_pixels(size: tuple[int, int], field: str, max_pixels: int, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise RequestError(field, f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise RequestError(field, f"{name} is {width}x{height} = {width * height} pixels; at most {max_pixels} "
                                  f"are allowed (e.g. 6000x4000)")


def _decode_error(field: str, name: str, error: Exception) -> RequestError:
    text = str(error)
    if "MAX_TEXT_CHUNK" in text or "too large" in text.lower():
        return RequestError(field, f"{name} has a text chunk over {MAX_TEXT_CHUNK} bytes once decompressed; "
                                   f"at most {MAX_TEXT_CHUNK} are allowed")
    if "text chunks" in text.lower() or "MAX_TEXT_MEMORY" in text:
        return RequestError(field, f"{name} has over {MAX_TEXT_MEMORY} bytes of text chunks; "
                                   f"at most {MAX_TEXT_MEMORY} are allowed")
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return RequestError(field, f"{name} is truncated (the file ends before the image does)")
    return RequestError(field, f"{name} is corrupt or not a supported image ({type(error).__name__})")


def _to_rgb(image: Image.Image, field: str, name: str, keep_alpha: bool = False) -> Image.Image:
    info = dict(image.info)
    try:
        if image.mode in _SIXTEEN_BIT:
            # 16-bit greyscale: scale 0..65535 down to 0..255 (a plain convert would clip to white).
            image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        elif image.mode == "F":
            image = image.point(lambda v: v).convert("L")
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("LA", "La", "PA"):
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "RGBa") and keep_alpha:
            image = image.convert("RGBA")
        elif image.mode in ("RGBA", "RGBa"):
            flat = Image.new("RGB", image.size, BACKGROUND)
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        elif image.mode != "RGB":
            image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert is the file's fault
        raise RequestError(field, f"{name} has an image mode Easel cannot use ({image.mode}: {type(e).__name__})") from None
    image.info = info
    return image

