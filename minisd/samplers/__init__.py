"""Samplers by name: the names AUTOMATIC1111 users type and diffusers' scheduler class names both resolve; the
schedule type (A1111 1.9+'s "Schedule type") and the timestep spacing (diffusers' `timestep_spacing`) are chosen
apart from the sampler.

>>> get_sampler("Euler a").name, get_sampler("DPMSolverMultistepScheduler").name
('Euler a', 'DPM++ 2M')
>>> sampler = get_sampler("dpm++ 2m karras")  # an A1111 1.5-era name: the sampler, then its schedule
>>> sampler.name, sampler.schedule_type
('DPM++ 2M', 'Karras')
>>> get_sampler("DPM++ 2M", schedule_type="Automatic").schedule_type  # A1111's choice for DPM++ 2M
'Karras'
"""

from collections.abc import Callable

from minisd.errors import MinisdError
from minisd.samplers.base import Sampler
from minisd.samplers.ddim import DDIMSampler
from minisd.samplers.ddpm import DDPMSampler
from minisd.samplers.dpm_solver import DPMSolverPP2MSampler
from minisd.samplers.euler import EulerSampler
from minisd.samplers.euler_ancestral import EulerAncestralSampler
from minisd.samplers.heun import HeunSampler
from minisd.samplers.lms import LMSSampler
from minisd.samplers.pndm import PNDMSampler
from minisd.samplers.schedule import SPACINGS
from minisd.samplers.sigmas import SCHEDULE_TYPES, SigmaSampler

# A1111's display name -> its class (each class's defaults are SD v1's; get_sampler gives it the rest as keywords).
SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "DDPM": DDPMSampler,
    "DDIM": DDIMSampler,
    "PLMS": PNDMSampler,
    "LMS": LMSSampler,
    "Euler": EulerSampler,
    "Euler a": EulerAncestralSampler,
    "Heun": HeunSampler,
    "DPM++ 2M": DPMSolverPP2MSampler,
    "DPM++ 2M SDE": DPMSolverPP2MSampler,  # with sde=True
}
SIGMA_SAMPLERS = ("LMS", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE")  # they take a schedule type
ANCESTRAL = ("Euler a", "DPM++ 2M SDE")  # their η is A1111's "Eta" (default 1); DDIM's is "Eta DDIM" (default 0)

# A1111 1.9+'s "Automatic" schedule: its sampler's own default (sd_samplers_kdiffusion.py), "Uniform" otherwise.
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}

# A1111 samplers minisd does not implement: named so that a PNG asking for one is refused as such.
A1111_ONLY = (
    "DPM++ SDE", "DPM++ 2S a", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive",
    "Restart", "UniPC", "DDIM CFG++", "LCM",
)  # fmt: skip

# Other spellings -> the display name: diffusers' class names and A1111's internal ids (k_euler_a, ...). A name
# may end in a schedule type ("DPM++ 2M Karras", "dpmpp_2m_sde_karras"): A1111's names before 1.9.
ALIASES = {
    "DDPMScheduler": "DDPM",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "PNDM": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "k_lms": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "k_euler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "k_euler_a": "Euler a",
    "euler_ancestral": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "k_heun": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "k_dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
}


def _key(name: str) -> str:
    """Case, spaces, '-' and '_' do not matter: 'Euler a' = 'euler_a' = 'EULER-A'."""
    return "".join(ch for ch in name.lower() if ch not in " _-")


_LOOKUP = {_key(n): n for n in SAMPLERS} | {_key(alias): n for alias, n in ALIASES.items()}
_SCHEDULES = {_key(s): s for s in SCHEDULE_TYPES}


def schedule_type_label(name: str) -> str:
    """A schedule type as A1111 labels it, from any spelling A1111 reads (its label or its id: 'karras',
    'sgm_uniform', 'automatic'); a name that is none of minisd's is returned unchanged.

    >>> schedule_type_label("sgm_uniform"), schedule_type_label("KARRAS"), schedule_type_label("Beta")
    ('SGM Uniform', 'Karras', 'Beta')
    """
    return {**_SCHEDULES, "automatic": "Automatic"}.get(_key(name), name) if isinstance(name, str) else name


def sampler_names() -> list[str]:
    """The display names, in the order a menu would show them."""
    return list(SAMPLERS)


def resolve_name(name: str) -> tuple[str, str | None]:
    """(display name, the schedule type the name ends in or None), A1111's way: "DPM++ 2M Karras" is DPM++ 2M with
    the Karras schedule (modules/sd_samplers.py get_sampler_and_scheduler). One-line error for unknown names."""
    if not isinstance(name, str):
        raise MinisdError(f"sampler must be a str (a name such as 'Euler a'), got {type(name).__name__}")
    key, schedule_type = _key(name), None
    if key not in _LOOKUP:
        for schedule_key, label in _SCHEDULES.items():
            if key.endswith(schedule_key) and key[: -len(schedule_key)] in _LOOKUP:
                key, schedule_type = key[: -len(schedule_key)], label
                break
    if key not in _LOOKUP:
        bare = {key} | {key[: -len(s)] for s in _SCHEDULES if key.endswith(s)}  # "DPM++ SDE Karras" too
        a1111 = any(_key(n) in bare for n in A1111_ONLY)
        what = f"{name!r} is an A1111 sampler minisd does not have" if a1111 else f"unknown sampler {name!r}"
        raise MinisdError(f"{what}; minisd has: {', '.join(SAMPLERS)}")
    return _LOOKUP[key], schedule_type


def get_sampler(
    name: str,
    eta: float | None = None,
    schedule_type: str | None = None,
    timestep_spacing: str | None = None,
    *,
    prediction_type: str = "epsilon",
    rescale_betas_zero_snr: bool = False,
) -> Sampler:
    """A new sampler set up for SD, by A1111 name or diffusers class name (case-insensitive).

    eta: DDIM's η (A1111's "Eta DDIM"; default 0 = deterministic DDIM), or the ancestral η of Euler a and DPM++ 2M
    SDE (A1111's "Eta"; default 1 = their usual noise, 0 = none); None is the sampler's default. Other samplers
    take none: a non-zero eta with them is an error rather than silently ignored.
    schedule_type: "Uniform" (the default), "Karras", "Exponential", "SGM Uniform" for the σ samplers (LMS, Euler,
    Euler a, Heun, DPM++ 2M [SDE]), or "Automatic" (A1111's default for the sampler: Karras for DPM++ 2M,
    Exponential for DPM++ 2M SDE, Uniform otherwise). DDPM, DDIM and PLMS step over integer timesteps: Uniform only.
    timestep_spacing: "leading", "linspace" or "trailing" (diffusers' names); None is the sampler's default
    (diffusers' for its class: "leading" for DDPM, DDIM, PLMS; "linspace" for the σ samplers).
    prediction_type: what the model predicts, "epsilon" (SD v1, SD 2's 512 models) or "v_prediction" (SD 2's 768
    models). rescale_betas_zero_snr: zero terminal SNR (v_prediction only; DDIM, DDPM, Euler, Euler a and the
    DPM++ 2M family, as diffusers; usually with timestep_spacing "trailing").
    """
    display, implied = resolve_name(name)
    schedule_type = None if schedule_type is None else schedule_type_label(schedule_type)
    if implied is not None and schedule_type not in (None, "Automatic", implied):  # A1111: the name's suffix wins
        raise MinisdError(f"sampler {name!r} names the {implied} schedule, schedule_type {schedule_type!r} another")
    if schedule_type == "Automatic":
        schedule_type = implied or A1111_AUTOMATIC.get(display, "Uniform")
    schedule_type = schedule_type or implied or "Uniform"
    if schedule_type not in SCHEDULE_TYPES:
        raise MinisdError(
            f"schedule_type must be one of {', '.join(SCHEDULE_TYPES)} or Automatic, got {schedule_type!r}"
        )
    if display not in SIGMA_SAMPLERS and schedule_type != "Uniform":
        raise MinisdError(
            f"schedule type {schedule_type} applies to the σ samplers ({', '.join(SIGMA_SAMPLERS)}); {display} steps "
            "over integer timesteps (Uniform only)"
        )
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise MinisdError(f"timestep_spacing must be one of {', '.join(SPACINGS)} or None, got {timestep_spacing!r}")
    if eta is not None and display not in ("DDIM", *ANCESTRAL) and eta != 0.0:
        raise MinisdError(
            f"eta applies to DDIM (A1111's Eta DDIM) and to {' and '.join(ANCESTRAL)} (A1111's Eta), got eta={eta!r} "
            f"with {display!r}"
        )
    options = {"prediction_type": prediction_type, "rescale_betas_zero_snr": rescale_betas_zero_snr}
    if timestep_spacing is not None:
        options["timestep_spacing"] = timestep_spacing
    if display in ("DDIM", *ANCESTRAL) and eta is not None:
        options["eta"] = eta
    if display in SIGMA_SAMPLERS:
        options["schedule_type"] = schedule_type
    if display == "DPM++ 2M SDE":
        options["sde"] = True
    return SAMPLERS[display](**options)


def default_eta(sampler: Sampler) -> float | None:
    """The η a sampler runs with when none is given: 0 for DDIM, 1 for the ancestral ones, None for the rest."""
    return {"DDIM": 0.0, **dict.fromkeys(ANCESTRAL, 1.0)}.get(sampler.name)


__all__ = ["SAMPLERS", "Sampler", "SigmaSampler", "get_sampler", "sampler_names"]
