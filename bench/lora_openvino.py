"""LoRA jobs on the CPU's OpenVINO backend, as whole `app.py txt2img` processes (issue 23).

    venv/bin/python bench/lora_openvino.py                          # all variants, 1 round, 20 steps 512x512
    venv/bin/python bench/lora_openvino.py --rounds 2               # alternating order, 2 rounds
    venv/bin/python bench/lora_openvino.py --first-use              # each LoRA job pays its LoRA set's conversion
    venv/bin/python bench/lora_openvino.py --fresh-data             # every job in a new empty data dir
    venv/bin/python bench/lora_openvino.py --tiny --steps 1 --size 64 --variants plain,lora0   # smoke test

The model is the random-weight full-size SD 1.5 diffusers folder that bench/cpu_benchmark.py builds
(`bench/cache/models/Stable-diffusion/sd15-random`, built once). The LoRAs are random kohya/A1111
files written once into `bench/cache/models/Lora/`, seeded, shaped from the model's own weights:

- lora_a, lora_b, lora_c: rank 16 (alpha 16) on every attention projection of the UNet (to_q, to_k,
  to_v, to_out.0 of attn1 and attn2) and of the text encoder (q/k/v/out_proj); lora_down ~ N(0, 1),
  lora_up ~ N(0, 1e-3^2), fp16 like kohya's files.
- lcm-lora-sdv1-5: LCM-LoRA shaped (engine/lora.py recognises it by its name): UNet only, as the real
  one, the same attention projections plus ff.net.0.proj, ff.net.2 and proj_in/proj_out (1x1 convs in
  SD 1.5, so 4-D lora_down/lora_up). The engine gives it the LCM sampler, CFG 1 and 4 steps.

Variants (each its own `app.py txt2img` process, `--backend openvino --device cpu`):
  plain    no tag                      lora0.8  <lora:lora_a:0.8>          lora0  <lora:lora_a:0>
  three    lora_a, lora_b, lora_c at 0.5 each                              lcm4   <lora:lcm-lora-sdv1-5:1>, 4 steps

Measured per job: wall time of the whole process, peak RSS (the process tree's summed RSS, polled
every 50 ms; also the child's own ru_maxrss from wait4), the `note:` lines the CLI prints, and the
PSNR of its image against `plain`'s image of the same round (lcm4 is a 4-step image: its PSNR is
shown but means little). Before the measured rounds, one untimed `plain` job fills the data dir's
OpenVINO cache (not with --fresh-data, where every job converts). Writes nothing to docs/.

--first-use: before each LoRA job, the OpenVINO cache entries that the warm-up `plain` job did not
need (those a LoRA set added) are removed, so each LoRA job is a first use of its LoRA set while the
checkpoint's own entries stay cached.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "cache"
SEEN = ".lora-sets-seen"  # engine.openvino_lora.SEEN (not imported: this parent process stays light)
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
RANK = 16
LORAS = {"lora_a": 1, "lora_b": 2, "lora_c": 3}  # name: seed
LCM_NAME = "lcm-lora-sdv1-5"
VARIANTS = {  # name: (prompt suffix, steps or None for --steps)
    "plain": ("", None),
    "lora0.8": (" <lora:lora_a:0.8>", None),
    "lora0": (" <lora:lora_a:0>", None),
    "three": (" <lora:lora_a:0.5> <lora:lora_b:0.5> <lora:lora_c:0.5>", None),
    "lcm4": (f" <lora:{LCM_NAME}:1>", 4),
    "lightning4": (" <lora:sdxl_lightning_4step_lora:1>", 4),  # SDXL only: bench/sdxl_step_lora.py
}
# Module weights a LoRA covers (diffusers names in the model's safetensors).
ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
TE_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$")
LCM_EXTRA = re.compile(r"(\.ff\.net\.0\.proj|\.ff\.net\.2|\.attentions\.\d+\.proj_in|\.attentions\.\d+\.proj_out)\.weight$")


# --- the model and the LoRA files -----------------------------------------------------------------
def ensure_models(tiny: bool) -> tuple[Path, str]:
    """(models dir, checkpoint name): the full-size random SD 1.5 folder (bench/cpu_benchmark.py's),
    or with `tiny` engine/tiny.py's SD1 folder; both built once."""
    if tiny:
        folder = CACHE / "tiny-models" / "Stable-diffusion" / "tiny-sd1"
        if not (folder / "model_index.json").is_file():
            from engine.tiny import save_sd1_folder

            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            save_sd1_folder(tmp)
            os.replace(tmp, folder)
        return folder.parent.parent, folder.name
    from bench.cpu_benchmark import MODEL_NAME, ensure_model

    folder = ensure_model(CACHE)
    return folder.parent.parent, MODEL_NAME


def _shapes(part: Path) -> dict[str, tuple]:
    """Every weight's shape in a diffusers part folder (one or sharded safetensors files)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(part.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _kohya(prefix: str, key: str) -> str:
    return prefix + key[: -len(".weight")].replace(".", "_")


def make_lora(dest: Path, folder: Path, seed: int, lcm: bool = False, rank: int = RANK) -> Path:
    """A random kohya/A1111-layout LoRA for the diffusers folder `folder` (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    targets = []  # (kohya module name, weight shape)
    for key, shape in sorted(_shapes(folder / "unet").items()):
        if ATTN.search(key) or (lcm and LCM_EXTRA.search(key)):
            targets.append((_kohya("lora_unet_", key), shape))
    if not lcm:  # the real LCM-LoRA has no text encoder part
        for key, shape in sorted(_shapes(folder / "text_encoder").items()):
            if TE_ATTN.search(key):  # kohya names CLIPTextModel's modules from text_model.* (transformers 5 saves without it)
                targets.append((_kohya("lora_te_", key if key.startswith("text_model.") else "text_model." + key), shape))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in targets:
        out_dim, in_dim, *kernel = shape  # Linear (out, in) or 1x1 conv (out, in, 1, 1)
        down = torch.randn((rank, in_dim, *kernel), generator=gen)
        up = torch.randn((out_dim, rank, *[1] * len(kernel)), generator=gen) * 1e-3
        state[f"{name}.lora_down.weight"] = down.half().contiguous()
        state[f"{name}.lora_up.weight"] = up.half().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_output_name": dest.stem}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, dest)
    return dest


def ensure_loras(models_dir: Path, checkpoint: str) -> None:
    folder = models_dir / "Stable-diffusion" / checkpoint
    lora_dir = models_dir / "Lora"
    for name, seed in {**LORAS, LCM_NAME: 4}.items():
        path = lora_dir / f"{name}.safetensors"
        if not path.is_file():
            print(f"writing {path} (once)", flush=True)
            make_lora(path, folder, seed, lcm=name == LCM_NAME)


# --- one job --------------------------------------------------------------------------------------
def run_job(variant: str, models_dir: Path, checkpoint: str, steps: int, size: int, data_dir: Path,
            outdir: Path) -> dict:
    """One `app.py txt2img` process: wall time, peak RSS, notes, image path."""
    import psutil

    suffix, own_steps = VARIANTS[variant]
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "app.py"), "txt2img", "--models-dir", str(models_dir), "--model", checkpoint,
           "--prompt", PROMPT + suffix, "--seed", "1", "--steps", str(own_steps or steps),
           "--width", str(size), "--height", str(size), "--no-watermark", "--outdir", str(outdir),
           "--data-dir", str(data_dir), "--backend", "openvino", "--device", "cpu"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        root, peak_tree = psutil.Process(proc.pid), 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    pngs = [line.strip() for line in stdout.splitlines() if line.strip().lower().endswith(".png")]
    notes = [line[len("note: "):].strip() for line in (stderr + "\n" + stdout).splitlines() if line.startswith("note: ")]
    errors = [line.strip() for line in stderr.splitlines() if line.startswith("error:")]
    record = {"variant": variant, "seconds": wall, "rc": proc.returncode, "png": pngs[0] if pngs else None,
              "peak_tree_gb": peak_tree / 2**30, "maxrss_gb": usage.ru_maxrss / 2**20, "notes": notes,
              "errors": errors, "steps": own_steps or steps}
    if proc.returncode != 0 or not pngs:
        record["stderr_tail"] = stderr[-2000:]
    return record


def psnr(a_png: str, b_png: str) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_png).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_png).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- the OpenVINO cache --------------------------------------------------------------------------
def ov_entries(data_dir: Path) -> set[str]:
    root = data_dir / "cache" / "openvino"
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()


def clear_lora_entries(data_dir: Path, base: set[str]) -> list[str]:
    """Remove the OpenVINO cache entries not in `base` (the plain job's), or whose meta.json says
    lora, and the markers of sets fused before (engine.openvino_lora.stored_variant): what a LoRA
    set added. Returns the names removed."""
    root = data_dir / "cache" / "openvino"
    removed = []
    seen = {p.name for p in (root / SEEN).iterdir()} if (root / SEEN).is_dir() else set()  # a stored set's entry has its marker's name
    shutil.rmtree(root / SEEN, ignore_errors=True)  # the sets fused before: the next fuse is a first one again
    for name in sorted(ov_entries(data_dir)):
        meta = root / name / "meta.json"
        says_lora = meta.is_file() and "lora" in meta.read_text(encoding="utf-8", errors="replace").lower()
        if name not in base or name in seen or says_lora:
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(name)
    return removed


# --- the machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=1, help="rounds; the order alternates (reversed every other round)")
    p.add_argument("--steps", type=int, default=20, help="steps for every variant but lcm4 (4)")
    p.add_argument("--size", type=int, default=512, help="width and height")
    p.add_argument("--data-dir", type=Path, default=CACHE / "lora-openvino-data",
                   help="the jobs' --data-dir (settings, hash and OpenVINO caches); kept between runs")
    p.add_argument("--first-use", action="store_true", help="remove the LoRA sets' OpenVINO entries before each LoRA job")
    p.add_argument("--fresh-data", action="store_true", help="every job in a new empty data dir (conversion included)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed plain job that fills the cache")
    p.add_argument("--tiny", action="store_true", help="engine/tiny.py's SD1 model instead of full-size SD 1.5 (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    models_dir, checkpoint = ensure_models(args.tiny)
    ensure_loras(models_dir, checkpoint)
    work = Path(tempfile.mkdtemp(prefix="lora-openvino-", dir=CACHE))
    outdir = work / "outputs"
    machine = {"cpu": cpu_model(), "nproc": os.cpu_count(), "load_before": loadavg()}
    print(f"machine: {machine['cpu']}, nproc {machine['nproc']}, load before {machine['load_before']}", flush=True)
    print(f"model: {models_dir / 'Stable-diffusion' / checkpoint}; {args.steps} steps, {args.size}x{args.size}; "
          f"outputs in {work}", flush=True)

    fresh_count = 0

    def data_for_job() -> Path:
        nonlocal fresh_count
        if args.fresh_data:
            fresh_count += 1
            return work / f"data-{fresh_count}"
        return args.data_dir

    base: set[str] = set()
    if not args.fresh_data and not args.no_warmup:
        r = run_job("plain", models_dir, checkpoint, args.steps, args.size, args.data_dir, outdir / "warmup")
        print(f"warm-up plain: {r['seconds']:.1f} s, rc {r['rc']}", flush=True)
        if r["rc"]:
            print(r.get("stderr_tail", ""), file=sys.stderr)
    if not args.fresh_data:
        base = ov_entries(args.data_dir)

    records = []
    for rnd in range(args.rounds):
        order = variants if rnd % 2 == 0 else list(reversed(variants))
        for v in order:
            data = data_for_job()
            cleared = []
            if args.first_use and v != "plain" and not args.fresh_data:
                cleared = clear_lora_entries(data, base)
            r = run_job(v, models_dir, checkpoint, args.steps, args.size, data, outdir / f"r{rnd}-{v}")
            r["round"], r["cleared_entries"] = rnd, len(cleared)
            records.append(r)
            print(f"round {rnd} {v}: {r['seconds']:.1f} s, peak {r['peak_tree_gb']:.2f} GB, rc {r['rc']}"
                  + (f", cleared {len(cleared)} cache entries" if cleared else ""), flush=True)
            if r["rc"] or not r["png"]:
                print(r.get("stderr_tail", ""), file=sys.stderr)
    for r in records:
        ref = next((x for x in records if x["variant"] == "plain" and x["round"] == r["round"] and x["png"]), None)
        r["psnr_db"] = psnr(ref["png"], r["png"]) if ref and r["png"] else float("nan")
    machine["load_after"] = loadavg()

    print(f"\nmachine: {machine['cpu']}, nproc {machine['nproc']}, /proc/loadavg before {machine['load_before']}, "
          f"after {machine['load_after']}")
    mode = "fresh data dir per job" if args.fresh_data else ("first use of each LoRA set" if args.first_use
                                                              else "OpenVINO cache warm")
    print(f"{checkpoint}, {args.size}x{args.size}, {args.steps} steps (lcm4: 4), {args.rounds} round(s), {mode}\n")
    print("| variant | seconds per round | peak RSS GB | PSNR vs plain (dB) | notes |")
    print("| --- | --- | --- | --- | --- |")
    for v in variants:
        rows = [r for r in records if r["variant"] == v]
        secs = ", ".join(f"{r['seconds']:.1f}" + ("" if r["rc"] == 0 else " (failed)") for r in rows)
        peak = max(r["peak_tree_gb"] for r in rows)
        psnrs = ", ".join("exact" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}" for r in rows)
        notes = "; ".join(dict.fromkeys(n for r in rows for n in r["notes"] + r["errors"])) or "—"
        print(f"| {v} | {secs} | {peak:.2f} | {psnrs if v != 'plain' else '(reference)'} | {notes.replace('|', '/')} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(x) for k, x in vars(args).items()},
                                         "records": records}, indent=1, default=str))
    return 0 if all(r["rc"] == 0 and r["png"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
