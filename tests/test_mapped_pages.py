"""engine.mapped_pages: read-only mapped pages leave the resident set, and their bytes stay the same."""
import hashlib
import mmap
import os
import sys
import time

import pytest

from engine.mapped_pages import release_pages, returning_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise through /proc/self/maps: Linux")

SIZE = 8 * 2**20


def resident_bytes(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    target, inside, total = str(path.resolve()), False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                inside = len(fields) == 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def weights_file(folder):
    path = folder / "model.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def touch(view) -> str:
    return hashlib.sha256(view[:]).hexdigest()


def test_read_only_pages_leave_the_resident_set_and_read_back_the_same(tmp_path):
    path = weights_file(tmp_path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        before = touch(view)
        assert resident_bytes(path) >= SIZE // 2
        assert release_pages(tmp_path) >= SIZE
        assert resident_bytes(path) < SIZE // 8
        assert touch(view) == before == hashlib.sha256(path.read_bytes()).hexdigest()


def test_writable_mappings_are_left_alone(tmp_path):
    path = weights_file(tmp_path)
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[:4] = b"LoRA"  # a private copy-on-write page, as a LoRA writes into parked torch weights
        touch(view)
        assert release_pages(tmp_path) == 0
        assert view[:4] == b"LoRA"
        assert resident_bytes(path) >= SIZE // 2


def test_other_folders_are_left_alone(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()  # a name that shares the prefix
    path = weights_file(tmp_path / "ab")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        touch(view)
        assert release_pages(tmp_path / "a") == 0
        assert resident_bytes(path) >= SIZE // 2


def test_pages_are_returned_while_the_work_runs(tmp_path):
    path = weights_file(tmp_path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        with returning_pages(tmp_path, period=0.02):
            touch(view)
            deadline = time.monotonic() + 5
            while resident_bytes(path) >= SIZE // 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert resident_bytes(path) < SIZE // 8  # inside the block, not only after it
