"""A1111 sampler names map to real diffusers schedulers; unknown names fail loudly. Every sampler
really runs on the tiny model: the scheduler that took the steps is recorded from diffusers itself."""
import itertools
import json

import numpy as np
import pytest

from engine.errors import RequestError
from engine.samplers import SAMPLERS, make_scheduler

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1)

# What each A1111 sampler is in diffusers, written out here from A1111/k-diffusion's own sampler
# functions (not read from engine.samplers): the class that must take the steps, and the config
# that makes it that sampler rather than a sibling.
EXPECTED = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),  # k-diffusion's sample_dpmpp_sde: torchsde's Brownian tree
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
STEPS = 3
BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": STEPS, "width": 64, "height": 48,
        "seed": 1234, "save_images": False}


def test_every_sampler_offered_has_an_expectation():
    assert set(SAMPLERS) == set(EXPECTED)


class StepRecorder:
    """Wraps `step` of each expected diffusers scheduler class: which instance stepped, how often."""

    def __init__(self, monkeypatch):
        import diffusers

        self.calls = []
        for class_name in {cls for cls, _ in EXPECTED.values()}:
            cls = getattr(diffusers, class_name)
            original = cls.step

            def step(scheduler, *args, _original=original, **kwargs):
                self.calls.append(scheduler)
                return _original(scheduler, *args, **kwargs)

            monkeypatch.setattr(cls, "step", step)

    def run(self, engine, **fields):
        self.calls.clear()
        result = engine.generate(engine.make_request({**BASE, **fields}))
        return result, list(self.calls)


@pytest.fixture(scope="module")
def recorder(sd_engine):
    with pytest.MonkeyPatch.context() as mp:
        yield StepRecorder(mp)


@pytest.fixture(scope="module")
def runs(sd_engine, recorder):
    """One generation per sampler: (pixels, schedulers that stepped)."""
    out = {}
    for name in EXPECTED:
        result, calls = recorder.run(sd_engine, sampler=name)
        out[name] = (np.asarray(result.images[0].convert("RGB"), dtype=np.int16), calls)
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sampler_really_steps_with_its_diffusers_scheduler(runs, name):
    import diffusers

    _, calls = runs[name]
    class_name, config = EXPECTED[name]
    assert len(calls) >= STEPS  # second-order samplers step more often (2 per step but the last)
    assert len({id(s) for s in calls}) == 1
    scheduler = calls[0]
    assert type(scheduler) is getattr(diffusers, class_name)
    for key, value in config.items():
        assert scheduler.config[key] == value, key


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sampler_keeps_the_models_training_schedule(runs, tiny_models_dir, name):
    model_config = json.loads((tiny_models_dir / "Stable-diffusion" / "tiny-sd1" / "scheduler" /
                               "scheduler_config.json").read_text())
    scheduler = runs[name][1][0]
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert scheduler.config[key] == model_config[key], key


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sampler_result_is_an_image_not_a_flat_fill(runs, name):
    image, _ = runs[name]
    assert image.shape == (48, 64, 3)
    assert image.std() > 5 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100


def test_different_samplers_give_different_images(runs):
    same = [(a, b) for a, b in itertools.combinations(EXPECTED, 2) if np.array_equal(runs[a][0], runs[b][0])]
    assert same == []


def test_lms_integrates_its_coefficients_with_scipy(sd_engine, recorder, monkeypatch):
    from scipy import integrate

    calls = []
    original = integrate.quad
    monkeypatch.setattr(integrate, "quad", lambda *a, **k: calls.append(1) or original(*a, **k))
    recorder.run(sd_engine, sampler="LMS")
    assert calls  # a missing scipy would fail this run, not skip it


def test_dpmpp_sde_draws_noise_from_torchsde(sd_engine, recorder, monkeypatch):
    import torchsde

    calls = []
    original = torchsde.BrownianInterval
    monkeypatch.setattr(torchsde, "BrownianInterval", lambda *a, **k: calls.append(1) or original(*a, **k))
    recorder.run(sd_engine, sampler="DPM++ SDE")
    assert calls


def training_sigmas(config) -> np.ndarray:
    """sigma(t) = sqrt((1 - alphabar) / alphabar) for SD's scaled-linear betas, computed here."""
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"]) ** 2
    alphabar = np.cumprod(1 - betas)
    return np.sqrt((1 - alphabar) / alphabar)


@pytest.mark.parametrize("schedule", ["Karras", "Exponential"])
def test_schedule_type_changes_the_sigmas_diffusers_steps_through(sd_engine, recorder, schedule):
    steps = 6
    auto_result, auto_calls = recorder.run(sd_engine, sampler="Euler", steps=steps)
    result, calls = recorder.run(sd_engine, sampler="Euler", schedule_type=schedule, steps=steps)
    scheduler = calls[0]
    assert scheduler.config["use_karras_sigmas" if schedule == "Karras" else "use_exponential_sigmas"] is True
    full = training_sigmas(scheduler.config)
    sigma_min, sigma_max = full[0], full[-1]
    ramp = np.linspace(0, 1, steps)
    if schedule == "Karras":  # Karras et al. 2022, eq. 5, rho = 7
        rho = 7.0
        expected = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    else:
        expected = np.exp(np.log(sigma_max) + ramp * (np.log(sigma_min) - np.log(sigma_max)))
    used = scheduler.sigmas.numpy()[:steps]
    np.testing.assert_allclose(used, expected, rtol=1e-3)
    assert not np.allclose(auto_calls[0].sigmas.numpy()[:steps], expected, rtol=1e-3)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(auto_result.images[0]))


@pytest.mark.parametrize("name", ["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras".rsplit(" ", 1)[0], "DPM++ SDE",
                                  "DDIM", "PLMS", "LMS", "Heun", "UniPC", "LCM"])
def test_issue_required_samplers_exist(name):
    assert name in SAMPLERS


def test_karras_schedule_is_applied():
    scheduler = make_scheduler("DPM++ 2M", "Karras", SD_CONFIG)
    assert scheduler.config.use_karras_sigmas is True


def test_model_prediction_type_is_kept():
    scheduler = make_scheduler("Euler", "Automatic", {**SD_CONFIG, "prediction_type": "v_prediction"})
    assert scheduler.config.prediction_type == "v_prediction"


def test_unknown_sampler_is_an_error_not_a_default():
    with pytest.raises(RequestError, match="sampler: unknown sampler 'k_euler'"):
        make_scheduler("k_euler", "Automatic", SD_CONFIG)


def test_schedule_a_sampler_cannot_follow_runs_its_own_timesteps():
    # A1111 takes DDIM + Karras (its timestep samplers ignore the schedule): so does Easel
    scheduler = make_scheduler("DDIM", "Karras", SD_CONFIG)
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert "use_karras_sigmas" not in scheduler.config


def test_unknown_schedule_is_an_error():
    with pytest.raises(RequestError, match="schedule_type: unknown schedule type 'Sideways'; choose one of: "
                                           "Automatic, Uniform, Karras"):
        make_scheduler("DDIM", "Sideways", SD_CONFIG)
