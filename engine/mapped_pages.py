"""Hand back the pages of OpenVINO's memory-mapped weights once it has read them.

Why: OpenVINO's CPU plugin memory-maps a cached model's weights (the compiled blob, or model.bin)
and, while compiling and on its first call, repacks them into a copy of its own laid out for its
kernels. From then on it reads the copy, but the mapped pages it read stay resident: the weights
count twice in the process's memory (SD 1.5's UNet: 1.6 GB mapped + 1.7 GB repacked in a bf16
plan, 3.3 + 3.3 GB in f32), which put a cached OpenVINO run 1-4.5 GB above stock diffusers'
peak (docs/benchmarks.md, `openvino-memory`).

What: `returning_pages(folder)` wraps OpenVINO's work on one cache entry (compiling, each call);
while it runs, a thread tells the kernel every `period` seconds that the read-only file pages
mapped from `folder` are not needed (madvise MADV_DONTNEED). They leave the process's resident
set and stay in the page cache, so a page OpenVINO reads again comes back as a memory copy, not
a disk read, with the same bytes: for a read-only file mapping the call changes only what is
resident, never what is read. Writable mappings (torch's parked weights: a LoRA may write to
them) are left alone. Doing it during the work, not only after, keeps the two copies from ever
being whole at once: the peak, not only the steady state, comes down.

Linux only (it reads /proc/self/maps); elsewhere it does nothing and memory is as before.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux's value on every architecture Easel runs on
PERIOD_S = 0.25    # how often pages are handed back while OpenVINO works: ~0.2 GB read per period


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def read_only_mappings(folder: Path) -> list[tuple[int, int, str]]:
    """(start, end, file) of each read-only file mapping of this process under `folder`."""
    prefix = str(Path(folder).resolve()) + "/"
    spans = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix) and "w" not in fields[1]:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


def release_pages(folder: Path) -> int:
    """Drop the resident pages of the read-only file mappings under `folder` from this process;
    the bytes of the mappings it covered (0 where it cannot: not Linux, or nothing mapped)."""
    if _MADVISE is None:
        return 0
    released = 0
    for start, end, _ in read_only_mappings(folder):
        if _MADVISE(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
        else:  # not expected for a file mapping; memory stays as it was, nothing else changes
            logger.debug("madvise failed on %x-%x: errno %d", start, end, ctypes.get_errno())
    return released


@contextmanager
def returning_pages(folder: Path, period: float = PERIOD_S) -> Iterator[None]:
    """Hand back `folder`'s mapped pages every `period` s while the block runs, and once after."""
    if _MADVISE is None:
        yield
        return
    stop = threading.Event()

    def keep_returning():
        while not stop.wait(period):
            release_pages(folder)

    thread = threading.Thread(target=keep_returning, name="easel-return-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_pages(folder)
