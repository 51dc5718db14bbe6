"""A1111 sampler and schedule-type names mapped onto diffusers schedulers, as data.

A sampler name that is not in `SAMPLERS` is an error, never a silent default. Since A1111 1.9 the
noise schedule ("Karras", "Exponential") is a separate field; older infotexts glue it onto the
sampler name ("DPM++ 2M Karras"), and `split_legacy_name` reads both.

Any sampler takes any of A1111's 12 schedule types. How one is followed depends on the diffusers
scheduler (`schedule_plan`): a config option of its own (`use_karras_sigmas`, ...), an explicit
sigma list given to the pipeline (`sigmas=`, only where `set_timesteps` takes one), diffusers'
`timestep_spacing` where that is A1111's formula up to rounding, or not at all: then the sampler
runs on its own timesteps, as A1111's timestep samplers (DDIM, PLMS) do, and `schedule_note` says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from engine.errors import RequestError


@dataclass(frozen=True)
class Schedule:
    """One of A1111's schedule types, as its /sdapi/v1/schedulers lists it."""
    name: str  # API name, "sgm_uniform"
    label: str  # what the UI and infotexts show, "SGM Uniform"
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False  # A1111: the formula reads the model's own sigma table


SCHEDULES = (
    Schedule("automatic", "Automatic"),
    Schedule("uniform", "Uniform", need_inner_model=True),
    Schedule("karras", "Karras", default_rho=7.0),
    Schedule("exponential", "Exponential"),
    Schedule("polyexponential", "Polyexponential", default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal"),
    Schedule("align_your_steps", "Align Your Steps"),
    Schedule("simple", "Simple", need_inner_model=True),
    Schedule("normal", "Normal", need_inner_model=True),
    Schedule("ddim", "DDIM", need_inner_model=True),
    Schedule("beta", "Beta", need_inner_model=True),
)
SCHEDULE_TYPES = tuple(s.label for s in SCHEDULES)
# label, API name or alias (any case, "_" or " ") -> label
_SCHEDULE_LOOKUP = MappingProxyType({
    key.lower().replace("_", " "): s.label for s in SCHEDULES for key in (s.name, s.label, *s.aliases)})


def schedule_label(value: str) -> str | None:
    """'karras', 'Karras', 'sgm_uniform', 'SGMUniform' -> the label; None for an unknown name."""
    return _SCHEDULE_LOOKUP.get(value.strip().lower().replace("_", " "))


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    sigma_options: bool = False  # has use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
    sigma_list: bool = False  # set_timesteps takes an explicit `sigmas` list
    spacing: bool = True  # set_timesteps honours timestep_spacing
    own_timesteps: bool = False  # an A1111 timestep sampler: it ignores the schedule type

    @property
    def schedules(self) -> tuple[str, ...]:
        """The schedule types this sampler really follows (exactly or up to timestep rounding)."""
        return tuple(s for s in SCHEDULE_TYPES if schedule_plan(self.name, s).how != "ignored")


_K = dict(sigma_options=True)  # the k-diffusion ports in diffusers: sigma options and timestep spacing


def _s(name: str, scheduler: str, caps: dict | None = None, **config) -> Sampler:
    return Sampler(name, scheduler, MappingProxyType(config), **(caps or {}))


SAMPLERS = MappingProxyType({s.name: s for s in (
    _s("Euler a", "EulerAncestralDiscreteScheduler"),
    _s("Euler", "EulerDiscreteScheduler", dict(sigma_options=True, sigma_list=True)),
    _s("LMS", "LMSDiscreteScheduler", _K),
    _s("Heun", "HeunDiscreteScheduler", _K),
    _s("DPM2", "KDPM2DiscreteScheduler", _K),
    _s("DPM2 a", "KDPM2AncestralDiscreteScheduler", _K),
    _s("DPM++ 2M", "DPMSolverMultistepScheduler", _K, algorithm_type="dpmsolver++", solver_order=2),
    _s("DPM++ SDE", "DPMSolverSDEScheduler", _K),
    _s("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _K, algorithm_type="sde-dpmsolver++", solver_order=2),
    # SD never clips x0
    _s("DDIM", "DDIMScheduler", dict(own_timesteps=True), set_alpha_to_one=False, clip_sample=False),
    _s("PLMS", "PNDMScheduler", dict(own_timesteps=True), skip_prk_steps=True),
    # UniPC's set_timesteps takes sigmas only for flow models; A1111 ignores the schedule for it,
    # Easel follows what diffusers' options and spacing give.
    _s("UniPC", "UniPCMultistepScheduler", _K),
    _s("LCM", "LCMScheduler", dict(spacing=False)),  # LCM's set_timesteps has a spacing of its own
)})
DEFAULT_SAMPLER = "Euler a"


# Every schedule name A1111 has, as pre-1.9 A1111 glued them onto the sampler ("DPM++ 2M Karras").
# Longest first so "SGM Uniform" wins over "Uniform". "DDIM" is only split off after a space, so
# the sampler "DDIM" itself stays whole.
A1111_SCHEDULE_NAMES = (
    "Align Your Steps", "Polyexponential", "SGM Uniform", "Exponential", "KL Optimal",
    "Karras", "Uniform", "Simple", "Normal", "Beta", "DDIM",
)


def split_schedule_suffix(name: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); a name with no schedule suffix -> (name, None)."""
    for schedule in A1111_SCHEDULE_NAMES:
        suffix = f" {schedule}"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], schedule
    return name, None


def split_legacy_name(name: str) -> tuple[str, str | None]:
    """A sampler name as a request may give it: a name in SAMPLERS as-is, or a known sampler with a
    schedule suffix split off; anything else is returned whole (validation then names it)."""
    if name in SAMPLERS:
        return name, None
    base, schedule = split_schedule_suffix(name)
    return (base, schedule) if base in SAMPLERS else (name, None)


def check_sampler(sampler: str, schedule: str) -> None:
    if sampler not in SAMPLERS:
        raise RequestError("sampler", f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULE_TYPES:
        raise RequestError("schedule_type", f"unknown schedule type {schedule!r}; choose one of: "
                                            f"{', '.join(SCHEDULE_TYPES)}")


# --- the schedules' formulas (A1111's modules/sd_schedulers.py, k-diffusion's get_sigmas_*) -------
# `train_sigmas` is the model's own table, sigma(t) = sqrt((1 - alphabar_t) / alphabar_t), t = 0..T-1
# (ascending); sigma_min, sigma_max are its ends. Each returns the sigmas the sampler steps through,
# largest first, with the final 0 that A1111 appends (KL Optimal ends at sigma_min, as A1111's does).

def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    ramp = np.linspace(1, 0, n) ** rho
    return np.append(np.exp(ramp * (np.log(sigma_max) - np.log(sigma_min)) + np.log(sigma_min)), 0.0)


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    w = np.arange(n + 1) / n
    return np.tan(w * np.arctan(sigma_min) + (1 - w) * np.arctan(sigma_max))


# NVIDIA's published 10-step tables (11 sigmas), https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def align_your_steps_sigmas(n: int, sdxl: bool = False) -> np.ndarray:
    table = np.array(AYS_SDXL if sdxl else AYS_SD15)
    if n == len(table):  # A1111 compares with the table's length (11), so 10 steps are interpolated too
        return np.append(table, 0.0)
    log_ascending = np.log(table[::-1])
    interpolated = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), log_ascending))[::-1]
    return np.append(interpolated, 0.0)


def _t_to_sigma(t: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteSchedule.t_to_sigma: log sigma interpolated between whole timesteps."""
    log_sigmas = np.log(train_sigmas)
    return np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))


def sgm_uniform_sigmas(n: int, train_sigmas: np.ndarray) -> np.ndarray:
    t = np.linspace(len(train_sigmas) - 1, 0, n + 1)[:-1]
    return np.append(_t_to_sigma(t, train_sigmas), 0.0)


def normal_sigmas(n: int, train_sigmas: np.ndarray) -> np.ndarray:
    t = np.linspace(len(train_sigmas) - 1, 0, n)
    return np.append(_t_to_sigma(t, train_sigmas), 0.0)


def simple_sigmas(n: int, train_sigmas: np.ndarray) -> np.ndarray:
    stride = len(train_sigmas) / n
    return np.append([train_sigmas[-(1 + int(x * stride))] for x in range(n)], 0.0)


def ddim_sigmas(n: int, train_sigmas: np.ndarray) -> np.ndarray:
    """Timesteps 1, 1+k, 1+2k, ... (k = T // n) below T, largest first: like A1111, one more than n
    when T is not a multiple of n."""
    stride = max(len(train_sigmas) // n, 1)
    return np.append(train_sigmas[1::stride][::-1], 0.0)


def explicit_sigmas(schedule: str, n: int, train_sigmas: np.ndarray, sdxl: bool = False) -> np.ndarray:
    train_sigmas = np.asarray(train_sigmas, dtype=np.float64)
    sigma_min, sigma_max = float(train_sigmas[0]), float(train_sigmas[-1])
    if schedule == "Polyexponential":
        return polyexponential_sigmas(n, sigma_min, sigma_max)
    if schedule == "KL Optimal":
        return kl_optimal_sigmas(n, sigma_min, sigma_max)
    if schedule == "Align Your Steps":
        return align_your_steps_sigmas(n, sdxl)
    return {"SGM Uniform": sgm_uniform_sigmas, "Normal": normal_sigmas, "Simple": simple_sigmas,
            "DDIM": ddim_sigmas}[schedule](n, train_sigmas)


# --- which way each sampler follows each schedule -------------------------------------------------
_OPTIONS = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas", "Beta": "use_beta_sigmas",
            "Polyexponential": "use_exponential_sigmas"}  # A1111's Polyexponential has rho 1: Exponential
_EXPLICIT = ("Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM")
_SPACING = {"SGM Uniform": "trailing", "Simple": "trailing", "Normal": "linspace", "DDIM": "leading"}


@dataclass(frozen=True)
class SchedulePlan:
    how: str  # "own" (Automatic/Uniform), "option", "sigmas", "spacing" (up to rounding), "ignored"
    config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    note: str | None = None


def schedule_plan(sampler: str, schedule: str) -> SchedulePlan:
    check_sampler(sampler, schedule)
    spec = SAMPLERS[sampler]
    if schedule in ("Automatic", "Uniform"):
        return SchedulePlan("own")
    if spec.own_timesteps:
        return SchedulePlan("ignored", note=f"{sampler} follows its own timesteps (as in A1111); "
                                             f"the {schedule} schedule does not apply")
    if spec.sigma_list and schedule in _EXPLICIT:
        return SchedulePlan("sigmas")
    if spec.sigma_options and schedule in _OPTIONS:
        return SchedulePlan("option", MappingProxyType({_OPTIONS[schedule]: True}))
    if spec.spacing and schedule in _SPACING:
        spacing = _SPACING[schedule]
        config = {"timestep_spacing": spacing, **({"steps_offset": 1} if spacing == "leading" else {})}
        return SchedulePlan("spacing", MappingProxyType(config),
                            f"{sampler}: the {schedule} schedule runs as diffusers' {spacing!r} timestep spacing "
                            f"(the same timesteps up to rounding)")
    return SchedulePlan("ignored", note=f"{sampler} takes no sigma list in diffusers; the {schedule} schedule "
                                         f"does not apply, it follows its own timesteps")


def schedule_note(sampler: str, schedule: str) -> str | None:
    """A one-line note when the schedule is not followed exactly (approximated or not applied)."""
    return schedule_plan(sampler, schedule).note


def make_scheduler(sampler: str, schedule: str, base_config: dict):
    """A fresh scheduler for this sampler, keeping the model's own training config (betas,
    prediction type) from `base_config`, with the schedule's config options set. A schedule that
    needs an explicit sigma list is in `scheduler_for`."""
    import diffusers

    plan = schedule_plan(sampler, schedule)
    spec = SAMPLERS[sampler]
    config = dict(base_config)
    config.update(spec.config)
    config.update(plan.config)
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(config)


@dataclass
class Scheduled:
    scheduler: object
    sigmas: list[float] | None  # pass to the pipeline as `sigmas=` (it then ignores num_inference_steps)
    note: str | None


def train_sigmas_of(scheduler) -> np.ndarray:
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def scheduler_for(sampler: str, schedule: str, base_config: dict, steps: int, sdxl: bool = False) -> Scheduled:
    """The scheduler, the sigma list to pass the pipeline (or None) and the note to log (or None)."""
    plan = schedule_plan(sampler, schedule)
    scheduler = make_scheduler(sampler, schedule, base_config)
    sigmas = None
    if plan.how == "sigmas":
        sigmas = explicit_sigmas(schedule, steps, train_sigmas_of(scheduler), sdxl).tolist()
    return Scheduled(scheduler, sigmas, plan.note)
