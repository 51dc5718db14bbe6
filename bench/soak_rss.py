"""Server memory over many sequential jobs: `app.py serve --demo` on loopback, driven with gradio_client.

    venv/bin/python bench/soak_rss.py                      # 20 warm-up jobs, then 200, RSS every 25
    venv/bin/python bench/soak_rss.py --jobs 1000 --every 100 --json bench/soak_rss.json

Each job is a txt2img through the page's queue (64x64, 2 steps, a new seed each time). The server
process's RSS (psutil) is sampled after the warm-up and every `--every` jobs; a steady slope means
something keeps memory per job, a step that then stays flat is the allocator settling. The test
`tests/test_load.py::test_server_memory_does_not_grow_over_sequential_jobs` asserts on the same run
that the median 25-job window grows under 1 MiB (a step does not move it, a leak does) and that the
whole soak stays under a generous bound; this script is for longer runs and the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--every", type=int, default=25, help="sample RSS every N jobs")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the samples here")
    args = p.parse_args()

    import psutil
    import requests
    from gradio_client import Client

    from tests.browser_helpers import LOOPBACK, start_server_on

    with tempfile.TemporaryDirectory(prefix="easel-soak-") as tmp:
        tmp = Path(tmp)
        server = start_server_on(LOOPBACK, tmp, "--demo", env={"GRADIO_TEMP_DIR": str(tmp / "gradio-tmp")})
        try:
            info = requests.get(server.url + "/gradio_api/info", timeout=30).json()
            names = {q["label"]: q["parameter_name"] for q in info["named_endpoints"]["/txt2img"]["parameters"]}
            client = Client(server.url, verbose=False, download_files=str(tmp / "client"))
            process = psutil.Process(server.process.pid)
            seed = 1

            def run(n: int) -> None:
                nonlocal seed
                for _ in range(n):
                    client.predict(**{names["Prompt"]: "soak", names["Negative prompt"]: "", names["Steps"]: args.steps,
                                      names["Width"]: args.size, names["Height"]: args.size,
                                      names["Seed (-1: random)"]: seed}, api_name="/txt2img")
                    seed += 1

            run(args.warmup)
            samples = [(0, process.memory_info().rss, 0.0)]
            print(f"after {args.warmup} warm-up jobs: {samples[0][1] / MIB:.1f} MiB", flush=True)
            started = time.monotonic()
            done = 0
            while done < args.jobs:
                n = min(args.every, args.jobs - done)
                run(n)
                done += n
                samples.append((done, process.memory_info().rss, time.monotonic() - started))
                print(f"{done:5d} jobs  {samples[-1][1] / MIB:8.1f} MiB  {samples[-1][2]:7.1f} s", flush=True)
        finally:
            server.stop()

    growth = (samples[-1][1] - samples[0][1]) / MIB
    took = samples[-1][2]
    print(f"RSS {samples[0][1] / MIB:.1f} -> {samples[-1][1] / MIB:.1f} MiB over {args.jobs} jobs "
          f"({growth:+.1f} MiB, {growth * 1024 / max(args.jobs, 1):+.1f} KiB/job); {took:.1f} s, "
          f"{took / max(args.jobs, 1):.2f} s/job ({args.size}x{args.size}, {args.steps} steps)")
    if args.json:
        args.json.write_text(json.dumps({"warmup": args.warmup, "size": args.size, "steps": args.steps,
                                         "samples": [{"jobs": j, "rss_mib": round(r / MIB, 1), "seconds": round(s, 1)}
                                                     for j, r, s in samples]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
