"""Easel: command line and server entry point.

    python app.py                      start the web UI (same as `serve`)
    python app.py txt2img --prompt ... generate from the command line; saved paths go to stdout
    python app.py img2img --init-img FILE --strength 0.8 --prompt ...
        [--mask FILE] [--mask-blur N] [--inpaint-full-res]   inpainting: white in the mask is redrawn
    python app.py models               models found, their family and device/precision plan
    python app.py upscale --input FILE [--upscaler NAME] [--scale 2|3|4] [--tile PX]   saved in outputs/upscale
        [--prompt TEXT] [--negative-prompt TEXT] [--steps N] [--cfg-scale X] [--noise-level N] [--seed N]   SD x4 only
    python app.py pnginfo FILE         the parameters saved in an image, and its watermark status
    python app.py selftest             check the install with a tiny random model (no weights needed)
    python app.py download [NAME|URL]  fetch a model from the catalogue (none named: the one recommended for
                                       this machine) or an https link to a .safetensors file; resumable
    python app.py download --list      the catalogue, and what suits this machine

Exit codes: 0 done, 2 bad input (one `error: ...` line on stderr), 1 runtime failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.samplers import SCHEDULE_TYPES  # data only: no torch, so --help stays quick

ROOT = Path(__file__).resolve().parent
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class BadInput(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump: exit 2
        raise BadInput(message)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=ROOT / "models",
                   help="models folder (A1111 layout: Stable-diffusion/, VAE/, ESRGAN/ ...)")
    p.add_argument("--outdir", type=Path, default=ROOT / "outputs", help="where images are saved")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data", help="settings and caches")
    p.add_argument("--device", default="auto", help="auto, cuda, mps, cpu or intel-gpu (OpenVINO on an Intel GPU)")
    p.add_argument("--precision", default="auto", help="auto, fp32, fp16, bf16, or int8 (OpenVINO on a CPU: the "
                   "UNet's weights in 8 bits, slightly less exact; wins over per-model settings)")
    p.add_argument("--backend", default="auto", help="what runs the UNet: auto (OpenVINO on a CPU where it is "
                   "installed, else torch), torch or openvino (wins over per-model settings)")
    p.add_argument("--no-watermark", action="store_true", help="do not embed the invisible watermark")


class _ControlUnitOption(argparse.Action):
    """--controlnet starts a unit; --control-image, --control-module and --control-weight after it
    set that unit's fields (so `--controlnet a --control-image x --controlnet b ...` pairs rightly)."""

    def __call__(self, parser, namespace, value, option=None):
        units = getattr(namespace, "controlnet", None) or []
        if self.dest == "controlnet":
            units.append({"model": value})
        elif not units:
            parser.error(f"{option}: give --controlnet MODEL before it")
        elif self.dest in units[-1]:
            parser.error(f"{option}: given twice for --controlnet {units[-1]['model']}")
        else:
            units[-1][self.dest] = value
        namespace.controlnet = units


def _add_controlnet_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlnet", action=_ControlUnitOption, default=[], metavar="MODEL",
                   help="a ControlNet from models/ControlNet (repeatable: up to 3 units, each followed by its "
                        "--control-* options)")
    p.add_argument("--control-image", dest="image", action=_ControlUnitOption, metavar="FILE",
                   help="the unit's picture (an edge map, or a photo for its --control-module)")
    p.add_argument("--control-module", dest="module", action=_ControlUnitOption, metavar="NAME",
                   help="the unit's preprocessor: none (default), canny, invert, threshold, scribble_xdog, tile_resample")
    p.add_argument("--control-weight", dest="weight", action=_ControlUnitOption, metavar="W",
                   help="the unit's weight, 0-2 (default 1)")


def _add_generation_options(p: argparse.ArgumentParser, img2img: bool) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default=None, help="a name from `app.py models`, or a checkpoint path")
    p.add_argument("--vae", default=None, help="Automatic (the checkpoint's own) or a file in models/VAE; "
                                               "default: the one remembered for the checkpoint")
    p.add_argument("--clip-skip", default=None, help="CLIP skip, 1-12: 2 for most anime SD 1.5 fine-tunes; "
                                                     "default: the one remembered for the checkpoint (1)")
    p.add_argument("--seed", default=None, help="-1 for random")
    p.add_argument("--steps", default=None)
    p.add_argument("--cfg-scale", default=None)
    p.add_argument("--sampler", default=None, help="A1111 name, e.g. 'Euler a', 'DPM++ 2M'")
    p.add_argument("--scheduler", default=None, help="schedule type, A1111's: " + ", ".join(SCHEDULE_TYPES)
                   + " (any sampler takes any; one it cannot follow runs on its own timesteps, with a note)")
    p.add_argument("--width", default=None)
    p.add_argument("--height", default=None)
    p.add_argument("--n-samples", default=None, help="images per batch (batch size)")
    p.add_argument("--n-iter", default=None, help="number of batches (batch count)")
    p.add_argument("--grid", action="store_true", help="also save a grid of the batch")
    p.add_argument("--tiling", action="store_true", help="seamless tiling: the picture repeats without seams")
    p.add_argument("--restore-faces", action="store_true",
                   help="redraw each face found with GFPGAN or CodeFormer (models/GFPGAN, models/Codeformer)")
    p.add_argument("--face-restorer", default=None, help="GFPGAN or CodeFormer (default: the first on disk)")
    p.add_argument("--codeformer-weight", default=None,
                   help="CodeFormer's fidelity, 0-1: 0 restores the most, 1 keeps closest to the face (default 0.5)")
    p.add_argument("--speed", default=None, help="exact (default) or fast: reuse the UNet's deep features "
                                                 "across steps, about 2.5-3x faster, a slightly different image")
    _add_controlnet_options(p)
    if not img2img:  # hires fix: A1111's names, as in its API
        p.add_argument("--hires", dest="enable_hr", action="store_true",
                       help="hires fix: generate at --width x --height, enlarge, then refine with a second pass")
        p.add_argument("--hr-scale", default=None, help="hires fix: how much to enlarge, 1-4 (default 2)")
        p.add_argument("--hr-upscaler", default=None, help="hires fix: Latent (default), Lanczos, or an upscaler model from models/ESRGAN, RealESRGAN or SwinIR")
        p.add_argument("--hr-steps", default=None, help="hires fix: second-pass steps (default: same as --steps)")
        p.add_argument("--strength", default=None, help="hires fix: denoising strength of the second pass (default 0.75)")
    if img2img:
        p.add_argument("--init-img", required=True, type=Path)
        p.add_argument("--strength", default=None, help="denoising strength 0-1 (default 0.75)")
        p.add_argument("--resize-mode", default=None, help="just resize, crop and resize, resize and fill")
        # Inpainting: A1111's names, as in its API.
        p.add_argument("--mask", type=Path, default=None, help="inpaint: white redraws, black keeps (the init "
                                                               "image's size; transparency counts as black)")
        p.add_argument("--mask-blur", default=None, help="inpaint: blur the mask's edge by this many pixels (default 4)")
        p.add_argument("--inpainting-fill", default=None, help="inpaint: masked content: original (default), fill, "
                                                               "latent noise, latent nothing")
        p.add_argument("--inpaint-full-res", dest="inpaint_full_res", action="store_true",
                       help="inpaint only the masked area (plus padding) at the full size, then paste it back")
        p.add_argument("--inpaint-padding", default=None, help="inpaint: padding around the masked area in pixels "
                                                               "with --inpaint-full-res (default 32)")
        p.add_argument("--mask-invert", action="store_true", help="inpaint: redraw what the mask leaves black")


def build_parser() -> Parser:
    parser = Parser(prog="app.py", description="Easel: a local Stable Diffusion studio")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name in ("serve", "txt2img", "img2img", "upscale", "models", "pnginfo", "selftest", "download"):
        p = sub.add_parser(name)
        if name != "selftest":
            _add_engine_options(p)
        if name in ("txt2img", "img2img"):
            _add_generation_options(p, img2img=name == "img2img")
        if name == "pnginfo":
            p.add_argument("file", type=Path)
        if name == "upscale":
            p.add_argument("--input", required=True, type=Path, help="the image to upscale")
            p.add_argument("--upscaler", default=None, help="Lanczos (default), a file from models/ESRGAN, "
                                                            "RealESRGAN, SwinIR, or 'SD x4: MODEL' for an SD x4 "
                                                            "upscaler checkpoint (see `app.py models`)")
            p.add_argument("--scale", default="4", help="2, 3 or 4")
            p.add_argument("--tile", default=None, help="tile size in input pixels (default 256, the SD x4 "
                                                        "upscaler's 128; 0: no tiling)")
            # The SD x4 upscaler's own options: refused (exit 2) with any other upscaler.
            p.add_argument("--prompt", default=None, help="SD x4 upscaler only: what the image shows")
            p.add_argument("--negative-prompt", default=None, help="SD x4 upscaler only")
            p.add_argument("--steps", default=None, help="SD x4 upscaler only: denoising steps (default 20)")
            p.add_argument("--noise-level", default=None, help="SD x4 upscaler only: noise added to the input, "
                                                               "0..the model's max_noise_level (350); default 20")
            p.add_argument("--seed", default=None, help="SD x4 upscaler only: -1 (default) for random")
            p.add_argument("--cfg-scale", default=None, help="SD x4 upscaler only: how closely to follow the prompt, "
                                                             "0-30 (default 9)")
        if name == "models":
            p.add_argument("--set-precision", nargs=2, metavar=("MODEL", "PRECISION"),
                           help="remember a precision (auto, fp32, fp16, bf16, int8) for one checkpoint")
            p.add_argument("--set-backend", nargs=2, metavar=("MODEL", "BACKEND"),
                           help="remember a backend (auto, torch, openvino) for one checkpoint")
            p.add_argument("--set-distilled", nargs=2, metavar=("MODEL", "KIND"),
                           help="say a checkpoint is distilled: turbo (4 steps, Euler a, CFG 1 by default), "
                                "none, or auto (a file name with 'turbo' in it)")
            p.add_argument("--set-vae", nargs=2, metavar=("MODEL", "VAE"),
                           help="remember a VAE for one checkpoint: Automatic (its own) or a file in models/VAE")
        if name == "download":
            p.add_argument("what", nargs="?", default=None, metavar="NAME|URL",
                           help="a name from --list, or an https link to a .safetensors file; none: the "
                                "checkpoint recommended for this machine")
            p.add_argument("--list", action="store_true", help="list the catalogue with what suits this machine")
            p.add_argument("--folder", default=None, help="models subfolder for a link (default Stable-diffusion)")
            p.add_argument("--sha256", default=None, help="for a link: the file's sha256, checked before it is kept")
        if name in ("serve", "download"):
            p.add_argument("--catalog", type=Path, default=None, help="a catalogue file of your own "
                                                                      "(default: engine/configs/catalog.json)")
        if name == "serve":
            _add_serve_options(p)
    return parser


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    try:
        from ui.server import add_serve_options
    except ImportError:
        return
    add_serve_options(p)


def _engine(args, single_request: bool = False):
    from engine.engine import Engine

    return Engine(_config(args, single_request))


def _config(args, single_request: bool = False):
    from engine.engine import EngineConfig

    return EngineConfig(models_dir=args.models_dir, outputs_dir=args.outdir, data_dir=args.data_dir,
                        device=args.device, precision=args.precision, backend=args.backend,
                        watermark=not args.no_watermark,
                        catalog_path=getattr(args, "catalog", None), single_request=single_request)


def _generate(args, mode: str) -> int:
    from engine.images import open_image

    engine = _engine(args, single_request=True)  # this process makes one request's images, then ends
    model = args.model
    if model and Path(model).exists():
        model = engine.add_model_path(Path(model))  # a path typed by the user on their own machine
    fields = {
        "mode": mode, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
        "steps": args.steps, "cfg_scale": args.cfg_scale, "sampler": args.sampler, "schedule_type": args.scheduler,
        "width": args.width, "height": args.height, "batch_size": args.n_samples, "batch_count": args.n_iter,
        "save_grid": args.grid or None, "speed": args.speed, "vae": args.vae, "clip_skip": args.clip_skip,
        "tiling": args.tiling or None, "restore_faces": args.restore_faces or None,
        "face_restorer": args.face_restorer, "codeformer_weight": args.codeformer_weight,
    }
    if mode == "txt2img":
        fields.update(enable_hr=args.enable_hr or None, hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler,
                      hr_second_pass_steps=args.hr_steps, denoising_strength=args.strength)
    if mode == "img2img":
        init = open_image(args.init_img, "init_image")  # size, pixel and text bounds before decoding
        fields.update(init_image=init, denoising_strength=args.strength, resize_mode=args.resize_mode)
        if args.mask is not None:  # bounded before decoding, transparency kept (a painted layer's alpha)
            fields["mask"] = open_image(args.mask, "mask", keep_alpha=True)
        fields.update(mask_blur=args.mask_blur, inpainting_fill=args.inpainting_fill,
                      inpaint_full_res=args.inpaint_full_res or None, inpaint_full_res_padding=args.inpaint_padding,
                      inpainting_mask_invert=args.mask_invert or None)
    fields["controlnet"] = [_cli_unit(unit, i) for i, unit in enumerate(args.controlnet)]
    request = engine.make_request(fields, model=model)
    result = engine.generate(request, model=model)
    for note in result.notes:
        if note != result.save_error:  # said once, as the error below
            print(f"note: {note}", file=sys.stderr)
    for path in result.paths:
        print(path)
    if result.grid_path:
        print(result.grid_path)
    if result.save_error:  # the images were made but not (all) written: not a success for a script
        print(f"error: {_one_line(result.save_error)}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _cli_unit(unit: dict, index: int) -> dict:
    """A --controlnet unit's fields, its picture opened within the image bounds before decoding."""
    from engine.images import open_image

    if "image" not in unit:
        raise BadInput(f"--controlnet {unit['model']}: give its --control-image FILE")
    return {**unit, "image": open_image(Path(unit["image"]), f"controlnet[{index}].image")}


SD_X4_OPTIONS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "steps": "--steps",
                 "cfg_scale": "--cfg-scale", "noise_level": "--noise-level", "seed": "--seed"}


def _upscale(args) -> int:
    from engine.images import open_image

    engine = _engine(args)
    image = open_image(args.input, "input")  # size, pixel and text bounds before decoding
    sd = {field: getattr(args, field) for field in SD_X4_OPTIONS if getattr(args, field) is not None}
    if sd and not engine.is_sd_upscaler(args.upscaler):
        option = SD_X4_OPTIONS[next(iter(sd))]
        raise BadInput(f"{option}: only the SD x4 upscaler takes it (--upscaler 'SD x4: MODEL'), "
                       f"not {args.upscaler or 'Lanczos'!r}")
    result = engine.upscale(image, args.upscaler, args.scale, args.tile, **sd)
    for path in result.paths:
        print(path)
    for note in result.notes:
        if note != result.save_error:
            print(f"note: {_one_line(note)}", file=sys.stderr)
    if result.save_error:
        print(f"error: {_one_line(result.save_error)}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _models(args) -> int:
    engine = _engine(args)
    if args.set_precision:
        engine.set_model_precision(*args.set_precision)
    if args.set_backend:
        engine.set_model_backend(*args.set_backend)
    if args.set_distilled:
        engine.set_model_distillation(*args.set_distilled)
    if args.set_vae:
        engine.set_model_vae(*args.set_vae)
    statuses = engine.models()
    if not statuses:
        print(f"no models in {engine.checkpoint_dir}")
    # File names and reasons come from the models folder, which may hold downloaded files with
    # crafted names: each is printed as one escaped line.
    for s in statuses:
        if s.error:
            print(f"{_one_line(s.name)}\n    cannot be used: {_one_line(s.error)}")
        else:
            print(f"{_one_line(s.name)}\n    family: {s.family}\n    plan:   {s.plan}")
            if s.few_step:
                print(f"    few-step: {_one_line(s.few_step)}")
    for heading, files in engine.extra_models().items():
        if files:
            print(f"\n{heading}")
        for f in files:
            print(f"{_one_line(f.name)}\n    "
                  + (f"cannot be used: {_one_line(f.error)}" if f.error else f"ok: {f.tensors} tensors"))
    return 0


def _download(args) -> int:
    from engine.devices import Hardware
    from engine.downloads import DownloadJob, Downloads

    downloads = Downloads.for_config(_config(args), Hardware.detect())  # no engine: nothing else loads
    if args.list:
        offline = downloads.offline()
        print(f"This machine: {downloads.machine.describe()}")
        for row in downloads.rows():
            e = row.entry
            print(f"\n{e.name}: {e.title} ({e.size_text}, {e.licence})\n    {row.advice.label}: {row.advice.why}\n"
                  f"    good for: {e.good_for}\n    licence: {e.licence_url}\n    {row.status(offline)}")
        return 0
    from tqdm import tqdm

    bar = None

    def show(progress):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total, unit="B", unit_scale=True, file=sys.stderr, desc=progress.name[:30])
        bar.set_postfix_str(progress.phase, refresh=False)
        bar.total = progress.total
        bar.n = progress.done
        bar.refresh()

    try:
        path = downloads.fetch(args.what, DownloadJob(on_progress=show), folder=args.folder, sha256=args.sha256)
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return 0


def _pnginfo(args) -> int:
    from engine.engine import read_png_info

    info = read_png_info(args.file)  # the safe opener: a missing/huge/bad file is RequestError("image")
    print(info.parameters if info.parameters else "(no parameters found)")
    print("Watermark: " + {True: "Easel watermark found", False: "none found", None: "image too small to tell"}[info.watermark])
    return 0


def _one_line(message) -> str:
    """An error message as one printable line: a value echoed from the user (a file name, a
    sampler name) can carry newlines or terminal escapes; they are shown escaped, never obeyed."""
    text = str(message).replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c if c.isprintable() else ("\\n" if c == "\n" else f"\\x{ord(c):02x}" if ord(c) < 0x100
                                               else f"\\u{ord(c):04x}") for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            argv = ["serve", *argv]
        args = build_parser().parse_args(argv)
        import engine.compat  # noqa: F401 - installs the torchvision shim before transformers loads
        from engine.compat import quiet_library_logs

        quiet_library_logs()

        from engine.errors import EaselError, ModelNotFoundError, RequestError

        try:
            if args.command in ("txt2img", "img2img"):
                return _generate(args, args.command)
            if args.command == "upscale":
                return _upscale(args)
            if args.command == "models":
                return _models(args)
            if args.command == "pnginfo":
                return _pnginfo(args)
            if args.command == "selftest":
                from engine.selftest import run_selftest

                run_selftest()
                return 0
            if args.command == "download":
                return _download(args)
            from ui.server import serve

            return serve(_engine(args), args)
        except (RequestError, ModelNotFoundError) as e:
            raise BadInput(str(e)) from None
        except EaselError as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILURE
    except BadInput as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug or an environment failure: still one line, exit 1
        print(f"error: {_one_line(f'{type(e).__name__}: {e}')}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
