"""The peer: FastSD CPU's engine, optimum-intel's `OVStableDiffusionPipeline`, on the same random
full-size SD 1.5 folder as bench/lora_openvino.py, as whole processes (issue 23, item 4).

    bench/cache/optimum-venv/bin/python bench/peer_optimum.py                 # export once, then a 20-step 512x512 job
    bench/cache/optimum-venv/bin/python bench/peer_optimum.py --lcm           # 4-step job with the LCM-LoRA
    bench/cache/optimum-venv/bin/python bench/peer_optimum.py --jobs plain,lcm --rounds 2   # alternating
    bench/cache/optimum-venv/bin/python bench/peer_optimum.py --tiny --steps 1 --size 64 --jobs plain,lcm   # smoke test

Its own venv (optimum-intel 2.2 needs transformers < 5; Easel's venv has 5):

    /work/main/venv/bin/python -m venv bench/cache/optimum-venv
    printf 'torch==2.13.0\\ntransformers<5\\n' > /tmp/optimum-constraints.txt
    bench/cache/optimum-venv/bin/pip install -c /tmp/optimum-constraints.txt torch==2.13.0 \\
        "optimum-intel[openvino,diffusers]" "transformers<5" peft psutil
    bench/cache/optimum-venv/bin/pip list | grep -i nvidia          # must print nothing

optimum imports transformers, which imports torchvision; PyPI's torchvision is a CUDA build whose
operators fail to load beside the CPU torch, so this script imports Easel's `engine.compat` (it
needs only torch) first: "Could not import module 'OVStableDiffusionPipeline'" without it.

What runs (each step its own process; the parent measures wall time and the process tree's peak
RSS, polled every 50 ms, and the child reports its own split):
- export (once): `OVStableDiffusionPipeline.from_pretrained(folder, export=True)`, saved to
  bench/cache/optimum-sd15-ov. optimum's defaults: fp32 IR, no weight compression (SD 1.5's UNet is
  under 1B parameters).
- plain: load the IR (compile=False), `pipe.reshape(batch_size=1, height, width, num_images_per_prompt=1)`
  (static shapes, as FastSD CPU does), `pipe.compile()` = load_s; one 20-step job = gen_s. No
  INFERENCE_PRECISION_HINT is set: OpenVINO picks (bf16 on a CPU with native bf16); the compiled
  UNet's hint is reported. Euler (EulerDiscreteScheduler, 20 UNet calls), CFG 7, seed 1.
- lcm: optimum-intel 2.2 cannot put a LoRA on an OV pipeline (its modeling_diffusion.py has no LoRA
  code; `load_lora_weights` is diffusers' mixin, inherited, and fails on the OV UNet: the job
  records the error). So, as FastSD CPU does for OpenVINO, the LCM-LoRA is fused into the torch UNet
  (diffusers + peft, `fuse_lora`) and that pipeline exported to a second IR once
  (bench/cache/optimum-sd15-lcm-ov); the job runs it with LCMScheduler, 4 steps, CFG 1 (so the
  UNet is reshaped to batch 1: optimum's reshape assumes CFG, batch 2).
Writes nothing to docs/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_openvino import cpu_model, loadavg  # bench/ is this script's own folder: same machine line

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "cache"
EASEL_PYTHON = ROOT / "venv" / "bin" / "python"
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
LCM_FILE = "lcm-lora-sdv1-5.safetensors"


def paths(tiny: bool) -> dict[str, Path]:
    if tiny:
        models = CACHE / "tiny-models"
        return {"models": models, "folder": models / "Stable-diffusion" / "tiny-sd1",
                "ov": CACHE / "optimum-tiny-ov", "ov_lcm": CACHE / "optimum-tiny-lcm-ov"}
    models = CACHE / "models"
    return {"models": models, "folder": models / "Stable-diffusion" / "sd15-random",
            "ov": CACHE / "optimum-sd15-ov", "ov_lcm": CACHE / "optimum-sd15-lcm-ov"}


def ensure_inputs(tiny: bool) -> None:
    """The diffusers folder and the LCM-LoRA file, built by Easel's venv (bench/lora_openvino.py's
    code: the same files that script measures Easel on)."""
    p = paths(tiny)
    if (p["folder"] / "model_index.json").is_file() and (p["models"] / "Lora" / LCM_FILE).is_file():
        return
    code = ("import sys; sys.path.insert(0, %r); import engine.compat; from bench import lora_openvino as l; "
            "d, n = l.ensure_models(%r); l.ensure_loras(d, n)") % (str(ROOT), tiny)
    subprocess.run([str(EASEL_PYTHON), "-c", code], check=True, cwd=ROOT)


# --- children -------------------------------------------------------------------------------------
def _import_pipeline():
    sys.path.insert(0, str(ROOT))
    import engine.compat  # noqa: F401  (torchvision shim; needs only torch)
    from optimum.intel import OVStableDiffusionPipeline

    return OVStableDiffusionPipeline


def source_view(folder: Path) -> Path:
    """The diffusers folder as this venv's transformers (4.x) reads it: Easel's transformers 5
    saved the tokenizer as tokenizer.json alone (4.x's CLIPTokenizer wants vocab.json and
    merges.txt) and the text encoder's keys without `text_model.`. A folder of symlinks to the
    UNet, VAE and scheduler, a re-keyed copy of the text encoder (~0.5 GB at full size) and a
    tokenizer saved by this transformers; the source folder is not touched."""
    from transformers import CLIPTokenizerFast

    view = CACHE / f"optimum-src-{folder.name}"
    if (view / "model_index.json").exists():
        return view
    tmp = view.with_name(view.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name not in ("tokenizer", "text_encoder"):
            (tmp / item.name).symlink_to(item.resolve())
    # transformers 5 saves CLIPTextModel's weights without the `text_model.` prefix that 4.x's
    # CLIPTextModel expects (4.x would silently start from new random weights): re-keyed copy.
    from safetensors.torch import load_file, save_file

    (tmp / "text_encoder").mkdir()
    for item in (folder / "text_encoder").iterdir():
        if item.suffix == ".safetensors":
            state = load_file(str(item))
            state = {k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k: v
                     for k, v in state.items()}
            save_file(state, str(tmp / "text_encoder" / item.name), metadata={"format": "pt"})
        else:
            (tmp / "text_encoder" / item.name).symlink_to(item.resolve())
    CLIPTokenizerFast.from_pretrained(str(folder / "tokenizer")).save_pretrained(str(tmp / "tokenizer"), legacy_format=True)
    shutil.rmtree(view, ignore_errors=True)
    os.replace(tmp, view)
    return view


def child_export(folder: Path, dest: Path, lora: Path | None) -> dict:
    t0 = time.perf_counter()
    OVStableDiffusionPipeline = _import_pipeline()
    folder = source_view(folder)
    source, scratch = folder, None
    fuse_s, changed = 0.0, None
    if lora is not None:  # fuse into the torch UNet (and text encoder, if the file has it), then export that
        import torch
        from diffusers import StableDiffusionPipeline
        from safetensors.torch import load_file

        t1 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, safety_checker=None)
        before = {k: float(v.double().norm()) for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(load_file(str(lora)), adapter_name="lcm")
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay; peft's layers go
        after = {k: float(v.double().norm()) for k, v in pipe.unet.state_dict().items()}
        changed = sum(1 for k in before if k in after and after[k] != before[k])
        lora_modules = len({k.rsplit(".lora_", 1)[0] for k in load_file(str(lora)) if ".lora_down." in k})
        scratch = Path(tempfile.mkdtemp(prefix="fused-", dir=CACHE))
        pipe.save_pretrained(str(scratch), safe_serialization=True)
        del pipe
        source, fuse_s = scratch, time.perf_counter() - t1
        print(f"fused: {changed} UNet weights changed, the file has {lora_modules} LoRA modules", flush=True)
    t2 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(str(source), export=True, compile=False)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"fuse_s": fuse_s, "fused_weights": changed, "export_s": time.perf_counter() - t2,
            "child_s": time.perf_counter() - t0}


def child_run(ov_dir: Path, lcm: bool, steps: int, size: int, out_png: Path, lora: Path | None) -> dict:
    t0 = time.perf_counter()
    OVStableDiffusionPipeline = _import_pipeline()
    import torch
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(str(ov_dir), compile=False)
    record: dict = {}
    if lcm and lora is not None:  # does optimum-intel take a LoRA on the OV pipeline? (it has no code for it)
        try:
            pipe.load_lora_weights(str(lora), adapter_name="probe")
            record["ov_load_lora_weights"] = "accepted (unexpected)"
        except Exception as error:  # noqa: BLE001 - the message is the finding
            record["ov_load_lora_weights"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    pipe.scheduler = (LCMScheduler if lcm else EulerDiscreteScheduler).from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    if lcm:  # CFG 1: one UNet pass per step, batch 1 (optimum's reshape made it 2, for CFG)
        model = pipe.unet.model
        shapes = {}
        for inp in model.inputs:
            shape = inp.get_partial_shape()
            if shape.rank.is_static and shape.rank.get_length() > 0 and shape[0].is_static and shape[0].get_length() == 2:
                shape[0] = 1
            shapes[inp.get_any_name()] = shape
        model.reshape(shapes)
    pipe.compile()
    load_s = time.perf_counter() - t1
    try:
        hint = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
        record["unet_precision"] = getattr(hint, "get_type_name", lambda: str(hint))()
    except Exception as error:  # noqa: BLE001
        record["unet_precision"] = f"? ({type(error).__name__})"
    t2 = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0 if lcm else 7.0, height=size, width=size,
                 generator=torch.Generator().manual_seed(1)).images[0]
    gen_s = time.perf_counter() - t2
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_png)
    record.update(import_s=import_s, load_s=load_s, gen_s=gen_s, png=str(out_png), child_s=time.perf_counter() - t0)
    return record


# --- parent -----------------------------------------------------------------------------------------
def measure(argv: list[str]) -> dict:
    """Run this script as a child with `argv`: wall time, the process tree's peak RSS, its RESULT."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            rss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, rss)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    result = next((json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")), None)
    record = {"wall_s": wall, "peak_gb": peak / 2**30, "rc": proc.returncode, **(result or {})}
    if proc.returncode or result is None:
        record["tail"] = text[-3000:]
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default=None, help="comma-separated: plain, lcm (default plain; lcm with --lcm)")
    ap.add_argument("--lcm", action="store_true", help="the 4-step LCM-LoRA job (alone unless --jobs says more)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the order alternates")
    ap.add_argument("--steps", type=int, default=20, help="steps of the plain job (lcm: 4)")
    ap.add_argument("--lcm-steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="engine/tiny.py's SD1 model (smoke test)")
    ap.add_argument("--re-export", action="store_true", help="export the IR(s) again")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = paths(args.tiny)
    lora = p["models"] / "Lora" / LCM_FILE

    if args.child:  # one measured process
        if args.child == "export":
            r = child_export(p["folder"], p["ov"], None)
        elif args.child == "export-lcm":
            r = child_export(p["folder"], p["ov_lcm"], lora)
        else:
            lcm = args.child == "lcm"
            r = child_run(p["ov_lcm"] if lcm else p["ov"], lcm, args.lcm_steps if lcm else args.steps, args.size,
                          args.out, lora if lcm else None)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    jobs = [j.strip() for j in (args.jobs or ("lcm" if args.lcm else "plain")).split(",") if j.strip()]
    if args.lcm and "lcm" not in jobs:
        jobs.append("lcm")
    bad = [j for j in jobs if j not in ("plain", "lcm")]
    if bad:
        ap.error(f"unknown job(s) {', '.join(bad)}: plain, lcm")
    ensure_inputs(args.tiny)
    work = Path(tempfile.mkdtemp(prefix="peer-optimum-", dir=CACHE))
    common = ["--steps", str(args.steps), "--lcm-steps", str(args.lcm_steps), "--size", str(args.size)] + \
        (["--tiny"] if args.tiny else [])
    machine = {"cpu": cpu_model(), "nproc": os.cpu_count(), "load_before": loadavg()}
    print(f"machine: {machine['cpu']}, nproc {machine['nproc']}, load before {machine['load_before']}", flush=True)
    exports = []
    for job, key, child in (("plain", "ov", "export"), ("lcm", "ov_lcm", "export-lcm")):
        if job in jobs and (args.re_export or not (p[key] / "model_index.json").is_file()):
            print(f"exporting {p[key]} (once)", flush=True)
            r = measure(["--child", child, *common])
            r["what"] = child
            exports.append(r)
            print(f"  {child}: {r['wall_s']:.1f} s, peak {r['peak_gb']:.2f} GB, rc {r['rc']}", flush=True)
            if r["rc"]:
                print(r.get("tail", ""), file=sys.stderr)
                return 1
    records = []
    for rnd in range(args.rounds):
        for job in (jobs if rnd % 2 == 0 else list(reversed(jobs))):
            r = measure(["--child", job, "--out", str(work / f"r{rnd}-{job}.png"), *common])
            r.update(job=job, round=rnd)
            records.append(r)
            print(f"round {rnd} {job}: {r['wall_s']:.1f} s, peak {r['peak_gb']:.2f} GB, rc {r['rc']}", flush=True)
            if r["rc"]:
                print(r.get("tail", ""), file=sys.stderr)
    machine["load_after"] = loadavg()
    print(f"\nmachine: {machine['cpu']}, nproc {machine['nproc']}, /proc/loadavg before {machine['load_before']}, "
          f"after {machine['load_after']}")
    print(f"{p['folder'].name}, {args.size}x{args.size}, plain {args.steps} steps, lcm {args.lcm_steps} steps, "
          f"optimum-intel OVStableDiffusionPipeline, static shapes\n")
    for r in exports:
        print(f"{r['what']}: {r['wall_s']:.1f} s (fuse {r.get('fuse_s', 0):.1f} s, export {r.get('export_s', 0):.1f} s), "
              f"peak {r['peak_gb']:.2f} GB" + (f", {r['fused_weights']} UNet weights changed by the fused LoRA"
                                               if r.get("fused_weights") is not None else ""))
    print("| job | process s | import s | load+compile s | generation s | peak RSS GB | UNet precision |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if r["rc"]:
            print(f"| {r['job']} (round {r['round']}) | failed | | | | {r['peak_gb']:.2f} | |")
            continue
        print(f"| {r['job']} (round {r['round']}) | {r['wall_s']:.1f} | {r['import_s']:.1f} | {r['load_s']:.1f} | "
              f"{r['gen_s']:.1f} | {r['peak_gb']:.2f} | {r.get('unet_precision', '?')} |")
    probe = next((r["ov_load_lora_weights"] for r in records if "ov_load_lora_weights" in r), None)
    if probe:
        print(f"\npipe.load_lora_weights on the OV pipeline: {probe}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "exports": exports, "records": records}, indent=1))
    return 0 if all(r["rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
