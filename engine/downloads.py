"""Fetching models: catalogue entries and https links to .safetensors files, with progress,
cancel, resume, a sha256 check and an atomic move into `models/<folder>/`.

Bytes go to `<data>/downloads/<key>.part` (never into the models folders) with a small `.json`
beside it saying what they are part of. An interrupted, cancelled or killed download keeps its
part; the next try sends `Range: bytes=N-` (with `If-Range`, so a file changed on the server
starts over) and hashes the part it already has. Only a file whose sha256 matches is moved
(`os.replace`) to its models folder; a mismatch deletes the part.

Hub entries: huggingface_hub builds the URL (so `HF_ENDPOINT` is respected), reads the file's
metadata (size, its LFS sha256, where the bytes are) with the user's token, and says what is wrong
(gated, missing, offline). The bytes themselves come through the same ranged transfer as links:
huggingface_hub 2.x deletes its partial file when a download fails, so it cannot resume after an
interruption or a restart.

Links: https only, also after every redirect; .safetensors only (a pickle can run code when it is
loaded, so one is never fetched from a link; catalogue entries may be pickles only with their sha256
pinned); refused before any byte is written when larger than the free disk space. Short timeouts:
offline, one line comes back within seconds. No torch here.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit

from engine.catalog import Advice, Catalog, CatalogEntry, Machine, advise, size_text
from engine.errors import CancelledError, EaselError, RequestError
from engine.library import CHECKPOINT_DIR, SUBFOLDERS

CHUNK = 1 << 20
TIMEOUT = (5, 30)          # connect, read (seconds): offline fails fast, a stalled server within 30 s
MAX_REDIRECTS = 8
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILENAME = re.compile(r"""filename\*?=(?:UTF-8'')?["']?([^"';]+)""", re.IGNORECASE)


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    done: int                 # bytes on disk so far
    total: int | None
    speed: float              # bytes per second, this session
    phase: str                # "checking" (hashing a resumed part), "downloading", "verifying", "done"

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def eta(self) -> float | None:
        if not self.total or self.speed <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.speed)

    def describe(self) -> str:
        if self.phase == "checking":
            return f"{self.name}: checking the {size_text(self.done)} already downloaded…"
        if self.phase == "verifying":
            return f"{self.name}: verifying sha256…"
        if self.phase == "done":
            return f"{self.name}: done ({size_text(self.done)})"
        total = f" of {size_text(self.total)}" if self.total else ""
        speed = f", {size_text(self.speed)}/s" if self.speed > 0 else ""
        eta = f", {_duration(self.eta)} left" if self.eta is not None else ""
        return f"{self.name}: {size_text(self.done)}{total}{speed}{eta}"


@dataclass
class DownloadJob:
    """A download's handle: progress out through `on_progress`, `cancel()` in."""
    on_progress: Callable[[DownloadProgress], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    last_emit: float = 0.0   # when progress was last sent (they are spaced by Downloads.progress_every)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class CatalogRow:
    entry: CatalogEntry
    advice: Advice
    path: Path          # where it goes
    on_disk: bool

    def status(self, offline: bool) -> str:
        if self.on_disk:
            return "on disk"
        return f"{self.entry.size_text} download, needs the internet" + (" (offline now)" if offline else "")


@dataclass(frozen=True)
class _Source:
    """Where the bytes of one download come from and what they must be."""
    key: str                   # names the part file: the same key resumes the same part
    url: str
    name: str                  # for progress messages
    total: int | None
    sha256: str | None
    headers: dict = field(default_factory=dict)
    https_only: bool = True    # links: every hop must be https


class Downloads:
    """The catalogue for this machine, and fetching into `models_dir`. `hub_endpoint` None means
    huggingface_hub's own (`HF_ENDPOINT`); `verify` is requests' (a CA bundle path in tests)."""

    def __init__(self, models_dir: Path, partial_dir: Path, catalog: Catalog, machine: Machine, *,
                 hub_endpoint: str | None = None, verify: bool | str = True, progress_every: float = 0.25):
        self.models_dir = Path(models_dir)
        self.partial_dir = Path(partial_dir)
        self.catalog = catalog
        self.machine = machine
        self.hub_endpoint = hub_endpoint
        self.verify = verify
        self.progress_every = progress_every

    @classmethod
    def for_config(cls, config, hardware) -> "Downloads":
        """For an EngineConfig: its models folder, partial downloads in `<data>/downloads`, its
        catalogue (`catalog_path`, else the bundled one), advice for the device it runs on."""
        from engine.devices import resolve_device  # torch: only where an engine is built anyway

        machine = Machine.of(resolve_device(hardware, config.device), hardware)
        return cls(config.models_dir, Path(config.data_dir) / "downloads", Catalog.load(config.catalog_path), machine)

    # --- the catalogue ----------------------------------------------------------------------
    def rows(self) -> list[CatalogRow]:
        rows = []
        for entry in self.catalog.entries:
            path = self.models_dir / entry.folder / entry.file
            rows.append(CatalogRow(entry, advise(entry, self.machine), path, path.is_file()))
        return rows

    @staticmethod
    def offline() -> bool:
        """Whether downloads from the hub are switched off (HF_HUB_OFFLINE); links may still work."""
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

    # --- fetching ---------------------------------------------------------------------------
    def fetch(self, what: str | None, job: DownloadJob | None = None, *, folder: str | None = None,
              sha256: str | None = None) -> Path:
        """A catalogue name, an https link, or None (the first choice for this machine)."""
        job = job or DownloadJob()
        what = (what or "").strip()
        if "://" in what:
            return self.fetch_link(what, job, folder=folder or CHECKPOINT_DIR, sha256=sha256)
        entry = self.catalog.get(what) if what else self.catalog.first_choice(self.machine)
        return self.fetch_entry(entry, job)

    def fetch_entry(self, entry: CatalogEntry, job: DownloadJob | None = None) -> Path:
        job = job or DownloadJob()
        dest = self.models_dir / entry.folder / entry.file
        if dest.is_file():
            return dest
        if entry.repo_id:
            source = self._hub_source(entry)
        else:
            source = _Source(f"sha256-{entry.sha256}", entry.url, entry.title, entry.size, entry.sha256)
        part = self._transfer(source, job, lambda response, url: dest)
        return self._install(part, dest, source)

    def fetch_link(self, url: str, job: DownloadJob | None = None, *, folder: str = CHECKPOINT_DIR,
                   sha256: str | None = None) -> Path:
        url = check_link(url)
        if folder not in SUBFOLDERS:
            raise RequestError("folder", f"must be one of {', '.join(SUBFOLDERS)}, got {folder!r}")
        if sha256 is not None and not _SHA256.fullmatch(sha256.strip().lower()):
            raise RequestError("sha256", "must be 64 hex digits")
        job = job or DownloadJob()
        source = _Source(f"link-{hashlib.sha256(url.encode()).hexdigest()[:24]}", url,
                         _link_name(url) or "download", None, sha256.strip().lower() if sha256 else None)
        chosen: dict[str, Path] = {}

        def destination(response, final_url: str) -> Path:
            name = _response_filename(response, url, final_url)
            if not name.lower().endswith(".safetensors"):
                raise RequestError("url", f"the link serves {name!r}, not a .safetensors file; only .safetensors "
                                          "files are downloaded from links")
            dest = self.models_dir / folder / name
            if dest.exists():
                raise EaselError(f"download: {dest} already exists; rename or delete it first")
            chosen["dest"] = dest
            return dest

        part = self._transfer(source, job, destination)
        _check_safetensors(part)
        return self._install(part, chosen["dest"], source)

    # --- the parts --------------------------------------------------------------------------
    def _hub_source(self, entry: CatalogEntry) -> _Source:
        """The hub's metadata for an entry: where the bytes are, their size and LFS sha256."""
        if self.offline():
            raise EaselError(f"download: {entry.title} needs the internet, and HF_HUB_OFFLINE is set")
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            RepositoryNotFoundError)
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(entry.repo_id, entry.file, revision=entry.revision, endpoint=self.hub_endpoint)
        try:
            meta = get_hf_file_metadata(url, timeout=TIMEOUT[1], endpoint=self.hub_endpoint)
        except GatedRepoError:
            raise EaselError(f"download: {entry.repo_id} asks for a Hugging Face login: accept its licence on "
                             f"huggingface.co and set HF_TOKEN") from None
        except (RepositoryNotFoundError, EntryNotFoundError):
            raise EaselError(f"download: {entry.repo_id}/{entry.file} is not on the hub (moved or removed?)") from None
        except HfHubHTTPError as e:
            raise EaselError(f"download: the hub answered {_status(e)} for {entry.repo_id}/{entry.file}") from None
        except Exception as e:  # noqa: BLE001 - offline, DNS, refused, timeout, TLS: one line for all
            raise EaselError(f"download: cannot reach {urlsplit(url).netloc} ({type(e).__name__}); are you online? "
                             f"{entry.title} needs the internet") from None
        hub_sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
        if entry.sha256 and hub_sha and hub_sha != entry.sha256:
            raise EaselError(f"download: the hub's {entry.file} is not the catalogue's (sha256 {hub_sha[:12]}…, "
                             f"expected {entry.sha256[:12]}…); not downloaded")
        sha = entry.sha256 or hub_sha
        if not sha:
            raise EaselError(f"download: no sha256 to check {entry.file} against (none in the catalogue, none "
                             "from the hub); not downloaded")
        location = urljoin(url, meta.location)
        same_host = urlsplit(location).netloc == urlsplit(url).netloc
        return _Source(f"sha256-{sha}", location, entry.title, meta.size or entry.size, sha,
                       headers=build_hf_headers() if same_host else {},
                       https_only=urlsplit(url).scheme == "https")

    def _transfer(self, source: _Source, job: DownloadJob, destination) -> Path:
        """Download (or resume) `source` into its part file; returns the complete, verified part.
        `destination(response, final_url)` names the file it will become (and may refuse it)
        before a byte is written."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        part = self.partial_dir / f"{source.key}.part"
        meta_path = part.with_suffix(".json")
        meta = _read_json(meta_path)
        have = part.stat().st_size if part.is_file() and meta.get("url") == _identity(source) else 0
        digest = hashlib.sha256()
        if have:
            self._hash_part(part, have, digest, source, job)
        headers = dict(source.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
            if meta.get("validator"):
                headers["If-Range"] = meta["validator"]
        response, final_url, linked_sha = self._open(source, headers)
        expected = source.sha256 or linked_sha  # a hub link's redirect names its LFS sha256
        with response:
            if response.status_code == 416 and have and meta.get("total") == have:
                total = have  # the part was already complete
            elif response.status_code in (200, 206):
                if response.status_code == 200 or not _range_starts_at(response, have):
                    have, digest = 0, hashlib.sha256()  # the server sent it all (or the file changed): start over
                total = _total_size(response, have) or source.total
            else:
                raise EaselError(f"download: {urlsplit(final_url).netloc} answered HTTP {response.status_code} "
                                 f"for {source.name}")
            dest = destination(response, final_url)
            if total and total - have > 0:
                self._check_space(total - have, source.name, dest)
            validator = _validator(response)
            _write_json(meta_path, {"url": _identity(source), "validator": validator, "total": total})
            if response.status_code != 416:
                self._receive(response, part, have, total, digest, source, job)
        done = part.stat().st_size if part.is_file() else 0
        if total and done != total:
            raise EaselError(f"download: {source.name} stopped at {size_text(done)} of {size_text(total)}; "
                             "run it again to resume")
        self._emit(job, DownloadProgress(source.name, done, total, 0.0, "verifying"), force=True)
        if expected and digest.hexdigest() != expected:
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise EaselError(f"download: {source.name} has the wrong sha256 ({digest.hexdigest()[:12]}…, expected "
                             f"{expected[:12]}…); the file was deleted, nothing was added")
        return part

    def _open(self, source: _Source, headers: dict):
        """GET with redirects followed by hand: each hop is checked (https stays https). Also
        returns the final URL and the LFS sha256 a hub redirect names (X-Linked-Etag), if any."""
        import requests

        url, hop_headers, linked_sha = source.url, dict(headers), None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = requests.get(url, headers=hop_headers, stream=True, allow_redirects=False,
                                        timeout=TIMEOUT, verify=self.verify)
            except requests.exceptions.SSLError:
                raise EaselError(f"download: {urlsplit(url).netloc}'s certificate is not trusted") from None
            except requests.RequestException as e:
                raise EaselError(f"download: cannot reach {urlsplit(url).netloc} ({type(e).__name__}); "
                                 "are you online?") from None
            if not response.is_redirect:
                return response, url, linked_sha
            linked = response.headers.get("X-Linked-Etag", "").strip('"').lower()
            linked_sha = linked if _SHA256.fullmatch(linked) else linked_sha
            target = urljoin(url, response.headers.get("Location", ""))
            response.close()
            if (source.https_only or urlsplit(url).scheme == "https") and urlsplit(target).scheme != "https":
                raise RequestError("url", f"the link redirects to a non-https address ({urlsplit(target).scheme}://"
                                          f"{urlsplit(target).netloc}); refused")
            if urlsplit(target).netloc != urlsplit(url).netloc:
                hop_headers.pop("authorization", None)
                hop_headers.pop("Authorization", None)
            url = target
        raise EaselError(f"download: more than {MAX_REDIRECTS} redirects for {source.name}")

    def _receive(self, response, part: Path, have: int, total: int | None, digest, source: _Source,
                 job: DownloadJob) -> None:
        import requests

        started, got = time.monotonic(), 0
        try:
            with open(part, "ab" if have else "wb") as f:
                for chunk in response.iter_content(CHUNK):
                    if job.cancelled.is_set():
                        raise CancelledError(f"download cancelled at {size_text(have + got)}; it resumes from "
                                             "there next time")
                    f.write(chunk)
                    f.flush()  # on disk as it comes: a killed process keeps what it got
                    digest.update(chunk)
                    got += len(chunk)
                    speed = got / max(time.monotonic() - started, 1e-6)
                    self._emit(job, DownloadProgress(source.name, have + got, total, speed, "downloading"))
        except (requests.RequestException, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise EaselError(f"download: the disk is full ({self.partial_dir})") from None
            raise EaselError(f"download: the connection broke at {size_text(have + got)} ({type(e).__name__}); "
                             "run it again to resume") from None

    def _hash_part(self, part: Path, have: int, digest, source: _Source, job: DownloadJob) -> None:
        """The sha256 check covers the whole file: hash what an earlier run left before adding to it."""
        done = 0
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(CHUNK * 8), b""):
                digest.update(block)
                done += len(block)
                self._emit(job, DownloadProgress(source.name, done, have, 0.0, "checking"))

    def _install(self, part: Path, dest: Path, source: _Source) -> Path:
        """Move the verified part to its models folder in one step: it is never half there."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(part, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise EaselError(f"download: cannot move it into {dest.parent}: {e.strerror or e}") from None
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"  # hidden: never listed as a model
            try:
                shutil.copyfile(part, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        part.with_suffix(".json").unlink(missing_ok=True)
        return dest

    def _check_space(self, needed: int, name: str, dest: Path | None = None) -> None:
        folders = [self.partial_dir] + ([dest.parent] if dest is not None else [])
        for folder in folders:
            existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if existing is None:
                continue
            free = shutil.disk_usage(existing).free
            if needed > free:
                raise EaselError(f"download: {name} needs {size_text(needed)} but {existing} has only "
                                 f"{size_text(free)} free")

    def _emit(self, job: DownloadJob, progress: DownloadProgress, force: bool = False) -> None:
        if job.on_progress is None:
            return
        now = time.monotonic()
        if force or now - job.last_emit >= self.progress_every or (progress.total and progress.done >= progress.total):
            job.last_emit = now
            job.on_progress(progress)


def check_link(url: str) -> str:
    """A pasted link, checked before any network: https, and not visibly a pickle. A hub page
    link (`/blob/`) becomes its file link (`/resolve/`)."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc:
        raise RequestError("url", f"must be an https:// link to a .safetensors file, got {url[:80]!r}")
    name = _link_name(url)
    if name and "." in name and not name.lower().endswith(".safetensors"):
        raise RequestError("url", f"{name!r} is not a .safetensors file; only .safetensors files are downloaded "
                                  "from links (other formats can run code when loaded)")
    if parts.netloc in ("huggingface.co", "hf.co") and "/blob/" in parts.path:
        url = url.replace("/blob/", "/resolve/", 1)
    return url


def _link_name(url: str) -> str:
    return unquote(PurePosixPath(urlsplit(url).path).name)


def _response_filename(response, link: str, final_url: str) -> str:
    """The file name the server gives (Content-Disposition), else the pasted link's, else the last
    redirect's; only its base name, so a crafted name cannot reach outside the folder."""
    match = _FILENAME.search(response.headers.get("Content-Disposition", ""))
    pasted = _link_name(link)
    raw = unquote(match.group(1)) if match else pasted if "." in pasted else _link_name(final_url)
    name = PurePosixPath(raw.replace("\\", "/")).name.strip()
    if not name or name.startswith(".") or not name.isprintable():
        raise RequestError("url", f"the link gives no usable file name ({raw[:80]!r})")
    return name


def _check_safetensors(part: Path) -> None:
    """A file from a link must at least be a safetensors file: its header is a JSON object."""
    try:
        with open(part, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            ok = 1 < length <= min(100 << 20, part.stat().st_size - 8)
            header = json.loads(f.read(length)) if ok else None
    except (OSError, struct.error, ValueError):
        header = None
    if not isinstance(header, dict):
        part.unlink(missing_ok=True)
        part.with_suffix(".json").unlink(missing_ok=True)
        raise EaselError("download: the file is not a safetensors file; it was deleted, nothing was added")


def _identity(source: _Source) -> str:
    return source.sha256 or source.url


def _range_starts_at(response, have: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return bool(match) and int(match.group(1)) == have


def _total_size(response, have: int) -> int | None:
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    if length and response.headers.get("Content-Encoding", "identity") == "identity":
        return int(length) + (have if response.status_code == 206 else 0)
    return None


def _validator(response) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _status(error) -> str:
    response = getattr(error, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(error).__name__


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    from engine.atomic import write_atomic

    write_atomic(path, json.dumps(data))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"
