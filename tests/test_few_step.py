"""LCM-distilled models: recognised from the UNet, LCM sampler and guidance set automatically,
no separate unconditional UNet pass."""
import pytest

from engine.engine import Engine, EngineConfig


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
    unet = lcm_engine.manager.current.pipe.unet
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
