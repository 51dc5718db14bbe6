"""The web UI's handlers, in-process, against the real engine on the tiny demo model."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from engine.engine import Engine, EngineConfig
from engine.errors import CancelledError, EaselError
from engine.jobs import ProgressUpdate
from ui.app_ui import create_ui
from ui.handlers import JobBoard
from ui.progress import describe
from ui.settings import SettingsStore, UISettings

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_config(tmp_path_factory) -> EngineConfig:
    root = tmp_path_factory.mktemp("ui-demo")
    return EngineConfig(models_dir=root / "models", outputs_dir=root / "outputs", data_dir=root / "data")


@pytest.fixture(scope="session")
def demo_engine(demo_config) -> Engine:
    return Engine.demo(demo_config)


@pytest.fixture(scope="session")
def page(demo_engine) -> gr.Blocks:
    return create_ui(demo_engine)


@pytest.fixture
def studio(page):
    return page.studio


def run(studio, key, fields):
    return list(studio.generate(key, fields, None))


def wired_function(page: gr.Blocks, api_name: str):
    """The function Gradio calls for an event, found by its api_name."""
    fns = [f for f in page.fns.values() if f.api_name == api_name]
    assert len(fns) == 1, api_name
    return fns[0]


def test_txt2img_returns_images_infotext_and_saves_files(studio):
    views = run(studio, ("s1", "txt2img"), {"mode": "txt2img", "prompt": "a red fox", "negative_prompt": "blurry", **SMALL})
    last = views[-1]
    assert len(last.images) == 1
    image, caption = last.images[0]
    assert caption == "Seed 7"
    assert last.infotexts[0].startswith("a red fox\nNegative prompt: blurry\n")
    assert "Seed: 7" in last.infotexts[0] and "Size: 64x64" in last.infotexts[0]
    saved = Path(image.filename)
    assert saved.is_file() and saved.is_relative_to(studio.engine.outputs.outdir)
    assert Image.open(saved).info["parameters"] == last.infotexts[0]


def test_txt2img_reports_progress_before_the_result(studio):
    views = run(studio, ("s1", "txt2img"), {"mode": "txt2img", "prompt": "x", **SMALL, "steps": 4})
    steps = [v.progress for v in views[:-1] if "Step " in v.progress]
    assert steps and "Step 4/4" in steps[-1]
    assert 'data-state="done"' in views[-1].progress


def barred(centre, bars, size=(96, 64), bar=16) -> Image.Image:
    """A `centre`-coloured image with `bar`-wide vertical bars of another colour at both sides."""
    image = Image.new("RGB", size, bars)
    image.paste(Image.new("RGB", (size[0] - 2 * bar, size[1]), centre), (bar, 0))
    return image


def img2img_view(studio, init, strength, **extra):
    fields = {"mode": "img2img", "prompt": "a cat", "init_image": init, "denoising_strength": strength,
              "resize_mode": "crop and resize", **SMALL, **extra}
    return run(studio, ("s1", "img2img"), fields)[-1]


def saved_pixels(view, k=0):
    image, _ = view.images[k]
    return np.asarray(Image.open(image.filename).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("resize_mode, edge", [("crop and resize", (200, 30, 30)), ("just resize", (20, 40, 220))])
def test_img2img_at_strength_zero_saves_the_resized_init_images_pixels(studio, resize_mode, edge):
    # 96x64 into 64x64: cropping keeps only the red centre; stretching keeps the blue side bars.
    view = img2img_view(studio, barred((200, 30, 30), (20, 40, 220)), 0.0, resize_mode=resize_mode)
    got = saved_pixels(view)
    assert got.shape == (64, 64, 3)
    assert np.abs(got[:, 0] - edge).max() <= 2
    assert np.abs(got[:, 32] - (200, 30, 30)).max() <= 2
    assert "img2img" in Path(view.images[0][0].filename).parts


def test_img2img_result_depends_on_the_init_image(studio):
    a = img2img_view(studio, barred((200, 30, 30), (20, 40, 220)), 0.3)
    b = img2img_view(studio, barred((20, 40, 220), (200, 30, 30)), 0.3)
    again = img2img_view(studio, barred((200, 30, 30), (20, 40, 220)), 0.3)
    assert "Denoising strength: 0.3" in a.infotexts[0]
    assert not np.array_equal(saved_pixels(a), saved_pixels(b))
    assert np.array_equal(saved_pixels(a), saved_pixels(again))  # same seed, same init: same image


@pytest.mark.parametrize("field, value", [("steps", 0), ("width", 65), ("cfg_scale", 99)])
def test_bad_value_error_names_the_field(studio, field, value):
    with pytest.raises(EaselError, match=f"^{field}: "):
        run(studio, ("s1", "txt2img"), {"mode": "txt2img", "prompt": "x", **SMALL, field: value})


def test_wired_handler_maps_widgets_by_name_and_shows_errors_readably(page):
    fn = wired_function(page, "txt2img")
    by_name = {name: c for c in fn.inputs for name in [getattr(c, "elem_id", None)] if name}
    values = {c: c.value for c in fn.inputs}  # the widgets' defaults
    values[by_name["txt2img-prompt"]] = "x"
    values[by_name["txt2img-steps"]] = 0
    with pytest.raises(gr.Error) as caught:
        list(fn.fn(values, gr.Request(session_hash="wired")))
    assert str(caught.value.message).startswith("steps: must be")
    assert "\n" not in caught.value.message


def test_wired_handler_turns_a_bug_into_one_line(page, monkeypatch):
    def broken(fields, model=None):
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr(page.studio.engine, "make_request", broken)
    fn = wired_function(page, "txt2img")
    with pytest.raises(gr.Error) as caught:
        list(fn.fn({c: c.value for c in fn.inputs}, gr.Request(session_hash="bug")))
    assert caught.value.message == "unexpected error (TypeError: boom); details are in the server's log"


def test_cancel_stops_the_running_job(studio):
    key = ("cancel-me", "txt2img")
    stream = studio.generate(key, {"mode": "txt2img", "prompt": "x", "width": 64, "height": 64, "steps": 150}, None)
    with pytest.raises(CancelledError, match=r"cancelled at step \d+/150"):
        for view in stream:
            if "Step " in view.progress:
                assert studio.cancel(key)


def test_cancel_while_waiting_stops_it_before_it_starts(studio):
    key = ("queued", "txt2img")
    token = studio.prepare(key)
    assert studio.cancel(key)
    with pytest.raises(CancelledError, match="before it started"):
        list(studio.generate(key, {"mode": "txt2img", "prompt": "x", **SMALL}, None, token))


def test_cancel_reaches_all_of_the_pages_jobs_and_no_others():
    board = JobBoard()
    (_, first), (_, second) = board.open(("me", "txt2img")), board.open(("me", "txt2img"))  # clicked twice
    (_, other_tab), (_, theirs) = board.open(("me", "img2img")), board.open(("them", "txt2img"))
    assert board.cancel(("me", "txt2img"))
    assert first.cancelled.is_set() and second.cancelled.is_set()
    assert not other_tab.cancelled.is_set() and not theirs.cancelled.is_set()
    assert not board.cancel(("nobody", "txt2img"))


def test_finished_jobs_are_forgotten():
    board = JobBoard()
    token, _ = board.open(("me", "txt2img"))
    board.finish(("me", "txt2img"), token)
    assert not board.cancel(("me", "txt2img"))


def test_png_info_reads_a_saved_file_and_sends_its_fields(studio):
    last = run(studio, ("s1", "txt2img"), {"mode": "txt2img", "prompt": "a (blue:1.2) bird", "negative_prompt": "fog",
                                           **SMALL, "cfg_scale": 6.5, "sampler": "DPM++ 2M", "schedule_type": "Karras"})[-1]
    text, watermark, parsed = studio.png_info(last.images[0][0].filename)
    assert text == last.infotexts[0]
    assert watermark == "image too small to tell"  # 64x64 is below the watermark's minimum size
    values = studio.fields_from_infotext(parsed)
    assert values == {"prompt": "a (blue:1.2) bird", "negative_prompt": "fog", "steps": 2, "sampler": "DPM++ 2M",
                      "schedule_type": "Karras", "cfg_scale": 6.5, "seed": 7, "width": 64, "height": 64, "speed": "exact",
                      "enable_hr": False, "clip_skip": 1, "tiling": False, "restore_faces": False}  # A1111: absent means 1 and off


def test_png_info_on_a_non_image_is_a_readable_error(studio, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(EaselError, match="^image: "):
        studio.png_info(bad)


def test_unknown_sampler_from_infotext_is_left_out(studio):
    values = studio.fields_from_infotext({"Prompt": "x", "Sampler": "Made Up", "Steps": "oops"})
    assert values == {"prompt": "x", "negative_prompt": "", "schedule_type": "Automatic", "speed": "exact",
                      "enable_hr": False, "clip_skip": 1, "tiling": False, "restore_faces": False}


def test_an_infotexts_vae_is_sent_as_the_pickers_name_when_models_vae_has_it(tmp_path):
    engine = Engine.demo(EngineConfig(tmp_path / "models", tmp_path / "outputs", tmp_path / "data"))
    (engine.config.models_dir / "VAE").mkdir(parents=True)
    (engine.config.models_dir / "VAE" / "vae-ft-mse-840000-ema-pruned.safetensors").write_bytes(b"{}")
    studio = create_ui(engine).studio
    a1111 = {"Prompt": "x", "VAE hash": "735e4c3a44", "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"}
    assert studio.fields_from_infotext(a1111)["vae"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    without_extension = {**a1111, "VAE": "vae-ft-mse-840000-ema-pruned"}
    assert studio.fields_from_infotext(without_extension)["vae"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert "vae" not in studio.fields_from_infotext({**a1111, "VAE": "kl-f8-anime2.ckpt"})  # not in models/VAE


def test_a_fast_image_sends_its_speed_back(studio):
    last = run(studio, ("s1", "txt2img"), {"mode": "txt2img", "prompt": "a kite", **SMALL, "steps": 10, "speed": "fast"})[-1]
    _, _, parsed = studio.png_info(last.images[0][0].filename)
    values = studio.fields_from_infotext(parsed)
    assert (values["speed"], values["steps"]) == ("fast", 10)


def test_an_unknown_speed_from_infotext_is_left_out(studio):
    values = studio.fields_from_infotext({"Prompt": "x", "Speed": "warp"})
    assert "speed" not in values


def test_settings_persist_across_a_new_create_ui(demo_config, tmp_path):
    config = EngineConfig(demo_config.models_dir, tmp_path / "cli-outputs", tmp_path / "data")
    first = create_ui(Engine.demo(config)).studio
    list(first.select_model(first.engine.model_names()[0]))
    first.save_output_settings(str(tmp_path / "my-outputs"), False)

    second = create_ui(Engine.demo(config)).studio
    assert second.default_model() == first.engine.model_names()[0]
    assert second.output_settings() == (str(tmp_path / "my-outputs"), False)
    assert SettingsStore(tmp_path / "data" / "settings.json").load().watermark is False


def test_output_folder_given_on_the_command_line_wins_over_the_saved_one(demo_config, tmp_path):
    config = EngineConfig(demo_config.models_dir, tmp_path / "cli-outputs", tmp_path / "data")
    SettingsStore(tmp_path / "data" / "settings.json").save(UISettings(outdir=str(tmp_path / "saved")))
    studio = create_ui(Engine.demo(config), keep_command_line=frozenset({"outdir"})).studio
    assert studio.output_settings()[0] == str(tmp_path / "cli-outputs")


def test_output_folder_cannot_be_changed_from_a_shared_page(demo_config, tmp_path):
    config = EngineConfig(demo_config.models_dir, tmp_path / "outputs", tmp_path / "data")
    studio = create_ui(Engine.demo(config), listen=True).studio
    with pytest.raises(EaselError, match="^output folder: "):
        studio.save_output_settings("/tmp/elsewhere", True)


def test_settings_file_that_is_not_json_reads_as_defaults(tmp_path):
    (tmp_path / "settings.json").write_text("{half")
    assert SettingsStore(tmp_path / "settings.json").load() == UISettings()


def test_settings_save_leaves_no_temp_files(tmp_path):
    store = SettingsStore(tmp_path / "settings.json")
    store.update(last_model="a")
    store.update(watermark=True)
    assert store.load() == UISettings(last_model="a", watermark=True)
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_without_models_the_page_says_where_to_put_one(tmp_path):
    engine = Engine(EngineConfig(tmp_path / "models", tmp_path / "outputs", tmp_path / "data"))
    banner = create_ui(engine).studio.banner()
    assert str(engine.library.checkpoint_dir) in banner and "python app.py download" in banner


def test_demo_page_says_it_makes_noise(studio):
    assert "noise" in studio.banner()


def test_progress_text_has_step_count_and_eta():
    update = ProgressUpdate(step=5, steps=20, batch=1, batches=2, elapsed=10.0)
    assert describe(update) == "Step 5/20 · batch 2/2 · 62% · ETA 6s"


def test_ui_never_imports_torch_diffusers_or_transformers():
    heavy = {"torch", "diffusers", "transformers"}
    for path in sorted((REPO / "ui").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & heavy, f"{path.name} imports {names}"


def test_size_sliders_step_by_what_the_model_accepts(studio):
    # The demo model's VAE halves the size once (scale factor 2), but diffusers' pipeline refuses
    # sizes not divisible by 8: the step is derived from both, so every slider value runs.
    changes = studio.model_fields(studio.default_model())
    assert changes["width"] == {"step": 8} and changes["height"] == {"step": 8}
    assert "sampler" not in changes  # an ordinary model keeps the A1111 defaults


def test_page_sliders_start_with_the_models_step(page):
    widths = [c for c in page.blocks.values() if getattr(c, "elem_id", None) == "txt2img-width"]
    assert widths and widths[0].step == 8  # lcm(VAE scale factor 2, the pipeline's check of 8)


def test_page_comes_up_when_the_default_model_is_broken(tmp_path):
    sd = tmp_path / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    (sd / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut short
    engine = Engine(EngineConfig(tmp_path / "models", tmp_path / "out", tmp_path / "data"))
    page = create_ui(engine)
    with pytest.raises(EaselError):
        list(page.studio.select_model("truncated.safetensors"))


UPSCALE_KEY = ("session", "upscale")


def upscaled(studio, *args, **kwargs):
    """Run the Upscale tab's handler to its end: (the saved file, its infotext, every view shown)."""
    views = list(studio.upscale(UPSCALE_KEY, *args, **kwargs))
    before, after = views[-1].images
    assert before == str(args[0])  # the slider's left side is the uploaded file itself
    return after, views[-1].infotext, views


def test_upscale_publishes_the_uploaded_image_in_upscale(studio, tmp_path):
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "in.png")
    shown, infotext, _ = upscaled(studio, str(tmp_path / "in.png"), "Lanczos", 3, 0)
    assert Path(shown).parent.parent.name == "upscale"
    with Image.open(shown) as saved:
        assert saved.size == (120, 72)
    assert "Postprocess upscale by: 3" in infotext


@pytest.mark.parametrize("path, upscaler, scale, field", [
    (None, "Lanczos", 2, "image"),
    ("in.png", "no-such-model", 2, "upscaler"),
    ("in.png", "Lanczos", 7, "scale"),
])
def test_upscale_refuses_bad_input_naming_the_field(studio, tmp_path, path, upscaler, scale, field):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    with pytest.raises(EaselError) as refused:
        upscaled(studio, str(tmp_path / path) if path else None, upscaler, scale, 0)
    assert str(refused.value).startswith(f"{field}:")


@pytest.fixture(scope="module")
def x4_studio(tmp_path_factory):
    """A Studio on an engine whose only checkpoint is a tiny SD x4 upscaler (a diffusers folder)."""
    from dataclasses import replace

    from engine.devices import Hardware
    from tests.tiny_models import save_folder, tiny_upscaler_pipeline
    from ui.handlers import Studio

    root = tmp_path_factory.mktemp("ui-x4")
    save_folder(tiny_upscaler_pipeline(0), root / "models" / "Stable-diffusion" / "tiny-x4")
    cpu = replace(Hardware.detect(), cuda=False, cuda_name="", cuda_vram_gb=0.0, cuda_bf16=False, mps=False,
                  cpu_bf16=False)
    engine = Engine(EngineConfig(root / "models", root / "outputs", root / "data"), cpu)
    return Studio(engine, SettingsStore(root / "ui-settings.json"))


def test_upscale_with_the_sd_x4_upscaler_takes_prompt_and_noise_level(x4_studio, tmp_path):
    assert x4_studio.engine.upscaler_names() == ["Lanczos", "SD x4: tiny-x4"]
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "in.png")
    shown, infotext, views = upscaled(x4_studio, str(tmp_path / "in.png"), "SD x4: tiny-x4", 4, 32, prompt="a field",
                                      noise_level=50)
    # 40x24 in 32-pixel tiles overlapping by 16: 2 tiles, each reported with the ETA of the rest
    assert "Tile 1/2" in views[1].progress and "ETA" in views[1].progress
    assert Path(shown).parent.parent.name == "upscale"
    with Image.open(shown) as saved:
        assert saved.size == (160, 96)
    assert 'Postprocess upscaler: "SD x4: tiny-x4", Postprocess prompt: a field' in infotext
    assert "Postprocess noise level: 50" in infotext


def test_upscale_with_the_sd_x4_upscaler_refuses_a_noise_level_above_the_models(x4_studio, tmp_path):
    Image.new("RGB", (40, 24)).save(tmp_path / "in.png")
    with pytest.raises(EaselError) as refused:
        upscaled(x4_studio, str(tmp_path / "in.png"), "SD x4: tiny-x4", 4, 32, prompt="", noise_level=351)
    assert str(refused.value).startswith("noise_level: must be from 0 to 350")


def test_upscale_tab_has_the_sd_x4_widgets_and_defaults_to_a_plain_upscaler(x4_studio):
    page = create_ui(x4_studio.engine)
    widgets = {getattr(b, "elem_id", None): b for b in page.blocks.values()}
    assert widgets["upscale-upscaler"].value == "Lanczos"  # not the slow SD x4 upscaler
    assert "SD x4 upscaler" in widgets["upscale-prompt"].info and "SD x4 upscaler" in widgets["upscale-noise-level"].info
    assert widgets["upscale-noise-level"].value == 20
    assert widgets["upscale-tile"].value == 256


def test_upscale_tile_follows_the_chosen_upscaler(x4_studio):
    """The slider's event handler: the SD x4 upscaler's native 128 px tile, 256 for the others."""
    assert x4_studio.engine.default_upscale_tile("SD x4: tiny-x4") == 128
    assert x4_studio.engine.default_upscale_tile("Lanczos") == 256


def test_upscale_ignores_the_sd_x4_options_for_other_upscalers(studio, tmp_path):
    Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / "in.png")
    shown, infotext, _ = upscaled(studio, str(tmp_path / "in.png"), "Lanczos", 2, 0, prompt="ignored", noise_level=99)
    assert infotext == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"


def test_upscale_is_cancelled_between_tiles(x4_studio, tmp_path, monkeypatch):
    """Cancel (the tab's button: Studio.cancel on the session's key) once the first tile's progress
    is shown: the second tile never runs and nothing is saved. The worker waits in its progress
    report until the test has cancelled, so the order does not depend on thread timing."""
    import queue as queue_module

    import ui.handlers

    cancelled_now = threading.Event()

    class WaitingQueue(queue_module.Queue):
        def put(self, item, *args, **kwargs):
            super().put(item, *args, **kwargs)
            if getattr(item, "step", None) == 1:
                cancelled_now.wait(30)

    monkeypatch.setattr(ui.handlers.queue, "Queue", WaitingQueue)
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "in.png")
    outputs = Path(x4_studio.engine.outputs.outdir) / "upscale"
    before = sorted(outputs.rglob("*.png")) if outputs.exists() else []
    token = x4_studio.prepare(UPSCALE_KEY)
    views = x4_studio.upscale(UPSCALE_KEY, str(tmp_path / "in.png"), "SD x4: tiny-x4", 4, 32, token=token)
    with pytest.raises(CancelledError) as cancelled:
        for view in views:
            if "Tile 1/2" in view.progress:
                assert x4_studio.cancel(UPSCALE_KEY)
                cancelled_now.set()
    assert str(cancelled.value) == "cancelled after tile 1/2"
    assert (sorted(outputs.rglob("*.png")) if outputs.exists() else []) == before
