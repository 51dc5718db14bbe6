"""Reading weight files from strangers without running their code or exhausting memory.

Every model file Easel reads (checkpoints, and the VAE, upscaler, LoRA and embedding files) comes
through here. Two formats:

- `.safetensors`: the 8-byte header length is checked against the file size and a cap before
  anything is allocated, a pickle or zip wearing the name is recognised by its first bytes, and
  only then does the safetensors library parse the header (it checks that every tensor's bytes
  lie inside the file).
- `.ckpt/.pt/.pth/.bin` (pickles, zip or legacy PyTorch format): the pickle program is first read
  opcode by opcode without executing it (`scan_pickle`), so a file that would call anything is
  refused by name ("it would call os.system"), lengths that run past the end of the file are
  refused before they are read, and only a file that names nothing but tensors and plain
  containers reaches `torch.load(weights_only=True)`, torch's own restricted unpickler.

Weights one level down are found the same way for every kind (`unwrap_weights`): BasicSR's
`params_ema`/`params`, Lightning's `state_dict`, `model`, DeepSpeed's `module`, and DataParallel's
`module.` key prefix (safetensors files too).

Bad files raise `UnsafeCheckpointError` (it would run code) or `UnknownCheckpointError` (cannot be
read), each one line naming the file; `inspect_weights` turns those into a reason, for listings.
"""
from __future__ import annotations

import _compat_pickle
import io
import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EaselError, UnknownCheckpointError, UnsafeCheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# The safetensors library refuses headers over 100 MB itself; checked here first, so the number in
# the file never reaches an allocation. A real SDXL checkpoint's header is about 200 KB.
MAX_SAFETENSORS_HEADER = 100_000_000
# torch reads a zip checkpoint's data.pkl into memory whole; a real one is well under 10 MB.
MAX_PICKLE_PROGRAM = 256 * 1024 * 1024
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of PyTorch's pre-1.6 (non-zip) format
_SHOWN_NAMES = {"posix": "os", "nt": "os", "__builtin__": "builtins"}


def weight_format(path: Path) -> str:
    """"safetensors" or "pickle" by the file's suffix; UnknownCheckpointError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise UnknownCheckpointError(
        f"{Path(path).name}: unsupported checkpoint type '{suffix}' (allowed: {', '.join(WEIGHT_SUFFIXES)})")


def _first_sentence(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _regular_file(path: Path) -> int:
    """The file's size; a directory, a missing file or an unreadable one is refused by name."""
    if path.is_dir():
        raise UnknownCheckpointError(f"{path.name}: is a folder, not a weights file")
    try:
        return path.stat().st_size
    except OSError as e:
        raise UnknownCheckpointError(f"{path.name}: cannot be read ({e.strerror or type(e).__name__})") from None


# --- safetensors ---------------------------------------------------------------------------------

def check_safetensors_header(path: Path) -> int:
    """The header's length, after checking it fits the file: nothing is allocated from it before."""
    path = Path(path)
    size = _regular_file(path)
    if size < 8:
        raise UnknownCheckpointError(f"{path.name}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    with open(path, "rb") as f:
        head = f.read(8)
    length = struct.unpack("<Q", head)[0]
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        # A pickle or a zip wearing the name shows itself here: its first bytes make a nonsense length.
        if head.startswith(b"PK\x03\x04"):
            raise UnknownCheckpointError(
                f"{path.name}: not a safetensors file: it is a zip (PyTorch) archive with a .safetensors name; not read")
        if head[0] == 0x80 and 2 <= head[1] <= 5 or head[:1] in (b"c", b"(", b"}", b"]"):
            raise UnknownCheckpointError(f"{path.name}: not a safetensors file: it is a pickle with a .safetensors name; not read")
    if length > MAX_SAFETENSORS_HEADER:
        raise UnknownCheckpointError(
            f"{path.name}: not a usable safetensors file: its header claims {length} bytes (the limit is {MAX_SAFETENSORS_HEADER})")
    if 8 + length > size:
        raise UnknownCheckpointError(
            f"{path.name}: truncated safetensors file: its header claims {length} bytes but the file has {size - 8} after the length")
    return length


def _check_tensor_extents(path: Path, length: int) -> None:
    """Refuse a header whose tensors claim bytes the file does not have, saying how many."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UnknownCheckpointError(f"{path.name}: not a usable safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UnknownCheckpointError(f"{path.name}: not a usable safetensors file: its header is not a JSON object")
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]
    claimed = max((e for e in ends if isinstance(e, int)), default=0)
    if claimed > size - 8 - length:
        raise UnknownCheckpointError(
            f"{path.name}: truncated or forged safetensors file: its tensors claim {claimed} bytes "
            f"but the file holds {size - 8 - length}")


def _safetensors_error(path: Path, error: Exception) -> UnknownCheckpointError:
    text = _first_sentence(error).replace("Error while deserializing header: ", "")
    return UnknownCheckpointError(f"{path.name}: not a usable safetensors file ({text})")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    _check_tensor_extents(path, check_safetensors_header(path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return _strip_parallel_prefix({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except (SafetensorError, OSError, ValueError) as e:
        raise _safetensors_error(path, e) from None


def _safetensors_tensors(path: Path) -> dict:
    _check_tensor_extents(path, check_safetensors_header(path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return _strip_parallel_prefix(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise _safetensors_error(path, e) from None


# --- pickles -------------------------------------------------------------------------------------

class _Malformed(Exception):
    pass


class _Reader:
    """Reads a pickle program, refusing any length that runs past what is left of it."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int) -> bytes:
        if n < 0 or n > self.left:
            raise _Malformed(f"it claims {n} bytes where only {self.left} are left")
        data = self.f.read(n)
        if len(data) != n:
            raise _Malformed("it ends early")
        self.left -= n
        return data

    def skip(self, n: int) -> None:
        if n < 0 or n > self.left:
            raise _Malformed(f"it claims {n} bytes where only {self.left} are left")
        while n:
            step = min(n, 1 << 20)
            self.read(step)
            n -= step

    def line(self) -> bytes:
        data = self.f.readline(min(self.left, 1 << 16))
        if not data.endswith(b"\n"):
            raise _Malformed("a text argument has no end")
        self.left -= len(data)
        return data[:-1]


_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_LENGTH_FORMATS = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                   pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "UNICODE", "STRING"}
_MARK = object()


def _global_name(module: str, name: str) -> str:
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as torch maps them
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _text(data: bytes | None, opname: str) -> str | None:
    if data is None:
        return None
    text = data.decode("utf-8", "replace")
    if opname == "STRING" and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def _scan_one(r: _Reader, globals_: list[str]) -> int | None:
    """Walk one pickle program to its STOP without running it. Every global it names (GLOBAL, INST,
    STACK_GLOBAL) goes into `globals_`; one whose name is computed, not written, is "?". Returns the
    program's value when it is a lone integer (the legacy format's magic number), else None."""
    stack: list = []
    memo: dict = {}
    lone_int = None
    while True:
        code = r.read(1) if r.left else b""
        if not code:
            raise _Malformed("it ends before its STOP instruction")
        op = _OPCODES.get(code)
        if op is None:
            raise _Malformed(f"byte 0x{code[0]:02x} is not a pickle instruction")
        data = None
        if op.name in ("GLOBAL", "INST"):
            module, name = r.line().decode("utf-8", "replace"), r.line().decode("utf-8", "replace")
            globals_.append(_global_name(module, name))
        elif op.arg is not None:
            n = op.arg.n
            if n >= 0:
                data = r.read(n)
            elif n == pickletools.UP_TO_NEWLINE:
                data = r.line()
            else:
                fmt = _LENGTH_FORMATS[n]
                length = struct.unpack(fmt, r.read(struct.calcsize(fmt)))[0]
                if length <= 4096:
                    data = r.read(length)
                else:
                    r.skip(length)
        name = op.name
        if name == "STOP":
            return lone_int if len(stack) == 1 else None
        if name == "STACK_GLOBAL":
            parts = stack[-2:] if len(stack) >= 2 else []
            resolved = len(parts) == 2 and all(isinstance(p, str) for p in parts)
            globals_.append(_global_name(*parts) if resolved else "?")
        elif name.startswith("EXT"):
            globals_.append("?")
        if name in ("MEMOIZE",):
            memo[len(memo)] = stack[-1] if stack else None
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[data if name == "PUT" else int.from_bytes(data, "little")] = stack[-1] if stack else None
            continue
        # Model the stack just well enough to know the two strings STACK_GLOBAL takes.
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if not stack:
                raise _Malformed("it pops a mark it never set")
            stack.pop()
            del stack[len(stack) - before.index(pickletools.markobject):]
        else:
            if len(stack) < len(before):
                raise _Malformed("it takes more values than it has")
            del stack[len(stack) - len(before):]
        if name == "MARK":
            stack.append(_MARK)
        elif name in _STRINGS:
            stack.append(_text(data, name))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(data if name == "GET" else int.from_bytes(data, "little")))
        else:
            stack.extend([None] * len(after))
        if name == "LONG1" and data is not None:
            lone_int = int.from_bytes(data, "little", signed=True)
            stack[-1] = lone_int


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def _shown(global_name: str) -> str:
    module, _, name = global_name.rpartition(".")
    return f"{_SHOWN_NAMES.get(module, module)}.{name}"


def _pickle_programs(path: Path, size: int):
    """(reader, how many programs to walk) for each pickle torch would unpickle from this file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            programs = [i for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if not programs:
                raise _Malformed("a zip archive without a PyTorch data.pkl")
            for info in programs:
                if info.file_size > MAX_PICKLE_PROGRAM:
                    raise _Malformed(f"its data.pkl claims {info.file_size} bytes")
                with archive.open(info) as f:
                    yield _Reader(f, info.file_size), False
        return
    with open(path, "rb") as f:
        yield _Reader(io.BufferedReader(f), size), True


def scan_pickle(path: Path) -> None:
    """Refuse a pickle file that names anything beyond tensors and plain containers, or that is
    malformed, without executing any of it. Raises UnsafeCheckpointError / UnknownCheckpointError."""
    path = Path(path)
    size = _regular_file(path)
    if size == 0:
        raise UnknownCheckpointError(f"{path.name}: cannot be read as a PyTorch checkpoint (the file is empty)")
    named: list[str] = []
    try:
        for reader, legacy in _pickle_programs(path, size):
            value = _scan_one(reader, named)
            if legacy and value == _LEGACY_MAGIC:
                for _ in range(4):  # protocol version, system info, the objects, the storage keys
                    _scan_one(reader, named)
    except (_Malformed, zipfile.BadZipFile, OSError, struct.error, UnicodeDecodeError, EOFError) as e:
        # A refused global found before the damage still says more than the damage.
        _refuse(path, named)
        raise UnknownCheckpointError(f"{path.name}: cannot be read as a PyTorch checkpoint ({_first_sentence(e)})") from None
    _refuse(path, named)


def _refuse(path: Path, named: list[str]) -> None:
    allowed = _allowed_globals()
    for name in named:
        if name == "?":
            raise UnsafeCheckpointError(
                f"{path.name}: refused: this pickle computes the name of a function it would call; "
                "Easel never runs code from a model file (use a .safetensors version)")
        if name not in allowed:
            raise UnsafeCheckpointError(
                f"{path.name}: refused: this pickle would call {_shown(name)}; "
                "Easel never runs code from a model file (use a .safetensors version)")


def _pickle_object(path: Path):
    """What the pickle holds, through scan_pickle and then torch's restricted unpickler."""
    import pickle
    import re

    import torch

    scan_pickle(path)
    try:
        # weights_only=True: torch's restricted unpickler, a second wall behind scan_pickle.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        match = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if match:
            raise UnsafeCheckpointError(
                f"{path.name}: refused: this pickle would call {match.group(1)}; "
                "Easel never runs code from a model file (use a .safetensors version)") from None
        inner = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
        why = inner.group(1).rstrip(".") if inner else _first_sentence(e)
        raise UnknownCheckpointError(f"{path.name}: cannot be read as a PyTorch checkpoint ({why})") from None
    except MemoryError:
        raise UnknownCheckpointError(f"{path.name}: cannot be read: it claims more memory than there is") from None
    except Exception as e:  # noqa: BLE001 - a hostile file may break torch's reader in any way; none escapes
        raise UnknownCheckpointError(f"{path.name}: cannot be read as a PyTorch checkpoint ({_first_sentence(e)})") from None
    return obj


# Where releases keep their weights one level down, best first at each level: BasicSR's releases
# (RealESRGAN, RealESRNet, SwinIR, many OpenModelDB files) hold `params_ema` and/or `params`, and
# BasicSR itself loads `params_ema` when both are there; Lightning and the original LDM checkpoints
# nest `state_dict` (beside `global_step`, `epoch`, optimizer states); some trainers save
# `{"model": ...}` or DeepSpeed's `{"module": ...}`.
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "module")
_MAX_WRAPPERS = 4
# torch.nn.DataParallel / DistributedDataParallel saves every key with this prefix.
_PARALLEL_PREFIX = "module."


def _wrapper_key(obj) -> str | None:
    """The key whose dict holds this dict's weights, or None when the weights are here."""
    if not isinstance(obj, dict):
        return None
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict) and obj[key]:
            return key
    return None


def unwrap_weights(obj, name: str, *, nested: bool = False):
    """The dict of weights inside a loaded file's object: wrappers (WRAPPER_KEYS) opened, best
    first, and a DataParallel `module.` prefix taken off every key when all keys carry it.

    Inside a wrapper, every value must be a tensor (or, with `nested`, dicts of tensors: an
    embedding's `string_to_param`); anything else is refused by name, since a wrapper of weights
    that holds other things is not a file Easel understands. Beside a wrapper (Lightning's
    `global_step`, optimizer states) is ignored; at the top of an unwrapped file, non-tensors are
    skipped as before (an A1111 embedding's `name` and `step`)."""
    import torch

    path: list[str] = []
    while (key := _wrapper_key(obj)) is not None and len(path) < _MAX_WRAPPERS:
        path.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise UnknownCheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    if path:
        where = "".join(f"[{k!r}]" for k in path)
        for k, v in obj.items():
            if not isinstance(k, str):
                raise UnknownCheckpointError(f"{name}: its {where} has a {type(k).__name__} key ({k!r}), not a weight name")
            if isinstance(v, torch.Tensor) or nested and isinstance(v, dict):
                continue
            raise UnknownCheckpointError(
                f"{name}: its {where} holds a {type(v).__name__} at {k!r}, not a tensor; "
                f"not a weights file Easel reads")
    return _strip_parallel_prefix(obj)


def _strip_parallel_prefix(weights: dict) -> dict:
    if weights and all(isinstance(k, str) and k.startswith(_PARALLEL_PREFIX) for k in weights):
        return {k[len(_PARALLEL_PREFIX):]: v for k, v in weights.items()}
    return weights


def _pickle_tensors(path: Path) -> dict:
    import torch

    obj = unwrap_weights(_pickle_object(path), path.name)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# --- the two entry points, and the one for listings ----------------------------------------------

def read_tensors(path: Path) -> dict:
    """Every tensor in a weight file: safetensors memory-mapped, pickles only if plain tensors."""
    path = Path(path)
    if weight_format(path) == "pickle":
        return _pickle_tensors(path)
    return _safetensors_tensors(path)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key names and tensor shapes; for safetensors only the header is read."""
    path = Path(path)
    if weight_format(path) == "pickle":
        return {k: tuple(v.shape) for k, v in _pickle_tensors(path).items()}
    return _safetensors_shapes(path)


def read_nested_tensors(path: Path) -> dict:
    """Every tensor in a weight file, nested dicts' ones under dotted keys (an A1111 embedding's
    "string_to_param.*"): pickles through the same scan and restricted unpickler as read_tensors."""
    path = Path(path)
    if weight_format(path) == "pickle":
        return dict(_nested_tensors(unwrap_weights(_pickle_object(path), path.name, nested=True)))
    return _safetensors_tensors(path)


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` strings (kohya's ss_* training notes), after the same
    header checks as reading it; {} for pickles, which have none."""
    path = Path(path)
    if weight_format(path) == "pickle":
        return {}
    _check_tensor_extents(path, check_safetensors_header(path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _safetensors_error(path, e) from None


@dataclass(frozen=True)
class WeightsInfo:
    """What a weight file holds, or why it cannot be used; plain data for listings."""
    path: Path
    shapes: dict[str, tuple[int, ...]] | None  # key -> shape; None when unusable
    reason: str | None                          # one line, naming the file; None when usable

    @property
    def ok(self) -> bool:
        return self.reason is None


def _nested_tensors(obj, prefix: str = "", depth: int = 0):
    """(dotted key, tensor) for every tensor in nested dicts (an embedding's "string_to_param.*")."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict) and depth < 8:
        for k, v in obj.items():
            yield from _nested_tensors(v, f"{prefix}{k}.", depth + 1)


def inspect_weights(path: Path) -> WeightsInfo:
    """Key names and shapes of any weight file (tensors in nested dicts get dotted keys), or the
    one-line reason it cannot be used. Never raises for a bad file, and never runs anything in it."""
    path = Path(path)
    try:
        if weight_format(path) == "pickle":
            obj = unwrap_weights(_pickle_object(path), path.name, nested=True)
            shapes = {k: tuple(v.shape) for k, v in _nested_tensors(obj)}
        else:
            shapes = _safetensors_shapes(path)
    except EaselError as e:
        return WeightsInfo(path, None, str(e))
    if not shapes:
        return WeightsInfo(path, None, f"{path.name}: holds no tensors")
    return WeightsInfo(path, shapes, None)

