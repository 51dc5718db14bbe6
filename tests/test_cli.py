"""The command line: saved paths on stdout, exit 2 + one `error:` line on bad input, 1 on failure."""
import subprocess
import sys
from pathlib import Path

import pytest

import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def dirs(tiny_models_dir, tmp_path):
    return ["--models-dir", str(tiny_models_dir), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]


def cli(capsys, *argv):
    code = app.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_txt2img_prints_saved_paths(capsys, dirs):
    code, out, err = cli(capsys, "txt2img", *dirs, "--prompt", "a cat", "--negative-prompt", "dog",
                         "--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--n-samples", "2")
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert paths[0].name.endswith("-7.png") and paths[1].name.endswith("-8.png")


def rgb(path) -> "np.ndarray":
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def img2img_file(capsys, dirs, tmp_path, colours, strength):
    """Run `img2img` on a 64x64 image with a left and a right half; the saved file's path."""
    from PIL import Image

    init = tmp_path / f"init-{colours}.png"
    image = Image.new("RGB", (64, 64), colours[0])
    image.paste(Image.new("RGB", (32, 64), colours[1]), (32, 0))
    image.save(init)
    code, out, err = cli(capsys, "img2img", *dirs, "--prompt", "a cat", "--init-img", str(init), "--seed", "3",
                         "--strength", str(strength), "--steps", "4", "--width", "64", "--height", "64")
    assert code == 0, err
    (path,) = [Path(line) for line in out.splitlines()]
    assert path.parent.parent.name == "img2img"
    return init, path


def test_img2img_at_strength_zero_saves_the_init_images_pixels(capsys, dirs, tmp_path):
    init, saved = img2img_file(capsys, dirs, tmp_path, ((200, 30, 30), (20, 40, 220)), 0)
    assert abs(rgb(saved) - rgb(init)).max() <= 2


def test_img2img_result_depends_on_the_init_image(capsys, dirs, tmp_path):
    _, a = img2img_file(capsys, dirs, tmp_path, ((200, 30, 30), (20, 40, 220)), 0.3)
    _, b = img2img_file(capsys, dirs, tmp_path, ((20, 40, 220), (200, 30, 30)), 0.3)
    assert not (rgb(a) == rgb(b)).all()


@pytest.mark.parametrize("argv,field", [
    (["--steps", "0"], "steps"),
    (["--width", "63"], "width"),
    (["--sampler", "Euler z"], "sampler"),
    (["--model", "no-such-model"], "model"),
    (["--speed", "turbo"], "speed"),
])
def test_bad_input_exits_2_with_one_line(capsys, dirs, argv, field):
    code, out, err = cli(capsys, "txt2img", *dirs, "--prompt", "x", *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {field}")


def test_unknown_flag_exits_2_without_usage_dump(capsys):
    code, out, err = cli(capsys, "txt2img", "--prompt", "x", "--colour", "red")
    assert code == 2 and err.startswith("error: unrecognized arguments") and err.count("\n") == 1


def test_missing_init_image_is_bad_input(capsys, dirs, tmp_path):
    code, _, err = cli(capsys, "img2img", *dirs, "--prompt", "x", "--init-img", str(tmp_path / "nope.png"))
    assert code == 2 and err.startswith("error: init_image: ")


def test_unidentifiable_checkpoint_is_a_runtime_failure(capsys, tmp_path):
    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    from safetensors.torch import save_file
    import torch

    save_file({"some.other.weight": torch.zeros(2)}, str(sd / "mystery.safetensors"))
    code, _, err = cli(capsys, "txt2img", "--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "o"),
                       "--data-dir", str(tmp_path / "d"), "--prompt", "x")
    assert code == 1
    assert err.startswith("error: ") and "mystery.safetensors" in err and err.count("\n") == 1


def test_models_lists_family_and_plan(capsys, dirs):
    code, out, _ = cli(capsys, "models", *dirs)
    assert code == 0
    assert "tiny-sd1" in out and "family: SD 1.x" in out and "plan:   cpu" in out


def test_speed_fast_is_recorded_in_the_saved_image(capsys, dirs):
    code, out, err = cli(capsys, "txt2img", *dirs, "--prompt", "a cat", "--steps", "10", "--width", "64",
                         "--height", "64", "--seed", "5", "--speed", "fast")
    assert code == 0, err  # the txt2img run's own exit code, not pnginfo's
    code, info, err = cli(capsys, "pnginfo", out.splitlines()[0])
    assert code == 0, err
    assert "Speed: fast" in info


def test_pnginfo_reads_back_parameters(capsys, dirs):
    _, out, _ = cli(capsys, "txt2img", *dirs, "--prompt", "a (cat:1.2)", "--steps", "2", "--width", "64",
                    "--height", "64", "--seed", "99")
    code, info, _ = cli(capsys, "pnginfo", out.splitlines()[0])
    assert code == 0
    assert info.startswith("a (cat:1.2)\n") and "Seed: 99" in info and "Watermark:" in info


def test_real_process_exit_code_and_stderr(tmp_path):
    """The same contract seen from outside, as a script calling Easel sees it."""
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "txt2img", "--prompt", "x", "--cfg-scale", "99",
                           "--models-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    # No model in an empty folder is reported before the request is checked: exit 2 either way.
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_selftest_passes(capsys):
    code, out, err = cli(capsys, "selftest")
    assert code == 0, err
    assert "selftest passed" in out


def test_stored_precision_is_used_and_command_line_precision_wins(capsys, dirs):
    code, out, err = cli(capsys, "models", *dirs, "--set-precision", "tiny-sd1", "bf16")
    assert code == 0, err
    assert "unet bf16" in out
    _, out, _ = cli(capsys, "models", *dirs)  # remembered in the data folder
    assert "unet bf16" in out
    _, out, _ = cli(capsys, "models", *dirs, "--precision", "fp32")
    assert "unet fp32" in out


def test_bad_stored_precision_is_bad_input(capsys, dirs):
    code, _, err = cli(capsys, "models", *dirs, "--set-precision", "tiny-sd1", "fp8")
    assert code == 2 and err.startswith("error: precision: must be one of")


def test_models_listing_escapes_crafted_file_names(capsys, tmp_path):
    """A downloaded file's name can carry terminal escapes; `app.py models` shows them escaped."""
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    (folder / "evil\x1b]0;pwned\x07\x1b[2J.safetensors").write_bytes(b"\0" * 8)
    code, out, err = cli(capsys, "models", "--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "out"),
                         "--data-dir", str(tmp_path / "data"))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J.safetensors" in out
    assert "cannot be used" in out


def test_txt2img_exits_1_with_one_error_line_when_the_outputs_cannot_be_written(capsys, dirs, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outputs folder should be")
    argv = [a if a != str(tmp_path / "out") else str(blocker / "out") for a in dirs]
    code, out, err = cli(capsys, "txt2img", *argv, "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not saved" in errors[0]
    assert out == ""


def test_grid_saves_one_image_of_the_batch_tiles_with_its_parameters(capsys, dirs):
    from PIL import Image

    code, out, err = cli(capsys, "txt2img", *dirs, "--prompt", "a grid cat", "--steps", "2", "--width", "64",
                         "--height", "48", "--seed", "21", "--n-samples", "2", "--grid")
    assert code == 0, err
    *images, grid_path = [Path(line) for line in out.splitlines()]
    assert [p.name[-7:] for p in images] == ["-21.png", "-22.png"]
    assert grid_path.name.endswith("-grid-21.png") and grid_path.parent == images[0].parent
    grid = Image.open(grid_path)
    assert grid.size == (128, 48)  # two 64x48 tiles side by side
    assert (rgb(grid_path)[:, :64] == rgb(images[0])).all() and (rgb(grid_path)[:, 64:] == rgb(images[1])).all()
    parameters = grid.info["parameters"]
    assert parameters.startswith("a grid cat\n") and "Seed: 21" in parameters and "Size: 64x48" in parameters


def test_no_grid_without_the_flag(capsys, dirs, tmp_path):
    code, out, err = cli(capsys, "txt2img", *dirs, "--prompt", "a cat", "--steps", "1", "--width", "64",
                         "--height", "64", "--n-samples", "2")
    assert code == 0, err
    assert len(out.splitlines()) == 2 and not list((tmp_path / "out").rglob("*grid*"))
