"""One way to replace a small file so that no reader ever sees it half-written: write a uniquely
named temp file beside it, fsync, then os.replace(). A unique name (not a fixed `.tmp`) so two
processes writing the same file cannot collide; a failure removes the temp file. No torch here.

(Image outputs use their own numbered reservation scheme: engine/outputs.py.)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
