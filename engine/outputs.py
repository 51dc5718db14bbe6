"""Numbered PNG outputs: `<outdir>/<mode>/<YYYY-MM-DD>/<NNNNN>-<seed>.png`, and grids.

Saving is atomic and safe when several threads or processes save into one folder at once:

1. pick N = one more than the highest number already used in the folder;
2. reserve N by creating the temp file `.NNNNN.part` with O_CREAT|O_EXCL - only one writer can
   create it, and it does not end in ".png", so image browsers never see a half-written file;
3. re-check that no finished PNG already carries N (a writer that held N may have renamed its
   temp file away just before step 2); if one does, drop the reservation and try N+1;
4. write the PNG bytes into the temp file, fsync, then os.replace() it to its final name.

From step 2 on, N is always held by the temp file or by the finished PNG (the rename swaps one
for the other in a single step), so no two writers can end up with the same number and an
existing file is never overwritten. Any failure removes the temp file and releases N.

A writer killed mid-save (power cut, SIGKILL) leaves its `.NNNNN.part` behind, never a truncated
PNG. Such leftovers are removed when the Engine starts (`remove_leftovers`, every dated folder)
and whenever a save lists a folder (that folder only). The rule that tells a dead writer's temp
file from a live one's: on POSIX each writer holds an exclusive flock on its temp file from
creating it until it is renamed, and the kernel drops that lock when the process dies; a temp
file whose lock can be taken has no owner left. (A writer re-checks, once it holds the lock, that
its file was not removed in the instant between creating and locking it.) Windows has no flock
but will not delete a file another process has open; there a temp file is removed only when it
is older than STALE_SECONDS and the delete succeeds.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from engine.errors import EaselError, RequestError
from engine.infotext import write_png_with_infotext
from engine.request import MODES as GENERATION_MODES

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

MODES = (*GENERATION_MODES, "upscale")  # output folders: one per generation mode, and the upscalers'
NUMBER_DIGITS = 5
# A1111 compatible: every file in the folder whose name starts with digits and '-' holds a number.
_NUMBERED = re.compile(r"^(\d+)-")
_RESERVED = re.compile(r"^\.(\d+)\.part$")
_MAX_ATTEMPTS = 1000
# Windows only (no flock): a temp file this old belongs to no live writer; writing one PNG takes well under a second.
STALE_SECONDS = 600


class SaveError(EaselError):
    """An image could not be written (disk full, read-only or missing folder); nothing was left behind."""


@dataclass(frozen=True)
class OutputSettings:
    outdir: Path
    watermark: bool = True


def output_folder(outdir: Path, mode: str, when: datetime.date | None = None) -> Path:
    """`<outdir>/<mode>/<YYYY-MM-DD>`; mode is checked against MODES, never used as a path."""
    if mode not in MODES:
        raise RequestError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    day = when or datetime.date.today()
    return Path(outdir) / mode / day.isoformat()


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RequestError("seed", f"must be a whole number >= 0 to name the file, got {seed!r}")
    return seed


def _lock(fd: int) -> None:
    """Hold an exclusive lock on a temp file while writing it (POSIX; see the module's docstring)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a filesystem without locks: then no clean-up can take its temp files for dead ones


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _drop(fd: int, temp: Path) -> None:
    """Remove our own temp file. POSIX: while still holding its lock, or a clean-up could remove it
    first; Windows cannot delete an open file, so it closes first."""
    if os.name == "nt":
        os.close(fd)
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    finally:
        if os.name != "nt":
            os.close(fd)


def _remove_if_dead(path: Path) -> bool:
    """Remove a temp file whose writer is gone; True when it was removed."""
    if fcntl is None:
        try:
            if time.time() - os.stat(path).st_mtime < STALE_SECONDS:
                return False
            os.unlink(path)  # fails while the writer has it open
        except OSError:
            return False
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # renamed to its PNG or removed meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        # Locked: no live writer. Only the file we locked goes (the name may have been reused).
        if not _same_file(fd, path):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_leftovers(outdir: Path) -> int:
    """Remove dead writers' temp files from every `<outdir>/<mode>/<date>/` folder; how many."""
    removed = 0
    for mode in MODES:
        try:
            days = [entry.path for entry in os.scandir(Path(outdir) / mode) if entry.is_dir()]
        except OSError:
            continue
        for day in days:
            try:
                names = os.listdir(day)
            except OSError:
                continue
            removed += sum(_remove_if_dead(Path(day) / name) for name in names if _RESERVED.match(name))
    return removed


def _used_numbers(folder: Path) -> tuple[int, set[int]]:
    """(highest number in use, numbers held by finished PNGs). Dead writers' temp files found on
    the way are removed, so they hold no number."""
    highest, finished = 0, set()
    for name in os.listdir(folder):
        numbered = _NUMBERED.match(name)
        reserved = _RESERVED.match(name)
        if numbered:
            number = int(numbered.group(1))
            if name.endswith(".png"):
                finished.add(number)
        elif reserved:
            if _remove_if_dead(folder / name):
                continue
            number = int(reserved.group(1))
        else:
            continue
        highest = max(highest, number)
    return highest, finished


def _reserve(folder: Path) -> tuple[int, int, Path]:
    """Claim the next free number: (number, open fd of its temp file, temp path)."""
    number = _used_numbers(folder)[0] + 1
    for _ in range(_MAX_ATTEMPTS):
        temp = folder / f".{number:0{NUMBER_DIGITS}d}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileExistsError:
            number += 1
            continue
        _lock(fd)
        if not _same_file(fd, temp):
            # Another writer's clean-up took it for a dead writer's in the instant before the lock.
            os.close(fd)
            continue
        try:
            highest, finished = _used_numbers(folder)
        except OSError:
            _drop(fd, temp)
            raise
        if number not in finished:
            return number, fd, temp
        _drop(fd, temp)
        number = max(number, highest) + 1
    raise SaveError(f"could not reserve a file number in {folder} after {_MAX_ATTEMPTS} tries")


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open folders, and does not need it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_numbered(data: bytes, folder: Path, suffix: str) -> Path:
    """Write data atomically as `<NNNNN><suffix>` in folder; returns the final path."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        number, fd, temp = _reserve(folder)
    except OSError as error:
        raise SaveError(f"output folder {folder}: cannot write there ({error.strerror or error})") from error
    final = folder / f"{number:0{NUMBER_DIGITS}d}{suffix}"
    is_open = True
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        if os.name == "nt":  # Windows cannot rename a file that is open
            is_open = False
            os.close(fd)
        # POSIX: renamed while still locked, so no clean-up can take it for a dead writer's.
        os.replace(temp, final)
    except BaseException as error:
        try:
            if is_open:
                is_open = False
                _drop(fd, temp)
            else:
                os.unlink(temp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise SaveError(f"output file {final}: could not write it ({error.strerror or error})") from error
        raise
    finally:
        if is_open:
            os.close(fd)
    _fsync_folder(folder)
    return final


def save_png(image: Image.Image, outdir: Path, mode: str, seed: int, infotext: str | None, *,
             when: datetime.date | None = None) -> Path:
    """Save as `<outdir>/<mode>/<YYYY-MM-DD>/<NNNNN>-<seed>.png` with the infotext chunk."""
    folder = output_folder(outdir, mode, when)
    seed = _check_seed(seed)
    return _save_numbered(write_png_with_infotext(image, infotext), folder, f"-{seed}.png")


def make_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Images in a near-square grid (rows = round(sqrt(n)) unless given), row by row, as the
    original txt2img/A1111 grids; cells take the largest width and height."""
    count = len(images)
    if count == 0:
        raise RequestError("images", "need at least 1 image for a grid")
    if rows is None:
        rows = max(1, round(math.sqrt(count)))
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= count:
        raise RequestError("rows", f"must be a whole number from 1 to {count}, got {rows!r}")
    cols = math.ceil(count / rows)
    # Drop rows left empty: 4 images asked in 3 rows need 2 columns, which fill only 2 rows.
    rows = math.ceil(count / cols)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % cols) * cell_w, (index // cols) * cell_h))
    return grid


def save_grid(grid: Image.Image, outdir: Path, mode: str, seed: int, infotext: str | None, *,
              when: datetime.date | None = None) -> Path:
    """Save a grid (from make_grid) as `<NNNNN>-grid-<seed>.png` in the same dated folder as
    the images; it takes the next number in the same sequence, with the same atomic rules."""
    folder = output_folder(outdir, mode, when)
    seed = _check_seed(seed)
    return _save_numbered(write_png_with_infotext(grid, infotext), folder, f"-grid-{seed}.png")
