"""`python app.py selftest`: check an install with no weights on disk.

Builds a tiny random-weight model in a temp folder and runs txt2img and img2img through the whole
engine (loading, planning, prompt encoding, sampling, decoding, watermark, infotext, saving),
printing what it did and how long each part took.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from engine.devices import Hardware


def run_selftest(print_line: Callable[[str], None] = print, hardware: Hardware | None = None) -> None:
    from engine.engine import Engine, EngineConfig
    from engine.tiny import save_sd1_folder

    def timed(label: str, fn):
        start = time.perf_counter()
        result = fn()
        print_line(f"{label:<34} {time.perf_counter() - start:7.2f} s")
        return result

    with tempfile.TemporaryDirectory(prefix="easel-selftest-") as tmp:
        root = Path(tmp)
        timed("build tiny random-weight model", lambda: save_sd1_folder(root / "models" / "Stable-diffusion" / "tiny-sd1"))
        engine = timed("start engine", lambda: Engine(EngineConfig(root / "models", root / "outputs", root / "data"), hardware))
        loaded = timed("load model", lambda: engine.load_model("tiny-sd1"))
        print_line(f"plan: {loaded.plan.describe()}")
        request = engine.make_request({"prompt": "a (red:1.2) fox", "negative_prompt": "blurry", "seed": 1,
                                       "steps": 4, "width": 64, "height": 64})
        result = timed("txt2img 64x64, 4 steps", lambda: engine.generate(request))
        info = engine.png_info(result.paths[0])
        if not info.parameters or "Seed: 1" not in info.parameters:
            raise RuntimeError(f"saved PNG lacks its parameters: {result.paths[0]}")
        request = engine.make_request({"mode": "img2img", "prompt": "a fox", "init_image": result.images[0],
                                       "denoising_strength": 0.5, "seed": 2, "steps": 4})
        result = timed("img2img 64x64, strength 0.5", lambda: engine.generate(request))
        print_line(f"saved {result.paths[0].name}; parameters read back OK")
        print_line("selftest passed")
