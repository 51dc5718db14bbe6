"""A1111 sampler and schedule-type names mapped onto diffusers schedulers, as data.

A sampler name that is not in `SAMPLERS` is an error, never a silent default. Since A1111 1.9 the
noise schedule ("Karras", "Exponential") is a separate field; older infotexts glue it onto the
sampler name ("DPM++ 2M Karras"), and `split_legacy_name` reads both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from engine.errors import RequestError


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    schedules: tuple[str, ...] = ("Automatic",)  # schedule types this scheduler can follow


_SIGMA_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential")


def _s(name: str, scheduler: str, schedules: tuple[str, ...] = ("Automatic", "Uniform"), **config) -> Sampler:
    return Sampler(name, scheduler, MappingProxyType(config), schedules)


SAMPLERS = MappingProxyType({s.name: s for s in (
    _s("Euler a", "EulerAncestralDiscreteScheduler"),
    _s("Euler", "EulerDiscreteScheduler", _SIGMA_SCHEDULES),
    _s("LMS", "LMSDiscreteScheduler", _SIGMA_SCHEDULES),
    _s("Heun", "HeunDiscreteScheduler", _SIGMA_SCHEDULES),
    _s("DPM2", "KDPM2DiscreteScheduler", _SIGMA_SCHEDULES),
    _s("DPM2 a", "KDPM2AncestralDiscreteScheduler", _SIGMA_SCHEDULES),
    _s("DPM++ 2M", "DPMSolverMultistepScheduler", _SIGMA_SCHEDULES, algorithm_type="dpmsolver++", solver_order=2),
    _s("DPM++ SDE", "DPMSolverSDEScheduler", _SIGMA_SCHEDULES),
    _s("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SIGMA_SCHEDULES, algorithm_type="sde-dpmsolver++", solver_order=2),
    _s("DDIM", "DDIMScheduler", set_alpha_to_one=False, clip_sample=False),  # SD never clips x0
    _s("PLMS", "PNDMScheduler", skip_prk_steps=True),
    _s("UniPC", "UniPCMultistepScheduler", _SIGMA_SCHEDULES),
    _s("LCM", "LCMScheduler"),
)})
SCHEDULE_TYPES = _SIGMA_SCHEDULES
DEFAULT_SAMPLER = "Euler a"


# Every schedule name A1111 has, as pre-1.9 A1111 glued them onto the sampler ("DPM++ 2M Karras").
# Longest first so "SGM Uniform" wins over "Uniform". Easel runs SCHEDULE_TYPES of them; the rest
# are still split off when reading old infotexts, so the message names the schedule, not the sampler.
A1111_SCHEDULE_NAMES = (
    "Align Your Steps", "Polyexponential", "SGM Uniform", "Exponential", "KL Optimal",
    "Karras", "Uniform", "Simple", "Normal", "Beta",
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
    allowed = SAMPLERS[sampler].schedules
    if schedule not in allowed:
        raise RequestError("schedule_type", f"{sampler} supports {', '.join(allowed)}, not {schedule!r}")


def make_scheduler(sampler: str, schedule: str, base_config: dict):
    """A fresh scheduler for this sampler, keeping the model's own training config (betas,
    prediction type) from `base_config`."""
    import diffusers

    check_sampler(sampler, schedule)
    spec = SAMPLERS[sampler]
    config = dict(base_config)
    config.update(spec.config)
    if schedule == "Karras":
        config["use_karras_sigmas"] = True
    elif schedule == "Exponential":
        config["use_exponential_sigmas"] = True
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(config)
