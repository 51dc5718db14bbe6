"""A1111 "parameters" infotext: build, parse, and carry it in image files.

The text has three parts separated by newlines (see shared/reference/a1111-compat.md):
the prompt (may span lines), an optional `Negative prompt: ...` part, and one last line of
`Key: value` pairs joined by ", ". Every tool that reads A1111 images (A1111 itself, Forge,
ComfyUI importers, civitai) expects exactly this, so the quoting and parsing rules below follow
A1111's `create_infotext` / `parse_generation_parameters` behaviour, not our taste.
"""
from __future__ import annotations

import io
import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.samplers import split_schedule_suffix

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# A1111 only treats the last line as parameters when it holds at least this many pairs; with
# fewer it is the end of the prompt (a prompt line such as "style: ink" must stay a prompt).
MIN_PARAM_PAIRS = 3

# The longest infotext parsed, in characters. A1111's are a few kB (Easel's own at most two
# prompts of MAX_PROMPT_CHARS plus a parameter line); a text over this is not one, and reading
# it would only cost time: it gets no fields (it is still shown as it is).
MAX_PARSED_CHARS = 64 * 1024

# A key as A1111 writes them: starts with a word character, then words, spaces, '-' or '/'.
_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")
_SPACES = re.compile(r"\s*")
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# EXIF tags: the Exif sub-IFD pointer and UserComment inside it (where A1111 puts the text in
# JPEG/WebP files). UserComment starts with an 8-byte character-code prefix.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"


@dataclass(frozen=True)
class InfotextField:
    """One A1111 infotext key and the request field it carries, both ways: the generator writes
    with `params_from_values`, PNG info / send-to reads back with `values_from_params`."""
    key: str                  # as A1111 writes it ("Size" is written WxH and read back as Size-1/Size-2)
    field: str | None         # the request field; None: written for other tools, not read back (Model)
    kind: type = str          # what reading turns the text into
    unset: object = None      # the value A1111 leaves out of the text, and a reader assumes when absent
    written_when: Callable[[Mapping[str, object]], bool] = lambda values: True  # e.g. img2img or hires only
    write: Callable[[object], object] = lambda value: value  # the value as text, when it is not its str()


def _hires(values: Mapping[str, object]) -> bool:
    return bool(values.get("enable_hr"))


def _inpainting(values: Mapping[str, object]) -> bool:
    return values.get("mask") is not None


# A1111's words for the inpainting flags (engine.inpaint keeps the same tables).
_INPAINT_AREAS = {False: "Whole picture", True: "Only masked"}
_MASK_MODES = {False: "Inpaint masked", True: "Inpaint not masked"}


# In A1111's order. Prompt and negative prompt are not pairs of the last line: build_infotext places them.
INFOTEXT_FIELDS = (
    InfotextField("Steps", "steps", int),
    InfotextField("Sampler", "sampler"),
    InfotextField("Schedule type", "schedule_type", unset="Automatic"),
    InfotextField("CFG scale", "cfg_scale", float),
    InfotextField("Seed", "seed", int),
    # The restorer's name, written only when faces were restored; read back, it turns restore_faces on.
    InfotextField("Face restoration", "face_restorer", written_when=lambda v: bool(v.get("restore_faces"))),
    InfotextField("Size-1", "width", int),
    InfotextField("Size-2", "height", int),
    InfotextField("Model hash", None),
    InfotextField("Model", None),
    InfotextField("VAE hash", None),
    # Only a VAE file is written (A1111 leaves "Automatic" out); read back, an absent VAE sets nothing.
    InfotextField("VAE", "vae", written_when=lambda v: v.get("vae") not in (None, "Automatic")),
    InfotextField("Denoising strength", "denoising_strength", float,
                  written_when=lambda v: v.get("mode") == "img2img" or bool(v.get("enable_hr"))),
    InfotextField("Clip skip", "clip_skip", int, unset=1),
    InfotextField("Tiling", "tiling", lambda text: text == "True", unset=False, write=str),
    InfotextField("Hires upscale", "hr_scale", float, written_when=_hires),
    InfotextField("Hires steps", "hr_second_pass_steps", int, unset=0, written_when=_hires),
    InfotextField("Hires upscaler", "hr_upscaler", written_when=_hires),
    InfotextField("Mask blur", "mask_blur", int, written_when=_inpainting),
    InfotextField("Mask mode", "inpainting_mask_invert", lambda text: text == _MASK_MODES[True], unset=False,
                  written_when=_inpainting, write=_MASK_MODES.get),
    InfotextField("Masked content", "inpainting_fill", written_when=_inpainting),
    InfotextField("Inpaint area", "inpaint_full_res", lambda text: text == _INPAINT_AREAS[True],
                  written_when=_inpainting, write=_INPAINT_AREAS.get),
    # A1111's infotext key for the "Only masked padding, pixels" slider (a key cannot hold a comma).
    InfotextField("Masked area padding", "inpaint_full_res_padding", int,
                  written_when=lambda v: _inpainting(v) and bool(v.get("inpaint_full_res"))),
    # "name: hash, ..." of the LoRAs and textual-inversion embeddings a job used (A1111's); the
    # prompt's own <lora:...> tags and words carry them back, so these are not read into a field.
    InfotextField("Lora hashes", None),
    InfotextField("TI hashes", None),
    InfotextField("Speed", "speed", unset="exact"),
    # What ran the UNet, when it was not torch ("openvino"; "openvino int8" with int8 weights;
    # "openvino+torch" when some passes fell back, e.g. a LoRA). A machine's choice, not the
    # request's: not read back into a field.
    InfotextField("Backend", None),
    InfotextField("Version", None),
)
_TEXT_FIELDS = (("Prompt", "prompt"), ("Negative prompt", "negative_prompt"))
_SIZE_KEYS = ("Size-1", "Size-2")


def params_from_values(values: Mapping[str, object], *, model_hash: str | None, model: str | None,
                       version: str, vae_hash: str | None = None,
                       networks: Mapping[str, str] | None = None, backend: str | None = None) -> dict[str, object]:
    """The parameters line's pairs for a request's values (its fields, with `seed` the image's own
    seed and `vae` the VAE used), in A1111's order; values equal to a field's `unset` are left out,
    as A1111 does. `networks`: the "Lora hashes" / "TI hashes" pairs of the job, when it used any;
    `backend`: what ran the UNet, left out for torch."""
    extra = {"Model hash": model_hash, "Model": model, "Version": version, "VAE hash": vae_hash,
             "Lora hashes": None, "TI hashes": None, **(networks or {}),
             "Backend": None if backend in (None, "torch") else backend}
    params: dict[str, object] = {}
    for spec in INFOTEXT_FIELDS:
        if spec.key == _SIZE_KEYS[0]:
            params["Size"] = f"{values['width']}x{values['height']}"
        elif spec.key == _SIZE_KEYS[1]:
            continue
        elif spec.field is None:
            params[spec.key] = extra[spec.key]
        elif not spec.written_when(values):
            continue
        else:
            value = values.get(spec.field)
            params[spec.key] = None if value == spec.unset or value is None else spec.write(value)
    # The other networks' pairs (`ControlNet 0`, ...) go where A1111 puts its extensions' pairs:
    # after its own, before Version.
    more = {k: v for k, v in (networks or {}).items() if k not in params}
    if more:
        keys = list(params)
        at = keys.index("Version") if "Version" in keys else len(keys)
        params = {**{k: params[k] for k in keys[:at]}, **more, **{k: params[k] for k in keys[at:]}}
    return params


def values_from_params(parsed: Mapping[str, object]) -> dict[str, object]:
    """Request field values from `parse_infotext`'s result; a value that does not parse is left
    out. With a prompt present, fields A1111 leaves out when unset take their unset value."""
    values: dict[str, object] = {field: parsed[key] for key, field in _TEXT_FIELDS if key in parsed}
    for spec in INFOTEXT_FIELDS:
        if spec.field is None or spec.key not in parsed:
            continue
        try:
            raw = parsed[spec.key]
            values[spec.field] = spec.kind(float(raw)) if spec.kind is int else spec.kind(raw)
        except (TypeError, ValueError):
            continue
    if "prompt" in values:
        values.setdefault("negative_prompt", "")
        values["enable_hr"] = "hr_scale" in values  # A1111 writes the Hires keys only when it was on
        values["restore_faces"] = "face_restorer" in values  # likewise "Face restoration"
        for spec in INFOTEXT_FIELDS:
            if spec.field is not None and spec.unset is not None and spec.written_when(values):
                values.setdefault(spec.field, spec.unset)
    return values


def quote(value) -> str:
    """The value as A1111 writes it: JSON-quoted only when it holds ',', ':' or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The full infotext; params keep their given order, None values are left out."""
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if _KEY.fullmatch(f"{key}:") is None or key != key.strip():
            raise ValueError(f"infotext key {key!r} must be words, spaces, '-' or '/'")
        # A1111 writes a flag whose value equals its key as the bare key.
        pairs.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    # A1111 strips the whole text, so an empty prompt leaves no blank first line.
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def _scan_pairs(line: str) -> list[tuple[str, str]]:
    """`Key: value` pairs of a parameters line; quoted values are decoded, bare words skipped.
    Linear in the line's length: it moves forward through one string and copies only values."""
    pairs = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(line):
        key_match = _KEY.match(line, pos)
        if key_match is None:
            # Not a pair (e.g. a bare flag); skip to the next comma like A1111's regex does.
            comma = line.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        key, pos = key_match.group(1).strip(), key_match.end()
        value = None
        if line.startswith('"', pos):
            try:
                decoded, end = decoder.raw_decode(line, pos)
            except ValueError:
                decoded = None
            if isinstance(decoded, str):
                after = _SPACES.match(line, end).end()  # no copy of the rest of the line
                if after == len(line) or line.startswith(",", after):
                    value, pos = decoded, after + 1
        if value is None:
            comma = line.find(",", pos)
            end = len(line) if comma < 0 else comma
            value, pos = line[pos:end].strip(), end + 1
        pairs.append((key, value))
    return pairs


def _split_old_sampler(result: dict[str, object]) -> None:
    """Read pre-1.9 "DPM++ 2M Karras" as Sampler "DPM++ 2M" + Schedule type "Karras"."""
    sampler = result.get("Sampler")
    if not isinstance(sampler, str) or "Schedule type" in result:
        return
    base, schedule = split_schedule_suffix(sampler)
    if schedule is not None:
        result["Sampler"], result["Schedule type"] = base, schedule


def parse_infotext(text: str) -> dict[str, object]:
    """Fields of an infotext: Prompt, Negative prompt, then each key as written (values are
    strings); `Size: WxH` becomes Size-1/Size-2 as A1111 does. A text over MAX_PARSED_CHARS is
    not read: {} (no fields)."""
    if len(text) > MAX_PARSED_CHARS:
        return {}
    *lines, last = text.strip().split("\n")
    pairs = _scan_pairs(last)
    if len(pairs) < MIN_PARAM_PAIRS:
        lines.append(last)
        pairs = []

    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)

    result: dict[str, object] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    _split_old_sampler(result)
    return result


# Bidirectional overrides/isolates: they reorder how text is shown (so a prompt can read as
# something it is not); shown escaped like control characters.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Text read from a file, made safe to print or show: line ends become "\n", and control
    characters other than tab and newline (ESC, NUL, ...) and bidi overrides are written as visible
    escapes (`\x1b`, `\u202e`), so a crafted image cannot drive the terminal that prints it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for char in text:
        if char in "\t\n":
            out.append(char)
        elif char in _BIDI_CONTROLS or unicodedata.category(char) == "Cc":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def write_png_with_infotext(image: Image.Image, infotext: str | None) -> bytes:
    """PNG bytes of the image with a "parameters" text chunk (iTXt when not latin-1, via
    Pillow's PngInfo); no chunk when infotext is None."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    info = None
    if infotext is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _decode_user_comment(raw) -> str | None:
    if isinstance(raw, str):
        return raw.rstrip("\x00") or None
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 8:
        return None
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    if prefix == _UNICODE_PREFIX:
        # A1111 (piexif) writes UTF-16 big-endian; some tools write little-endian. For text
        # that is mostly ASCII the zero bytes sit at even offsets in BE and odd offsets in LE.
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            big_endian = body[0::2].count(0) >= body[1::2].count(0)
            text = body.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    elif prefix == _ASCII_PREFIX:
        text = body.decode("ascii", errors="replace")
    else:
        text = body.decode("utf-8", errors="replace")
    return text.rstrip("\x00") or None


def read_infotext(source: str | Path | Image.Image) -> str | None:
    """The "parameters" text of a PNG, or the EXIF UserComment of a JPEG/WebP; None if absent."""
    if isinstance(source, Image.Image):
        return _read_from_image(source)
    with Image.open(source) as image:
        return _read_from_image(image)


def _read_from_image(image: Image.Image) -> str | None:
    text = image.info.get(PARAMETERS_KEY)
    if text is None and isinstance(image, PngImagePlugin.PngImageFile):
        # Text chunks after the image data are only read once the file is loaded.
        text = image.text.get(PARAMETERS_KEY)
    if isinstance(text, str):
        return text
    try:
        exif = image.getexif()
    except Exception:  # a broken EXIF block is no reason to fail reading the image
        return None
    return _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT))
