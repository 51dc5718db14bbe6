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

from engine.errors import ModelNotFoundError

CHECKPOINT_DIR = "Stable-diffusion"
SUBFOLDERS = ("Stable-diffusion", "VAE", "ESRGAN", "RealESRGAN", "SwinIR", "Lora", "embeddings")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")


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
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                here = Path(dirpath)
                if (here / "model_index.json").is_file() and here != root:
                    name = here.relative_to(root).as_posix()
                    found[name] = ModelEntry(name, here, True)
                    dirnames.clear()  # a diffusers folder's insides are not separate models
                    continue
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.lower().endswith(CHECKPOINT_SUFFIXES) and not fn.startswith("."):
                        name = (here / fn).relative_to(root).as_posix()
                        found[name] = ModelEntry(name, here / fn, False)
        self._entries = dict(sorted(found.items(), key=lambda kv: kv[0].lower()))
        return self.entries()

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
        if wanted in self._entries:
            return self._entries[wanted]
        by_stem = [e for e in self._entries.values() if e.stem == wanted]
        if len(by_stem) == 1:
            return by_stem[0]
        known = ", ".join(self._entries) or f"none (put checkpoints in {self.checkpoint_dir})"
        raise ModelNotFoundError(f"model: {name!r} is not in {self.checkpoint_dir}; available: {known}")


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
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    return full[:10]
