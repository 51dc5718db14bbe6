"""What is in the models folder, and resolving a user's model name to a file inside it.

The layout is AUTOMATIC1111's (`Stable-diffusion/`, `VAE/`, `ESRGAN/`, ...), so `--models-dir`
can point at an existing A1111 `models/` folder. A name from the UI or the API is looked up among
the scanned entries only: it is never joined onto a path, so `../../etc/passwd` cannot escape.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.atomic import write_atomic
from engine.errors import ModelNotFoundError

CHECKPOINT_DIR = "Stable-diffusion"
SUBFOLDERS = ("Stable-diffusion", "VAE", "ESRGAN", "RealESRGAN", "SwinIR", "Lora", "LyCORIS", "embeddings",
              "GFPGAN", "Codeformer", "ControlNet")
# Every suffix the safe reader (engine/safe_files.py) accepts; kept here too so this module needs no torch.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The other model folders, by the heading `app.py models` lists them under.
EXTRA_KINDS = {
    "VAE": ("VAE",),
    "Upscalers": ("ESRGAN", "RealESRGAN", "SwinIR"),
    "LoRA": ("Lora", "LyCORIS"),
    "Embeddings": ("embeddings",),
}
# Folders A1111 keeps beside the models folder rather than in it (webui/embeddings), by kind.
SIBLING_KINDS = {"Embeddings": ("embeddings",)}


@dataclass(frozen=True)
class ModelEntry:
    name: str   # path relative to Stable-diffusion/, with forward slashes: what users see and type
    path: Path
    is_folder: bool  # a diffusers folder (model_index.json) rather than a single file

    @property
    def stem(self) -> str:
        """The file name without folders or extension: A1111's 'Model' in infotexts."""
        base = PurePosixPath(self.name.replace("\\", "/")).name
        return base if self.is_folder else base.rsplit(".", 1)[0]


class ModelLibrary:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()

    @property
    def checkpoint_dir(self) -> Path:
        return self.models_dir / CHECKPOINT_DIR

    def ensure_layout(self) -> None:
        for sub in SUBFOLDERS:
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)

    def refresh(self) -> list[ModelEntry]:
        root = self.checkpoint_dir
        found: dict[str, ModelEntry] = {}
        for path, is_folder in _scan(root, diffusers_folders=True):
            name = path.relative_to(root).as_posix()
            found[name] = ModelEntry(name, path, is_folder)
        self._entries = dict(sorted(found.items(), key=lambda kv: kv[0].lower()))
        return self.entries()

    def extra_entries(self, kind: str) -> list[ModelEntry]:
        """The weight files of one other kind (a key of EXTRA_KINDS), scanned now. Names are
        relative to the models folder ("Lora/style.safetensors"; "../embeddings/x.pt" for A1111's
        folder beside it, listed first). A folder named like a weight file is listed too, so that
        it is reported rather than silently skipped."""
        if kind not in EXTRA_KINDS:
            raise KeyError(f"{kind!r} is not one of {', '.join(EXTRA_KINDS)}")
        beside, found = [], []
        for sub in SIBLING_KINDS.get(kind, ()):
            for path, _ in _scan(self.models_dir.parent / sub, diffusers_folders=False):
                beside.append(ModelEntry("../" + path.relative_to(self.models_dir.parent).as_posix(), path, False))
        for sub in EXTRA_KINDS[kind]:
            for path, _ in _scan(self.models_dir / sub, diffusers_folders=False):
                found.append(ModelEntry(path.relative_to(self.models_dir).as_posix(), path, False))
        return sorted(beside, key=lambda e: e.name.lower()) + sorted(found, key=lambda e: e.name.lower())

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def add_external(self, path: Path) -> ModelEntry:
        """Register a checkpoint outside the models folder. Only for a path the user typed on the
        command line of their own machine; names from the UI or the API never come here."""
        path = Path(path).resolve()
        entry = ModelEntry(str(path), path, path.is_dir())
        self._entries[entry.name] = entry
        return entry

    def resolve(self, name: str) -> ModelEntry:
        """Exact name, name without extension, or an A1111 title 'name [hash]'."""
        wanted = name.strip()
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[: wanted.rindex(" [")]
        entry = self._entries.get(wanted)
        if entry is None:
            by_stem = [e for e in self._entries.values() if e.stem == wanted]
            entry = by_stem[0] if len(by_stem) == 1 else None
        if entry is not None:
            if not entry.path.exists():  # listed, then deleted or moved
                del self._entries[entry.name]
                raise ModelNotFoundError(f"model: {entry.name} is no longer in {entry.path.parent} (deleted or moved)")
            return entry
        known = ", ".join(self._entries) or f"none (put checkpoints in {self.checkpoint_dir})"
        raise ModelNotFoundError(f"model: {name!r} is not in {self.checkpoint_dir}; available: {known}")


def _scan(root: Path, *, diffusers_folders: bool):
    """(path, is_diffusers_folder) for each model under `root`, hidden names skipped. A folder named
    like a weight file ("x.safetensors/") is yielded as a model, not walked into: it is reported as
    unusable instead of vanishing from the list."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if diffusers_folders and here != root and (here / "model_index.json").is_file():
            yield here, True
            dirnames.clear()  # a diffusers folder's insides are not separate models
            continue
        named_like_files = [d for d in dirnames if d.lower().endswith(CHECKPOINT_SUFFIXES) and not d.startswith(".")
                            and not (diffusers_folders and (here / d / "model_index.json").is_file())]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in named_like_files)
        for fn in sorted(filenames + named_like_files):
            if fn.lower().endswith(CHECKPOINT_SUFFIXES) and not fn.startswith("."):
                yield here / fn, False


def model_hash(path: Path, cache_file: Path | None = None) -> str:
    """A1111's 'Model hash': the first 10 hex digits of the file's sha256 (for a diffusers folder,
    of its UNet weights). Cached by path, size and mtime, because hashing gigabytes takes seconds."""
    target = path
    if path.is_dir():
        candidates = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*.bin"))
        if not candidates:
            return "0" * 10
        target = candidates[0]
    stat = target.stat()
    key = f"{target.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache: dict[str, str] = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key][:10]
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    full = digest.hexdigest()
    if cache_file:
        cache[key] = full
        write_atomic(cache_file, json.dumps(cache, indent=1))
    return full[:10]
