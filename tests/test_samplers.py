"""A1111 sampler names map to real diffusers schedulers; unknown names fail loudly."""
import pytest

from engine.errors import RequestError
from engine.samplers import SAMPLERS, make_scheduler

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_and_sets_timesteps(name):
    scheduler = make_scheduler(name, "Automatic", SD_CONFIG)
    assert type(scheduler).__name__ == SAMPLERS[name].scheduler
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10


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


def test_schedule_a_sampler_cannot_follow_is_an_error():
    with pytest.raises(RequestError, match="schedule_type: DDIM supports"):
        make_scheduler("DDIM", "Karras", SD_CONFIG)
