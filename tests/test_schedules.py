"""A1111's 12 schedule types with every sampler: each formula checked against one written out here
from A1111's modules/sd_schedulers.py and k-diffusion's get_sigmas_*, each config option by the
sigmas diffusers ends up with, and every sampler x schedule pair accepted (with a note where the
schedule cannot apply)."""
import functools
import math

import numpy as np
import pytest

from engine.errors import RequestError
from engine.samplers import (
    SAMPLERS, SCHEDULE_TYPES, SCHEDULES, check_sampler, make_scheduler, schedule_label, schedule_note, schedule_plan,
    scheduler_for, split_legacy_name, split_schedule_suffix,
)

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon")
A1111_ORDER = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
               "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
API_NAMES = ["automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
             "align_your_steps", "simple", "normal", "ddim", "beta"]


def train_sigmas():
    """SD's scaled-linear betas -> sigma(t) for t = 0..999, computed here, not by diffusers."""
    betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(1000)]
    out, alphabar = [], 1.0
    for beta in betas:
        alphabar *= 1 - beta
        out.append(math.sqrt((1 - alphabar) / alphabar))
    return out


SIGMAS = train_sigmas()
SMIN, SMAX = SIGMAS[0], SIGMAS[-1]


def t_to_sigma(t):
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(SIGMAS[lo]) + w * math.log(SIGMAS[hi]))


def expected(schedule, n):
    if schedule == "Polyexponential":  # rho 1: a geometric ramp from sigma_max to sigma_min
        return [SMAX * (SMIN / SMAX) ** (i / (n - 1)) for i in range(n)] + [0.0]
    if schedule == "KL Optimal":  # ends at sigma_min, no zero appended, as A1111's
        return [math.tan((i / n) * math.atan(SMIN) + (1 - i / n) * math.atan(SMAX)) for i in range(n + 1)]
    if schedule == "SGM Uniform":
        return [t_to_sigma(999 - 999 * k / n) for k in range(n)] + [0.0]
    if schedule == "Normal":
        return [t_to_sigma(999 - 999 * k / (n - 1)) for k in range(n)] + [0.0]
    if schedule == "Simple":
        return [SIGMAS[999 - int(x * 1000 / n)] for x in range(n)] + [0.0]
    if schedule == "DDIM":
        ts, t = [], 1
        while t < 1000:
            ts.append(t)
            t += 1000 // n
        return [SIGMAS[t] for t in reversed(ts)] + [0.0]
    raise AssertionError(schedule)


def engine_sigmas(sampler, schedule, n, sdxl=False):
    scheduled = scheduler_for(sampler, schedule, SD_CONFIG, n, sdxl=sdxl)
    assert scheduled.sigmas is not None
    return scheduled


def test_schedule_types_are_a1111s_twelve_in_order():
    assert list(SCHEDULE_TYPES) == A1111_ORDER
    assert [s.name for s in SCHEDULES] == API_NAMES
    by_name = {s.name: s for s in SCHEDULES}
    assert by_name["karras"].default_rho == 7.0 and by_name["polyexponential"].default_rho == 1.0
    assert by_name["exponential"].default_rho == -1
    assert by_name["sgm_uniform"].aliases == ("SGMUniform",)
    assert {s.name for s in SCHEDULES if s.need_inner_model} == {"uniform", "sgm_uniform", "simple", "normal",
                                                                   "ddim", "beta"}


@pytest.mark.parametrize("value, label", [("sgm_uniform", "SGM Uniform"), ("SGMUniform", "SGM Uniform"),
                                          ("karras", "Karras"), ("Align Your Steps", "Align Your Steps"),
                                          ("ddim", "DDIM"), ("kl_optimal", "KL Optimal"), ("sideways", None)])
def test_schedule_label_reads_api_names_labels_and_aliases(value, label):
    assert schedule_label(value) == label


@pytest.mark.parametrize("schedule", ["Polyexponential", "KL Optimal", "SGM Uniform", "Normal", "Simple", "DDIM"])
@pytest.mark.parametrize("n", [4, 7, 20])
def test_explicit_sigma_schedule_follows_its_formula(schedule, n):
    scheduled = engine_sigmas("Euler", schedule, n)
    want = expected(schedule, n)
    got = scheduled.sigmas
    assert len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=1e-4)  # the model table is float32
    assert all(a > b for a, b in zip(got, got[1:]))  # strictly decreasing
    if schedule != "KL Optimal":
        assert got[-1] == 0.0
    # and the Euler scheduler really takes that list
    scheduler = scheduled.scheduler
    scheduler.set_timesteps(sigmas=got)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), want, rtol=1e-4)


def test_ddim_schedule_takes_one_step_more_when_1000_is_not_a_multiple_as_a1111():
    assert len(engine_sigmas("Euler", "DDIM", 7).sigmas) == 8 + 1  # timesteps 1, 143, ..., 995 and 0
    assert len(engine_sigmas("Euler", "DDIM", 10).sigmas) == 10 + 1


AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


@pytest.mark.parametrize("sdxl, table", [(False, AYS_SD15), (True, AYS_SDXL)])
def test_align_your_steps_uses_the_published_table_and_log_linear_interpolation(sdxl, table):
    assert engine_sigmas("Euler", "Align Your Steps", 11, sdxl).sigmas == pytest.approx(table + [0.0])
    doubled = engine_sigmas("Euler", "Align Your Steps", 21, sdxl).sigmas
    assert len(doubled) == 22 and doubled[-1] == 0.0
    assert doubled[0:21:2] == pytest.approx(table, rel=1e-9)  # the table's points stay where they were
    for i in range(10):  # in between: the geometric mean of the neighbours (linear in log sigma)
        assert doubled[2 * i + 1] == pytest.approx(math.sqrt(table[i] * table[i + 1]), rel=1e-9)
    ten = engine_sigmas("Euler", "Align Your Steps", 10, sdxl).sigmas
    assert len(ten) == 11 and ten[0] == pytest.approx(14.615) and ten[9] == pytest.approx(0.029)
    assert ten[1] != pytest.approx(table[1])  # A1111 interpolates 10 steps too (its table has 11)


def beta_expected(n, alpha=0.6, beta=0.6):
    from scipy import stats

    return [SMIN + stats.beta.ppf(1 - i / (n - 1), alpha, beta) * (SMAX - SMIN) for i in range(n)]


@pytest.mark.parametrize("sampler, schedule", [
    (sampler, schedule) for sampler in ("Euler", "LMS", "DPM++ 2M", "UniPC")
    for schedule in ("Karras", "Exponential", "Polyexponential", "Beta")
    if (sampler, schedule) != ("Euler", "Polyexponential")])  # Euler takes that one as a sigma list (above)
def test_option_schedule_gives_the_formulas_sigmas(sampler, schedule):
    n = 8
    scheduled = scheduler_for(sampler, schedule, SD_CONFIG, n)
    assert scheduled.sigmas is None and scheduled.note is None
    scheduler = scheduled.scheduler
    scheduler.set_timesteps(n)
    if schedule == "Karras":
        want = [(SMAX ** (1 / 7) + i / (n - 1) * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7 for i in range(n)]
    elif schedule == "Beta":
        want = beta_expected(n)
    else:  # Exponential, and Polyexponential with A1111's rho 1
        want = [SMAX * (SMIN / SMAX) ** (i / (n - 1)) for i in range(n)]
    np.testing.assert_allclose(scheduler.sigmas.numpy()[:n], want, rtol=2e-3)


def test_spacing_schedules_give_a1111s_timesteps_up_to_rounding():
    n = 6
    for sampler, schedule, want in [
        ("DPM++ 2M", "SGM Uniform", [999 - 999 * k / n for k in range(n)]),
        ("Euler a", "Simple", [999 - int(x * 1000 / n) for x in range(n)]),
        ("Heun", "Normal", [999 - 999 * k / (n - 1) for k in range(n)]),
        ("Euler a", "DDIM", [1 + k * (1000 // n) for k in reversed(range(n))]),
    ]:
        scheduled = scheduler_for(sampler, schedule, SD_CONFIG, n)
        assert scheduled.sigmas is None
        assert "timestep spacing" in scheduled.note
        scheduler = scheduled.scheduler
        scheduler.set_timesteps(n)
        timesteps = scheduler.timesteps.numpy().astype(float)[:: scheduler.order][:n]
        np.testing.assert_allclose(timesteps, want, atol=1.0, err_msg=f"{sampler} {schedule}")


PAIRS = [(sampler, schedule) for sampler in SAMPLERS for schedule in SCHEDULE_TYPES]


@pytest.mark.parametrize("sampler, schedule", PAIRS)
def test_every_sampler_takes_every_schedule(sampler, schedule):
    check_sampler(sampler, schedule)
    scheduled = scheduler_for(sampler, schedule, SD_CONFIG, 6)
    assert type(scheduled.scheduler).__name__ == SAMPLERS[sampler].scheduler
    assert type(make_scheduler(sampler, schedule, SD_CONFIG)) is type(scheduled.scheduler)
    if scheduled.sigmas is not None:
        scheduled.scheduler.set_timesteps(sigmas=scheduled.sigmas)
    else:
        scheduled.scheduler.set_timesteps(6)
    assert len(scheduled.scheduler.timesteps) >= 6
    assert scheduled.note == schedule_note(sampler, schedule)
    if schedule in ("Automatic", "Uniform"):
        assert scheduled.note is None and scheduled.sigmas is None


INAPPLICABLE = [("DDIM", s) for s in A1111_ORDER[2:]] + [("PLMS", s) for s in A1111_ORDER[2:]] + \
               [("LCM", s) for s in A1111_ORDER[2:]] + \
               [("Euler a", s) for s in ("Karras", "Exponential", "Polyexponential", "KL Optimal",
                                         "Align Your Steps", "Beta")] + \
               [(s, sch) for s in ("LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "UniPC")
                for sch in ("KL Optimal", "Align Your Steps")]


def test_inapplicable_pairs_are_exactly_these():
    ignored = {(a, b) for a, b in PAIRS if schedule_plan(a, b).how == "ignored"}
    assert ignored == set(INAPPLICABLE)


@pytest.mark.parametrize("sampler, schedule", INAPPLICABLE)
def test_inapplicable_pair_runs_the_samplers_own_timesteps_and_says_so(sampler, schedule):
    note = schedule_note(sampler, schedule)
    assert note and sampler in note and f"the {schedule} schedule does not apply" in note and "\n" not in note
    scheduled = scheduler_for(sampler, schedule, SD_CONFIG, 6)
    assert scheduled.sigmas is None
    plain = make_scheduler(sampler, "Automatic", SD_CONFIG)
    assert dict(scheduled.scheduler.config) == dict(plain.config)
    assert schedule not in SAMPLERS[sampler].schedules


def test_ddim_karras_note_reads_as_a1111_would_say():
    assert schedule_note("DDIM", "Karras") == "DDIM follows its own timesteps (as in A1111); " \
                                              "the Karras schedule does not apply"
    assert schedule_note("Euler", "Karras") is None
    assert schedule_note("Euler", "KL Optimal") is None


def test_unknown_schedule_names_the_field_and_the_choices():
    with pytest.raises(RequestError) as err:
        check_sampler("Euler", "Sideways")
    assert str(err.value).startswith("schedule_type: unknown schedule type 'Sideways'")
    assert ", ".join(A1111_ORDER) in str(err.value)
    with pytest.raises(RequestError, match="^sampler: unknown sampler"):
        check_sampler("Euler b", "Karras")


def test_legacy_names_still_split_and_ddim_stays_a_sampler():
    assert split_legacy_name("DDIM") == ("DDIM", None)
    assert split_schedule_suffix("DDIM") == ("DDIM", None)
    assert split_legacy_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_legacy_name("DPM++ 2M SDE") == ("DPM++ 2M SDE", None)
    assert split_legacy_name("Euler SGM Uniform") == ("Euler", "SGM Uniform")
    assert split_legacy_name("Euler a DDIM") == ("Euler a", "DDIM")


# --- end to end on the tiny model ------------------------------------------------------------------
BASE = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 5, "width": 64, "height": 48,
        "seed": 1234, "save_images": False}


def pixels(engine, **fields):
    result = engine.generate(engine.make_request({**BASE, **fields}))
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def test_schedules_generate_images_end_to_end(sd_engine):
    automatic = pixels(sd_engine, sampler="Euler")
    for sampler, schedule in [("Euler", "Beta"), ("Euler", "KL Optimal"), ("Euler", "Align Your Steps")]:
        image = pixels(sd_engine, sampler=sampler, schedule_type=schedule)
        assert image.shape == (48, 64, 3) and image.std() > 5, schedule
        assert not np.array_equal(image, automatic), schedule
    result = sd_engine.generate(sd_engine.make_request({**BASE, "sampler": "DDIM", "schedule_type": "Karras"}))
    ddim_karras = np.asarray(result.images[0].convert("RGB"), dtype=np.int16)
    assert ddim_karras.shape == (48, 64, 3) and ddim_karras.std() > 5
    assert "DDIM follows its own timesteps (as in A1111); the Karras schedule does not apply" in result.notes
    assert np.array_equal(ddim_karras, pixels(sd_engine, sampler="DDIM"))  # as A1111: the schedule is ignored


def test_sigma_list_reaches_the_pipeline_with_its_step_count(sd_engine, monkeypatch):
    import diffusers

    seen = []
    original = diffusers.EulerDiscreteScheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature: the pipeline looks for its `sigmas` parameter
    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("sigmas"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "set_timesteps", spy)
    pixels(sd_engine, sampler="Euler", schedule_type="DDIM", steps=7)
    assert seen and seen[-1] is not None and len(seen[-1]) == 9  # A1111's DDIM schedule: 8 steps for 7
