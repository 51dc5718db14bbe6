"""Numbered, atomic PNG saving and grids."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import engine.outputs as outputs
from engine.errors import EaselError, RequestError
from engine.infotext import read_infotext
from engine.outputs import make_grid, save_grid, save_png

DAY = datetime.date(2026, 11, 23)
REPO = Path(__file__).resolve().parent.parent


def small(color=(10, 20, 30), size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_save_png_path_layout(tmp_path):
    path = save_png(small(), tmp_path, "txt2img", 1234, "a cat", when=DAY)
    assert path == tmp_path / "txt2img" / "2026-11-23" / "00001-1234.png"


def test_save_png_writes_image_and_infotext(tmp_path):
    path = save_png(small((1, 2, 3)), tmp_path, "img2img", 7, "a cat\nSteps: 1, Seed: 7, CFG scale: 3", when=DAY)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.convert("RGB").getpixel((0, 0)) == (1, 2, 3)
        assert read_infotext(image) == "a cat\nSteps: 1, Seed: 7, CFG scale: 3"


def test_numbers_continue_after_existing_files(tmp_path):
    folder = tmp_path / "txt2img" / DAY.isoformat()
    folder.mkdir(parents=True)
    (folder / "00041-9.png").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"x")
    assert save_png(small(), tmp_path, "txt2img", 5, None, when=DAY).name == "00042-5.png"


def test_same_seed_twice_never_overwrites(tmp_path):
    first = save_png(small((1, 1, 1)), tmp_path, "txt2img", 5, "one", when=DAY)
    second = save_png(small((2, 2, 2)), tmp_path, "txt2img", 5, "two", when=DAY)
    assert (first.name, second.name) == ("00001-5.png", "00002-5.png")
    assert read_infotext(first) == "one"


def test_default_date_is_today(tmp_path):
    path = save_png(small(), tmp_path, "upscale", 0, None)
    assert path.parent.name == datetime.date.today().isoformat()


@pytest.mark.parametrize("mode", ["../escape", "txt2img/..", "", "TXT2IMG", "/tmp"])
def test_mode_must_be_a_known_name(tmp_path, mode):
    with pytest.raises(RequestError, match="mode"):
        save_png(small(), tmp_path, mode, 1, None, when=DAY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_seed_must_be_a_whole_number(tmp_path, seed):
    with pytest.raises(RequestError, match="seed"):
        save_png(small(), tmp_path, "txt2img", seed, None, when=DAY)


_WORKER = """
import datetime, sys, time
from pathlib import Path
from PIL import Image
from engine.outputs import save_png
outdir, go, tag, count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(go.parent / f"ready-{tag}").touch()
while not go.exists():  # start together with the parent's threads
    time.sleep(0.001)
for i in range(count):
    save_png(Image.new("RGB", (8, 8)), outdir, "txt2img", 99, f"{tag}-{i}", when=datetime.date(2026, 11, 23))
"""


def test_concurrent_threads_and_processes_get_distinct_consecutive_numbers(tmp_path):
    signals = tmp_path / "signals"
    signals.mkdir()
    go = signals / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), str(go), f"proc{n}", "4"], cwd=REPO, env=env)
        for n in range(2)
    ]
    # Wait until both processes have imported everything, so all 10 writers really overlap.
    while not all((signals / f"ready-proc{n}").exists() for n in range(2)):
        assert all(worker.poll() is None for worker in workers), "a worker process died while starting"
        time.sleep(0.01)
    start = threading.Barrier(9)
    errors = []

    def save_two(n):
        try:
            start.wait()
            for i in range(2):
                save_png(small(), tmp_path, "txt2img", 99, f"thread{n}-{i}", when=DAY)
        except Exception as error:  # surfaced below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=save_two, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    go.touch()
    start.wait()
    for thread in threads:
        thread.join()
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    assert errors == []

    folder = tmp_path / "txt2img" / DAY.isoformat()
    names = sorted(os.listdir(folder))
    assert names == [f"{n:05d}-99.png" for n in range(1, 8 * 2 + 2 * 4 + 1)]
    texts = {read_infotext(folder / name) for name in names}
    expected = {f"thread{n}-{i}" for n in range(8) for i in range(2)} | {f"proc{n}-{i}" for n in range(2) for i in range(4)}
    assert texts == expected


def test_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", broken_fsync)
    with pytest.raises(EaselError, match="No space left on device"):
        save_png(small(), tmp_path, "txt2img", 3, "a cat", when=DAY)
    assert os.listdir(tmp_path / "txt2img" / DAY.isoformat()) == []


def test_number_is_free_again_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "replace", lambda *args: (_ for _ in ()).throw(OSError(13, "denied")))
    with pytest.raises(EaselError):
        save_png(small(), tmp_path, "txt2img", 3, None, when=DAY)
    monkeypatch.undo()
    assert save_png(small(), tmp_path, "txt2img", 3, None, when=DAY).name == "00001-3.png"


def test_grid_is_near_square_row_by_row():
    colors = [(i * 40, 0, 0) for i in range(5)]
    grid = make_grid([small(c, (4, 3)) for c in colors])
    assert grid.size == (3 * 4, 2 * 3)  # 5 images: round(sqrt(5)) = 2 rows of 3
    assert [grid.getpixel((x * 4, y * 3)) for y in range(2) for x in range(3)][:5] == colors
    assert grid.getpixel((2 * 4, 1 * 3)) == (0, 0, 0)


def test_grid_with_given_rows():
    assert make_grid([small()] * 4, rows=1).size == (32, 8)
    assert make_grid([small()] * 4, rows=4).size == (8, 32)


@pytest.mark.parametrize("rows", [0, 5, 1.5])
def test_grid_rows_out_of_range(rows):
    with pytest.raises(RequestError, match="rows"):
        make_grid([small()] * 4, rows=rows)


def test_grid_needs_images():
    with pytest.raises(RequestError, match="images"):
        make_grid([])


def test_save_grid_shares_numbering(tmp_path):
    save_png(small(), tmp_path, "txt2img", 8, None, when=DAY)
    path = save_grid(make_grid([small()] * 2), tmp_path, "txt2img", 8, "grid text", when=DAY)
    assert path.name == "00002-grid-8.png"
    assert read_infotext(path) == "grid text"
