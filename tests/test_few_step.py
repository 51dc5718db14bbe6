"""Few-step models. LCM: recognised from the UNet, LCM sampler and guidance set automatically, no
separate unconditional UNet pass. Turbo: recognised from the file name or the user's word."""
import pytest

import app
from engine.engine import Engine, EngineConfig
from engine.errors import RequestError


@pytest.fixture(scope="module")
def lcm_engine(tmp_path_factory):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from engine.tiny import tiny_sd1_pipeline, tiny_unet

    base = tiny_sd1_pipeline()
    # LCM distillation adds a guidance-scale embedding to the time embedding (time_cond_proj_dim).
    pipe = StableDiffusionPipeline(**{**base.components, "unet": tiny_unet(time_cond_proj_dim=32),
                                      "scheduler": LCMScheduler.from_config(base.scheduler.config)},
                                   requires_safety_checker=False)
    root = tmp_path_factory.mktemp("lcm")
    pipe.save_pretrained(str(root / "models" / "Stable-diffusion" / "tiny-lcm"))
    return Engine(EngineConfig(root / "models", root / "outputs", root / "data", watermark=False))


def test_lcm_model_gets_lcm_defaults(lcm_engine):
    request = lcm_engine.make_request({"prompt": "a cat", "width": 64, "height": 64})
    assert (request.sampler, request.steps, request.cfg_scale) == ("LCM", 4, 1.5)


def test_user_choices_still_win_on_an_lcm_model(lcm_engine):
    request = lcm_engine.make_request({"prompt": "a cat", "steps": 8, "sampler": "Euler", "cfg_scale": None})
    assert (request.sampler, request.steps, request.cfg_scale) == ("Euler", 8, 1.5)


def test_lcm_model_runs_one_unet_pass_per_step(lcm_engine):
    request = lcm_engine.make_request({"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 64,
                                       "save_images": False})
    unet = lcm_engine.load_model().pipe.unet
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0].shape[0], kwargs.get("timestep_cond") is not None)), with_kwargs=True)
    try:
        result = lcm_engine.generate(request)
    finally:
        handle.remove()
    assert calls == [(1, True)] * 4  # batch 1 (no CFG pass), guidance given as an embedding
    assert "Sampler: LCM" in result.infotexts[0]


def test_ordinary_model_keeps_a1111_defaults(sd_engine):
    request = sd_engine.make_request({"prompt": "a cat"})
    assert (request.sampler, request.steps, request.cfg_scale) == ("Euler a", 20, 7.0)


def test_page_switches_its_widgets_to_lcm_defaults(lcm_engine, tmp_path):
    from ui.handlers import Studio
    from ui.settings import SettingsStore

    studio = Studio(lcm_engine, SettingsStore(tmp_path / "settings.json"))
    changes = studio.model_fields("tiny-lcm")
    assert changes["sampler"] == {"value": "LCM"} and changes["steps"] == {"value": 4}
    assert changes["cfg_scale"] == {"value": 1.5}


@pytest.fixture()
def turbo_engine(tmp_path):
    """The same tiny SD1 weights saved twice: once under a turbo name, once under a plain one."""
    from engine.tiny import save_sd1_folder

    for name in ("tiny-sd-turbo", "tiny-plain"):
        save_sd1_folder(tmp_path / "models" / "Stable-diffusion" / name)
    return Engine(EngineConfig(tmp_path / "models", tmp_path / "outputs", tmp_path / "data", watermark=False))


def defaults_of(engine, model):
    r = engine.make_request({"prompt": "a cat", "width": 64, "height": 64}, model=model)
    return r.sampler, r.steps, r.cfg_scale


def test_a_turbo_file_name_gets_turbo_defaults(turbo_engine):
    assert defaults_of(turbo_engine, "tiny-sd-turbo") == ("Euler a", 4, 1.0)
    assert defaults_of(turbo_engine, "tiny-plain") == ("Euler a", 20, 7.0)


def test_the_users_word_wins_over_the_file_name(turbo_engine):
    turbo_engine.set_model_distillation("tiny-sd-turbo", "none")
    turbo_engine.set_model_distillation("tiny-plain", "turbo")
    assert defaults_of(turbo_engine, "tiny-sd-turbo") == ("Euler a", 20, 7.0)
    assert defaults_of(turbo_engine, "tiny-plain") == ("Euler a", 4, 1.0)


def test_a_turbo_model_runs_one_unet_pass_per_step(turbo_engine):
    request = turbo_engine.make_request({"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 64,
                                         "save_images": False}, model="tiny-sd-turbo")
    calls = []
    unet = turbo_engine.load_model("tiny-sd-turbo").pipe.unet
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        turbo_engine.generate(request, model="tiny-sd-turbo")
    finally:
        handle.remove()
    assert calls == [1] * 4


def test_an_unknown_distillation_is_refused(turbo_engine):
    with pytest.raises(RequestError, match="^distilled: must be one of auto, turbo, none"):
        turbo_engine.set_model_distillation("tiny-plain", "lightning")


def test_models_listing_says_which_are_few_step(capsys, turbo_engine, tmp_path):
    dirs = ["--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]
    assert app.main(["models", *dirs, "--set-distilled", "tiny-plain", "turbo"]) == 0
    blocks: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():  # a name line, then its indented details
        if not line.startswith(" "):
            name = line
        blocks[name] = blocks.get(name, "") + line + "\n"
    assert "few-step: turbo: as set with" in blocks["tiny-plain"]
    assert "few-step: turbo: its file name says turbo" in blocks["tiny-sd-turbo"]


def test_validating_a_request_loads_no_weights(lcm_engine):
    """make_request, size_step and model_defaults read the model's headers and configs only: the
    LCM defaults and the size step come without the model being loaded."""
    lcm_engine.manager.unload()
    request = lcm_engine.make_request({"prompt": "a cat", "width": 64, "height": 64})
    assert (request.sampler, lcm_engine.size_step(), lcm_engine.model_defaults()["steps"]) == ("LCM", 8, 4)
    assert lcm_engine.manager.current is None
