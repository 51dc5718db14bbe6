"""A 20-step 512² SD 1.5 canny ControlNet job on the CPU, as whole processes (issue 24):

    venv/bin/python bench/controlnet_canny.py                 # 1 round: Easel plain, Easel canny, stock diffusers
    venv/bin/python bench/controlnet_canny.py --rounds 2      # alternating order
    venv/bin/python bench/controlnet_canny.py --tiny --steps 2 --size 64   # smoke test of the script

The model is bench/cpu_benchmark.py's random-weight full-size SD 1.5 folder (built once). The
ControlNet is a random-weight full-size SD 1.5 ControlNet (diffusers' ControlNetModel.from_unet of
that UNet, its zero convs given random weights), written once in lllyasviel's original layout to
bench/cache/models/ControlNet/control_v11p_sd15_canny.safetensors (what Easel reads) and as a
diffusers folder (what the stock pipeline reads). The control picture is a drawn house, 512².

Jobs, each its own process:
  easel-plain   app.py txt2img --backend openvino, no unit
  easel-canny   the same with --controlnet control_v11p_sd15_canny --control-module canny
  stock         diffusers' StableDiffusionControlNetPipeline on torch (fp32, its defaults), the map made
                with cv2.Canny(100, 200) as diffusers' docs do
One untimed easel-canny job first fills Easel's OpenVINO cache (the UNet's plain and ControlNet
graphs, the ControlNet's). Wall time of each process and its peak RSS (ru_maxrss). Prints a
Markdown table; writes nothing to docs/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "cache"
PROMPT = "a photograph of a house by a lake, detailed, 8k"
CN_NAME = "control_v11p_sd15_canny"


def ensure_models(tiny: bool) -> tuple[Path, str]:
    """(models dir, checkpoint name), with the ControlNet files beside the checkpoint."""
    import engine.compat  # noqa: F401
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    from tests.ldm_export import controlnet_to_ldm

    if tiny:
        models = CACHE / "tiny-cn-models"
        folder = models / "Stable-diffusion" / "tiny-sd1"
        if not (folder / "model_index.json").is_file():
            from engine.tiny import save_sd1_folder

            save_sd1_folder(folder)
    else:
        from bench.cpu_benchmark import MODEL_NAME, ensure_model

        folder = ensure_model()
        models = folder.parent.parent
    cn_dir = models / "ControlNet"
    single, diffusers_folder = cn_dir / f"{CN_NAME}.safetensors", CACHE / ("tiny-cn" if tiny else "sd15-cn-diffusers")
    if not single.is_file() or not (diffusers_folder / "config.json").is_file():
        print("building a random-weight ControlNet (once)", flush=True)
        torch.manual_seed(1)
        net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(folder / "unet"), load_weights_from_unet=False)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                    p.normal_(0, 0.02)
        cn_dir.mkdir(parents=True, exist_ok=True)
        save_file(controlnet_to_ldm(net), str(single))
        net.save_pretrained(diffusers_folder)
    return models, folder.name


def control_picture(size: int, dest: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 230, 220))
    d = ImageDraw.Draw(image)
    s = size
    d.rectangle((s // 4, s // 2, 3 * s // 4, s - s // 10), fill=(150, 60, 40), outline="black", width=max(1, s // 100))
    d.polygon([(s // 5, s // 2), (s // 2, s // 5), (4 * s // 5, s // 2)], fill=(90, 40, 30), outline="black")
    d.rectangle((s // 2 - s // 20, s - s // 4, s // 2 + s // 20, s - s // 10), fill=(60, 40, 20))
    image.save(dest)
    return dest


def easel_cmd(models: Path, checkpoint: str, steps: int, size: int, data: Path, out: Path, picture: Path | None):
    cmd = [sys.executable, str(ROOT / "app.py"), "txt2img", "--models-dir", str(models), "--model", checkpoint,
           "--prompt", PROMPT, "--seed", "1", "--steps", str(steps), "--width", str(size), "--height", str(size),
           "--no-watermark", "--outdir", str(out), "--data-dir", str(data), "--backend", "openvino", "--device", "cpu"]
    if picture is not None:
        cmd += ["--controlnet", CN_NAME, "--control-image", str(picture), "--control-module", "canny"]
    return cmd


def stock_child(args) -> int:
    """The stock diffusers job (run as its own process by the parent)."""
    import engine.compat  # noqa: F401
    import cv2
    import numpy as np
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    net = ControlNetModel.from_pretrained(args.controlnet_folder)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(args.model_folder, controlnet=net, safety_checker=None,
                                                             requires_safety_checker=False)
    edges = cv2.Canny(np.asarray(Image.open(args.picture).convert("RGB")), 100, 200)
    hint = Image.fromarray(np.stack([edges] * 3, axis=2))
    image = pipe(PROMPT, image=hint, num_inference_steps=args.steps, width=args.size, height=args.size,
                 generator=torch.Generator("cpu").manual_seed(1)).images[0]
    image.save(args.out)
    print(args.out)
    return 0


def measure(cmd: list[str]) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    rc = os.waitstatus_to_exitcode(status)
    notes = [line[6:].strip() for line in stderr.splitlines() if line.startswith("note: ")]
    record = {"seconds": round(wall, 1), "rc": rc, "peak_gb": round(usage.ru_maxrss / 2**20, 2), "notes": notes}
    if rc:
        record["stderr_tail"] = stderr[-1500:]
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--stock-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-folder", help=argparse.SUPPRESS)
    p.add_argument("--controlnet-folder", help=argparse.SUPPRESS)
    p.add_argument("--picture", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stock_child:
        return stock_child(args)

    models, checkpoint = ensure_models(args.tiny)
    work = CACHE / "controlnet-run"
    work.mkdir(parents=True, exist_ok=True)
    data = CACHE / ("controlnet-data-tiny" if args.tiny else "controlnet-data")
    picture = control_picture(args.size, work / "house.png")
    cn_folder = CACHE / ("tiny-cn" if args.tiny else "sd15-cn-diffusers")
    jobs = {
        "easel-plain": lambda r: easel_cmd(models, checkpoint, args.steps, args.size, data, work / f"plain-{r}", None),
        "easel-canny": lambda r: easel_cmd(models, checkpoint, args.steps, args.size, data, work / f"canny-{r}", picture),
        "stock": lambda r: [sys.executable, __file__, "--stock-child", "--model-folder", str(models / "Stable-diffusion" / checkpoint),
                            "--controlnet-folder", str(cn_folder), "--picture", str(picture), "--steps", str(args.steps),
                            "--size", str(args.size), "--out", str(work / f"stock-{r}.png")],
    }
    if args.tiny:  # the tiny VAE halves (factor 2) where every real ControlNet's hint encoder takes 8
        del jobs["stock"]
    print("warm-up (untimed): easel-canny fills the OpenVINO cache", flush=True)
    warm = measure(jobs["easel-canny"]("warm"))
    print(json.dumps(warm), flush=True)
    results = []
    for r in range(args.rounds):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            rec = {"job": name, "round": r, **measure(jobs[name](r))}
            print(json.dumps(rec), flush=True)
            results.append(rec)
    print(f"\nload before: {os.getloadavg()}")
    print("| job | round | seconds | peak RSS GB |\n| --- | --- | --- | --- |")
    for rec in results:
        print(f"| {rec['job']} | {rec['round']} | {rec['seconds']} | {rec['peak_gb']} |")
    if args.json:
        args.json.write_text(json.dumps({"warm": warm, "results": results}, indent=1))
    return 0 if all(rec["rc"] == 0 for rec in results) else 1


if __name__ == "__main__":
    sys.exit(main())
