"""Upscaling (engine/upscalers.py, Engine.upscale, `app.py upscale`) with tiny random ESRGAN models
built in Real-ESRGAN's key layout (tests/field_files.py) (RRDBNet: conv_first, body.N.rdbM.convK, conv_body,
conv_up1/2, conv_hr, conv_last), saved as .safetensors and as a plain-tensor .pth."""
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import app
from engine.errors import CancelledError, RequestError, UnknownCheckpointError, UnsafeCheckpointError
from engine.infotext import read_infotext, write_png_with_infotext
from engine.jobs import Job
from engine.upscalers import load_model, run_tiled, upscale_infotext
from tests.field_files import rrdb_state_dict


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upscale-models")
    (root / "ESRGAN").mkdir()
    (root / "RealESRGAN").mkdir()
    save_file(rrdb_state_dict(0), str(root / "ESRGAN" / "tiny4x.safetensors"))
    torch.save(rrdb_state_dict(1), root / "RealESRGAN" / "tiny4x-pth.pth")
    save_file({"foo.weight": torch.zeros(3, 3)}, str(root / "ESRGAN" / "mystery.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory, plain_cpu):
    from engine.engine import Engine, EngineConfig

    root = tmp_path_factory.mktemp("upscale-engine")
    return Engine(EngineConfig(models_dir, root / "outputs", root / "data"), plain_cpu)


def noise_image(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def gradient_image(size) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    array = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                            np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the list and loading --------------------------------------------------------------------------

def test_list_has_lanczos_and_the_model_files(engine):
    assert engine.upscaler_names() == ["Lanczos", "mystery", "tiny4x", "tiny4x-pth"]


@pytest.mark.parametrize("name", ["ESRGAN/tiny4x.safetensors", "RealESRGAN/tiny4x-pth.pth"])
def test_spandrel_detects_the_tiny_rrdbnet(models_dir, name):
    descriptor = load_model(models_dir / name)
    assert descriptor.architecture.id == "ESRGAN"
    assert descriptor.scale == 4
    assert descriptor.model.training is False


def test_unknown_architecture_is_one_error_naming_the_file(engine):
    with pytest.raises(UnknownCheckpointError) as info:
        engine.upscale(noise_image((32, 32)), "mystery", 4, save=False)
    message = str(info.value)
    assert message.startswith("mystery.safetensors: ") and "\n" not in message


def test_hostile_pth_is_refused_and_never_runs(tmp_path, plain_cpu):
    from engine.engine import Engine, EngineConfig

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "models" / "ESRGAN").mkdir(parents=True)
    (tmp_path / "models" / "ESRGAN" / "evil.pth").write_bytes(pickle.dumps({"conv_first.weight": Evil()}, protocol=4))
    eng = Engine(EngineConfig(tmp_path / "models", tmp_path / "out", tmp_path / "data"), plain_cpu)
    assert "evil" in eng.upscaler_names()
    with pytest.raises(UnsafeCheckpointError, match=r"^evil\.pth: refused: this pickle would call os\.system"):
        eng.upscale(noise_image((32, 32)), "evil", 4)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


# --- sizes, scales -------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("upscaler", ["tiny4x", "tiny4x-pth", "Lanczos"])
def test_output_is_exactly_scale_times_the_input(engine, upscaler, scale):
    image, name = engine.upscalers.upscale_image(noise_image((37, 29)), upscaler, scale, tile=32, overlap=4)
    assert image.size == (37 * scale, 29 * scale) and image.mode == "RGB" and name == upscaler
    assert pixels(image).std() > 2  # not a flat image: the model really ran


def test_a_scale_the_model_cannot_reach_names_scale(tmp_path, plain_cpu):
    from engine.engine import Engine, EngineConfig

    (tmp_path / "m" / "ESRGAN").mkdir(parents=True)
    save_file(rrdb_state_dict(2, up_convs=1), str(tmp_path / "m" / "ESRGAN" / "tiny2x.safetensors"))
    assert load_model(tmp_path / "m" / "ESRGAN" / "tiny2x.safetensors").scale == 2
    eng = Engine(EngineConfig(tmp_path / "m", tmp_path / "out", tmp_path / "data"), plain_cpu)
    assert eng.upscalers.upscale_image(noise_image((20, 20)), "tiny2x", 2, tile=0)[0].size == (40, 40)
    with pytest.raises(RequestError, match=r"^scale: tiny2x is a 2x model: it cannot reach 4x"):
        eng.upscale(noise_image((20, 20)), "tiny2x", 4)


@pytest.mark.parametrize("kwargs, field", [
    ({"scale": 5}, "scale"), ({"scale": "x"}, "scale"), ({"scale": 2.5}, "scale"), ({"tile": 7}, "tile"),
    ({"tile": 64, "overlap": 32}, "tile_overlap"), ({"upscaler": "../../etc/passwd"}, "upscaler"),
])
def test_bad_options_name_the_field(engine, kwargs, field):
    args = {"upscaler": "Lanczos", "scale": 4, "tile": 256, **kwargs}
    with pytest.raises(RequestError) as info:
        engine.upscale(noise_image((16, 16)), args.pop("upscaler"), args.pop("scale"), args.pop("tile"),
                       save=False, **args)
    assert str(info.value).startswith(f"{field}: ")


def test_output_pixel_budget_names_scale(engine):
    with pytest.raises(RequestError, match=r"^scale: 4000x4000 at 4x would be 16000x16000"):
        engine.upscale(Image.new("RGB", (4000, 4000)), "Lanczos", 4, save=False)


# --- tiles -----------------------------------------------------------------------------------------

def test_tiled_and_untiled_agree_away_from_the_seams(engine):
    """120 px in 64 px tiles overlapping by 8: tiles at 0 and 56, inner edges at 56 and 64. The tiny
    RRDBNet sees about 20 input pixels around each pixel, so pixels more than 20 px from an inner
    edge (input 0..35 and 85..119) come out the same; tolerance: 1/255 (rounding)."""
    source = noise_image((120, 120), seed=3)
    tiled, _ = engine.upscalers.upscale_image(source, "tiny4x", 4, tile=64, overlap=8)
    whole, _ = engine.upscalers.upscale_image(source, "tiny4x", 4, tile=0)
    a, b = pixels(tiled), pixels(whole)
    far = np.r_[0:36 * 4, 85 * 4:120 * 4]
    assert np.abs(a[np.ix_(far, far)] - b[np.ix_(far, far)]).max() <= 1
    assert np.abs(a - b).mean() < 4  # near the seams the two differ only a little on average


def test_smooth_input_shows_no_seam():
    """A worst-case model whose every tile comes out 0.2 brighter or darker than the last: without
    blending that is a 51-level step at each seam; the linear feather spreads it over the overlap
    (8 px x 4 = 32 output px), so no two neighbouring pixels differ by more than the gradient's own
    slope plus 0.2/32."""
    offsets = iter([0.0, 0.2, -0.2, 0.1] * 10)

    def model(piece):
        up = torch.nn.functional.interpolate(piece, scale_factor=4, mode="bilinear", align_corners=False)
        return up * 0.5 + next(offsets)

    smooth = torch.from_numpy(np.asarray(gradient_image((120, 96)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    out = run_tiled(model, smooth, 4, tile=64, overlap=8)
    assert out.shape == (1, 3, 96 * 4, 120 * 4)
    step_x = (out[..., 1:] - out[..., :-1]).abs().max().item()
    step_y = (out[..., 1:, :] - out[..., :-1, :]).abs().max().item()
    slope = 0.5 / (120 * 4 - 1)  # the gradient itself, halved by the model
    assert step_x <= slope * 1.5 + 0.2 * 2 / 32 + 1e-4
    assert step_y <= 0.5 / (96 * 4 - 1) * 1.5 + 0.2 * 2 / 32 + 1e-4


def test_progress_per_tile_and_cancel_between_tiles(engine):
    updates = []
    engine.upscalers.upscale_image(noise_image((70, 70)), "tiny4x", 2, tile=32, overlap=4,
                                   job=Job(on_progress=updates.append))
    assert [(u.step, u.steps) for u in updates] == [(i, 9) for i in range(1, 10)]  # starts 0, 28, 38 per axis
    assert updates[-1].fraction == 1 and updates[0].eta is not None

    seen = []
    job = Job()

    def cancel_after_two(update):
        seen.append(update.step)
        if update.step == 2:
            job.cancel()

    job.on_progress = cancel_after_two
    before = set(engine.outputs.outdir.rglob("*.png"))
    with pytest.raises(CancelledError):
        engine.upscale(noise_image((70, 70)), "tiny4x", 4, tile=32, job=job)
    assert seen == [1, 2]  # the third tile never started
    assert set(engine.outputs.outdir.rglob("*.png")) == before  # nothing saved


# --- publishing ------------------------------------------------------------------------------------

SOURCE_INFO = "a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 128x128"


def test_published_with_watermark_after_upscaling_and_the_source_infotext(engine):
    source = Image.open(io.BytesIO(write_png_with_infotext(gradient_image((128, 128)), SOURCE_INFO)))
    source.load()
    result = engine.upscale(source, "tiny4x", 2, tile=64)
    (path,) = result.paths
    assert path.parent.parent.name == "upscale" and path.name.endswith("-1234.png")
    expected = SOURCE_INFO + ", Postprocess upscale by: 2, Postprocess upscaler: tiny4x"
    assert result.infotexts == (expected,)
    with Image.open(path) as saved:
        assert saved.size == (256, 256)
        assert read_infotext(saved) == expected
    info = engine.png_info(path)
    assert info.watermark is True
    assert info.fields["Postprocess upscaler"] == "tiny4x" and info.fields["Seed"] == "1234"


def test_infotext_of_an_image_without_one_and_a_second_upscale():
    assert upscale_infotext(None, "Lanczos", 4) == "Postprocess upscale by: 4, Postprocess upscaler: Lanczos"
    once = upscale_infotext(SOURCE_INFO, "a, b", 2)
    assert once.endswith('Postprocess upscale by: 2, Postprocess upscaler: "a, b"')
    assert upscale_infotext(once, "Lanczos", 4) == SOURCE_INFO + ", Postprocess upscale by: 4, Postprocess upscaler: Lanczos"


# --- the command line ------------------------------------------------------------------------------

def cli(capsys, *argv):
    code = app.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def dirs(models_dir, tmp_path):
    return ["--models-dir", str(models_dir), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]


def test_cli_upscale_prints_the_path_and_pnginfo_reads_it(capsys, dirs, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(write_png_with_infotext(gradient_image((128, 128)), SOURCE_INFO))
    code, out, err = cli(capsys, "upscale", *dirs, "--input", str(src), "--upscaler", "Lanczos", "--scale", "4")
    assert code == 0, err
    (line,) = out.splitlines()
    assert Path(line).is_file() and Path(line).is_relative_to(tmp_path / "out" / "upscale")
    code, out, err = cli(capsys, "pnginfo", *dirs, line)
    assert code == 0, err
    assert "Postprocess upscale by: 4, Postprocess upscaler: Lanczos" in out
    assert "Watermark: Easel watermark found" in out


@pytest.mark.parametrize("args, says", [
    ([], "--input"),
    (["--input", "{missing}"], "input: nope.png does not exist"),
    (["--input", "{text}"], "input: notes.png is not an image"),
    (["--input", "{png}", "--scale", "8"], "scale: must be one of 2, 3, 4"),
    (["--input", "{png}", "--tile", "abc"], "tile: must be a whole number"),
    (["--input", "{png}", "--upscaler", "nope"], "upscaler: 'nope' is not an upscaler; available: Lanczos, mystery, tiny4x"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, dirs, tmp_path, args, says):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    names = {"{missing}": str(tmp_path / "nope.png"), "{text}": str(tmp_path / "notes.png"),
             "{png}": str(tmp_path / "ok.png")}
    code, out, err = cli(capsys, "upscale", *dirs, *[names.get(a, a) for a in args])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


# --- the SD x4 upscaler (a checkpoint in models/Stable-diffusion) -----------------------------------

X4 = "SD x4: tiny-x4"
SD_ARGS = {"steps": 2, "seed": 5}  # the tiny model: 2 steps are enough to exercise the loop


@pytest.fixture(scope="module")
def sd_models_dir(tmp_path_factory) -> Path:
    """A tiny x4 upscaler and a tiny SD 1.x as diffusers folders, beside a tiny ESRGAN file."""
    from engine.tiny import save_sd1_folder
    from tests.tiny_models import save_folder, tiny_upscaler_pipeline

    root = tmp_path_factory.mktemp("sd-upscale-models")
    save_folder(tiny_upscaler_pipeline(0), root / "Stable-diffusion" / "tiny-x4")
    save_sd1_folder(root / "Stable-diffusion" / "tiny-sd1")
    (root / "ESRGAN").mkdir()
    save_file(rrdb_state_dict(0), str(root / "ESRGAN" / "tiny4x.safetensors"))
    return root


@pytest.fixture(scope="module")
def sd_engine_x4(sd_models_dir, tmp_path_factory, plain_cpu):
    from engine.engine import Engine, EngineConfig

    root = tmp_path_factory.mktemp("sd-upscale-engine")
    return Engine(EngineConfig(sd_models_dir, root / "outputs", root / "data"), plain_cpu)


def test_sd_x4_checkpoints_are_listed_after_the_files(sd_engine_x4):
    assert sd_engine_x4.upscaler_names() == ["Lanczos", "tiny4x", X4]  # tiny-sd1 generates: not listed
    assert sd_engine_x4.is_sd_upscaler(X4) and not sd_engine_x4.is_sd_upscaler("tiny4x")
    assert not sd_engine_x4.is_sd_upscaler(None)
    assert sd_engine_x4.manager.current is None  # listing loads nothing


@pytest.mark.parametrize("name", ["SD x4: tiny-sd1", "SD x4: ../Stable-diffusion/tiny-x4", "SD x4: nope",
                                  "tiny-x4", "Stable-diffusion/tiny-x4"])
def test_only_listed_sd_x4_names_resolve(sd_engine_x4, name):
    with pytest.raises(RequestError) as e:
        sd_engine_x4.upscale(noise_image((16, 16)), name, 4, save=False)
    assert e.value.field == "upscaler"


def test_sd_x4_upscale_is_exactly_4x_and_published_with_its_parameters(sd_engine_x4):
    source = write_png_with_infotext(gradient_image((40, 24)), SOURCE_INFO)
    from engine.images import open_image

    result = sd_engine_x4.upscale(open_image(source, "image"), X4, 4, 32, prompt="a red barn, sunset",
                                  negative_prompt="blurry", noise_level=30, **SD_ARGS)
    assert sd_engine_x4.manager.current.entry.name == "tiny-x4"  # loaded by the manager, for upscaling
    (path,) = result.paths
    assert path.parent.parent.name == "upscale"
    with Image.open(path) as saved:
        assert saved.size == (160, 96)
    info = sd_engine_x4.png_info(path)
    assert info.parameters.startswith(SOURCE_INFO + ", Postprocess upscale by: 4")
    assert info.fields["Postprocess upscaler"] == X4
    assert info.fields["Postprocess prompt"] == "a red barn, sunset"
    assert info.fields["Postprocess negative prompt"] == "blurry"
    assert info.fields["Postprocess noise level"] == "30" and info.fields["Postprocess steps"] == "2"
    assert info.fields["Postprocess seed"] == "5" and info.fields["Seed"] == "1234"


def test_sd_x4_scale_2_is_its_4x_brought_down_by_lanczos(sd_engine_x4):
    image = gradient_image((40, 24))
    two = sd_engine_x4.upscale(image, X4, 2, 32, save=False, **SD_ARGS).images[0]
    from engine.upscalers import check_sd_options

    four, _ = sd_engine_x4.upscalers.upscale_image(image, X4, 4, 32, sd=check_sd_options(**SD_ARGS))
    assert two.size == (80, 48)
    assert np.array_equal(pixels(two), pixels(four.resize((80, 48), Image.LANCZOS)))


def test_sd_x4_whole_image_tile_and_the_same_seed_gives_the_same_image(sd_engine_x4):
    image = gradient_image((40, 24))
    a = sd_engine_x4.upscale(image, X4, 4, 0, save=False, **SD_ARGS).images[0]
    b = sd_engine_x4.upscale(image, X4, 4, 0, save=False, **SD_ARGS).images[0]
    assert a.size == (160, 96) and np.array_equal(pixels(a), pixels(b))


def test_sd_x4_progress_per_tile(sd_engine_x4):
    updates = []
    sd_engine_x4.upscale(gradient_image((40, 24)), X4, 4, 32, Job(on_progress=updates.append), save=False, **SD_ARGS)
    assert [(u.step, u.steps) for u in updates] == [(1, 2), (2, 2)]


def test_generation_with_the_sd_x4_upscaler_is_still_refused(sd_engine_x4):
    from engine.errors import EaselError

    sd_engine_x4.upscale(gradient_image((40, 24)), X4, 4, 32, save=False, **SD_ARGS)
    assert sd_engine_x4.manager.current.entry.name == "tiny-x4"
    request = sd_engine_x4.make_request({"prompt": "x", "width": 64, "height": 64, "steps": 1}, model="tiny-x4")
    for attempt in (lambda: sd_engine_x4.generate(request, model="tiny-x4"),
                    lambda: sd_engine_x4.load_model("tiny-x4")):
        with pytest.raises(EaselError) as e:  # even while it is the loaded model
            attempt()
        assert str(e.value) == ("model: tiny-x4 is the SD x4 upscaler; it upscales images and cannot generate them")


def test_a_generating_checkpoint_is_not_loaded_for_upscaling(sd_engine_x4):
    from engine.errors import EaselError

    with pytest.raises(EaselError, match="tiny-sd1 is a SD 1.x checkpoint; it generates images and is not an upscaler"):
        with sd_engine_x4.manager.use("tiny-sd1", purpose="upscale"):
            pass


@pytest.mark.parametrize("kwargs, field", [
    ({"noise_level": 351}, "noise_level"), ({"noise_level": -1}, "noise_level"), ({"noise_level": "abc"}, "noise_level"),
    ({"steps": 0}, "steps"), ({"steps": 151}, "steps"), ({"seed": -2}, "seed"), ({"seed": 1.5}, "seed"),
    ({"prompt": 3}, "prompt"),
])
def test_sd_x4_bad_options_name_the_field(sd_engine_x4, kwargs, field):
    with pytest.raises(RequestError) as e:
        sd_engine_x4.upscale(gradient_image((40, 24)), X4, 4, 32, save=False, **{**SD_ARGS, **kwargs})
    assert e.value.field == field


def test_sd_x4_out_of_memory_steps_down_through_the_manager(sd_engine_x4, monkeypatch):
    """The run goes through manager.with_fallback: a first OOM is a step down and a note, then a rerun."""
    import engine.sd_upscaler as sd_upscaler

    real, calls, steps = sd_upscaler.upscale_sd_x4, [], []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(sd_upscaler, "upscale_sd_x4", flaky)
    monkeypatch.setattr(sd_engine_x4.manager, "step_down", lambda loaded: steps.append(1) or "stepped down (test)")
    result = sd_engine_x4.upscale(gradient_image((40, 24)), X4, 4, 32, save=False, **SD_ARGS)
    assert len(calls) == 2 and steps == [1] and result.notes == ("stepped down (test)",)
    assert result.images[0].size == (160, 96)


def test_cli_sd_x4_upscale_with_prompt_and_noise_level(capsys, sd_models_dir, tmp_path):
    dirs = ["--models-dir", str(sd_models_dir), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    src = tmp_path / "in.png"
    gradient_image((40, 24)).save(src)
    code, out, err = cli(capsys, "upscale", *dirs, "--input", str(src), "--upscaler", X4, "--scale", "2",
                         "--tile", "32", "--prompt", "a barn", "--noise-level", "40", "--steps", "2", "--seed", "9",
                         "--cfg-scale", "5.5")
    assert code == 0, err
    (line,) = out.splitlines()
    with Image.open(line) as saved:
        assert saved.size == (80, 48)
    code, out, err = cli(capsys, "pnginfo", *dirs, line)
    assert code == 0, err
    assert ('Postprocess upscale by: 2, Postprocess upscaler: "SD x4: tiny-x4", Postprocess prompt: a barn, '
            'Postprocess steps: 2, Postprocess CFG scale: 5.5, Postprocess noise level: 40, Postprocess seed: 9') in out


@pytest.mark.parametrize("args, says", [
    (["--upscaler", X4, "--noise-level", "351"], "error: noise_level: must be from 0 to 350, got 351"),
    (["--upscaler", X4, "--noise-level", "-3"], "error: noise_level: must be from 0"),
    (["--upscaler", X4, "--noise-level", "lots"], "error: noise_level: must be a whole number, got 'lots'"),
    (["--upscaler", X4, "--steps", "0"], "error: steps: must be from 1 to 150"),
    (["--upscaler", X4, "--cfg-scale", "31"], "error: cfg_scale: must be from 0 to 30, got 31"),
    (["--upscaler", X4, "--cfg-scale", "nan"], "error: cfg_scale: must be a finite number, got 'nan'"),
    (["--upscaler", "tiny4x", "--cfg-scale", "3"], "error: --cfg-scale: only the SD x4 upscaler takes it"),
    (["--upscaler", "tiny4x", "--noise-level", "10"], "error: --noise-level: only the SD x4 upscaler takes it"),
    (["--prompt", "a barn"], "error: --prompt: only the SD x4 upscaler takes it"),
])
def test_cli_sd_x4_bad_options_exit_2_with_one_line(capsys, sd_models_dir, tmp_path, args, says):
    dirs = ["--models-dir", str(sd_models_dir), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    gradient_image((40, 24)).save(tmp_path / "in.png")
    code, out, err = cli(capsys, "upscale", *dirs, "--input", str(tmp_path / "in.png"), "--tile", "32", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(says), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_sd_x4_guidance_changes_the_result(sd_engine_x4):
    """cfg_scale reaches the pipeline: 1 (no guidance: one UNet pass a step) differs from 9."""
    image = gradient_image((40, 24))
    plain = sd_engine_x4.upscale(image, X4, 4, 0, save=False, prompt="a barn", cfg_scale=1, **SD_ARGS).images[0]
    guided = sd_engine_x4.upscale(image, X4, 4, 0, save=False, prompt="a barn", cfg_scale=9, **SD_ARGS).images[0]
    assert list(plain.getdata()) != list(guided.getdata())
