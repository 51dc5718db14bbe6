"""The model catalogue (data in `engine/configs/catalog.json`) and what suits this machine.

Each entry says where its file comes from (a Hugging Face repo, or for a file that lives
elsewhere a direct https link), its size and sha256, licence, what it is good for, and per device
whether it is recommended, fine or not advised, with the least memory it runs in. `advise` turns
that and the machine's facts (device, memory) into a verdict and a reason; the page and
`app.py download --list` show both. No torch here: the engine passes the device it resolved.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.errors import EaselError, RequestError
from engine.library import SUBFOLDERS

CATALOG_PATH = Path(__file__).resolve().parent / "configs" / "catalog.json"
VERDICTS = ("recommended", "ok", "no")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUIRED = ("name", "title", "kind", "family", "file", "folder", "size", "licence", "good_for",
             "gpu_gb", "ram_gb", "gpu", "why_gpu", "cpu", "why_cpu")


@dataclass(frozen=True)
class CatalogEntry:
    name: str            # what users type: `app.py download sd15`
    title: str
    kind: str            # "checkpoint", "upscaler", "face-restorer" or "face-detector"
    family: str
    file: str            # the file name it is saved under (and its name in the repo)
    folder: str          # the models subfolder it goes to
    size: int            # bytes
    sha256: str | None   # None: the hub's LFS sha256 is checked instead (hub entries only)
    licence: str
    licence_url: str
    good_for: str
    gpu_gb: float
    ram_gb: float
    gpu: str             # recommended | ok | no
    why_gpu: str
    cpu: str
    why_cpu: str
    repo_id: str | None = None
    revision: str = "main"
    url: str | None = None   # a direct https link, for files not on the hub
    default: bool = False    # what `app.py download` fetches when nothing is recommended

    @property
    def size_text(self) -> str:
        return size_text(self.size)

    @property
    def source(self) -> str:
        return f"huggingface.co/{self.repo_id}" if self.repo_id else str(self.url)


@dataclass(frozen=True)
class Machine:
    """What a recommendation depends on: the device Easel runs on and the memory it has there
    (the GPU's for cuda; the computer's for cpu and Apple's mps, which share it)."""
    device: str
    memory_gb: float

    @classmethod
    def of(cls, device: str, hardware) -> "Machine":
        if device == "cuda":
            return cls("cuda", float(hardware.cuda_vram_gb))
        import psutil

        return cls(device, round(psutil.virtual_memory().total / 2**30, 1))

    def describe(self) -> str:
        where = "GPU memory" if self.device == "cuda" else "memory"
        return f"{self.device}, {self.memory_gb:g} GB {where}"


@dataclass(frozen=True)
class Advice:
    verdict: str   # recommended | ok | no
    why: str

    @property
    def label(self) -> str:
        return {"recommended": "recommended", "ok": "suits", "no": "not recommended"}[self.verdict]


def advise(entry: CatalogEntry, machine: Machine) -> Advice:
    """Whether `entry` suits `machine`, and why, from the entry's own data."""
    on_gpu = machine.device in ("cuda", "mps")
    need = entry.gpu_gb if on_gpu else entry.ram_gb
    if machine.memory_gb < need:
        where = "GPU memory" if machine.device == "cuda" else "memory"
        return Advice("no", f"needs {need:g} GB of {where}; this {machine.device} has {machine.memory_gb:g} GB")
    return Advice(entry.gpu, entry.why_gpu) if on_gpu else Advice(entry.cpu, entry.why_cpu)


class Catalog:
    def __init__(self, entries: list[CatalogEntry]):
        self.entries = entries

    @classmethod
    def load(cls, path: Path | None = None) -> "Catalog":
        """Read and check a catalogue file (the bundled one by default). A broken file fails
        loudly, naming the entry and the field."""
        path = Path(path) if path else CATALOG_PATH
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EaselError(f"catalogue: cannot read {path}: {e}") from None
        entries = [_entry(item, i, path) for i, item in enumerate(data.get("models", []))]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise EaselError(f"catalogue {path}: names must be unique, got {names}")
        return cls(entries)

    def get(self, name: str) -> CatalogEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise RequestError("model", f"{name!r} is not in the catalogue; one of {', '.join(self.names())}, "
                                    "or an https link to a .safetensors file")

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def first_choice(self, machine: Machine) -> CatalogEntry:
        """The checkpoint to fetch when the user names none: the first one recommended for this
        machine, else the catalogue's default."""
        checkpoints = [e for e in self.entries if e.kind == "checkpoint"]
        for entry in checkpoints:
            if advise(entry, machine).verdict == "recommended":
                return entry
        defaults = [e for e in checkpoints if e.default] or checkpoints
        if not defaults:
            raise EaselError("catalogue: it lists no checkpoint")
        return defaults[0]


def _entry(item: dict, index: int, path: Path) -> CatalogEntry:
    where = f"catalogue {path.name}, entry {item.get('name', index)!r}"
    missing = [k for k in _REQUIRED if k not in item]
    if missing:
        raise EaselError(f"{where}: missing {', '.join(missing)}")
    if bool(item.get("repo_id")) == bool(item.get("url")):
        raise EaselError(f"{where}: give either repo_id (Hugging Face) or url (a direct https link), not both")
    if item.get("url") and not str(item["url"]).startswith("https://"):
        raise EaselError(f"{where}: url must be https")
    sha = item.get("sha256")
    if sha is not None and not _SHA256.fullmatch(str(sha)):
        raise EaselError(f"{where}: sha256 must be 64 lowercase hex digits or null")
    if sha is None and not item.get("repo_id"):
        raise EaselError(f"{where}: a file not on the hub needs its sha256 pinned")
    if not str(item["file"]).endswith(".safetensors") and sha is None:
        raise EaselError(f"{where}: a file that is not .safetensors (a pickle) needs its sha256 pinned")
    if PurePosixPath(item["file"]).name != item["file"] or item["file"].startswith("."):
        raise EaselError(f"{where}: file must be a plain file name")
    if item["folder"] not in SUBFOLDERS:
        raise EaselError(f"{where}: folder must be one of {', '.join(SUBFOLDERS)}")
    for key in ("gpu", "cpu"):
        if item[key] not in VERDICTS:
            raise EaselError(f"{where}: {key} must be one of {', '.join(VERDICTS)}")
    licence = item["licence"]
    return CatalogEntry(
        name=item["name"], title=item["title"], kind=item["kind"], family=item["family"], file=item["file"],
        folder=item["folder"], size=int(item["size"]), sha256=sha, licence=licence["name"], licence_url=licence["url"],
        good_for=item["good_for"], gpu_gb=float(item["gpu_gb"]), ram_gb=float(item["ram_gb"]), gpu=item["gpu"],
        why_gpu=item["why_gpu"], cpu=item["cpu"], why_cpu=item["why_cpu"], repo_id=item.get("repo_id"),
        revision=item.get("revision", "main"), url=item.get("url"), default=bool(item.get("default", False)))


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
