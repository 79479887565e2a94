"""Samplers by name: the names AUTOMATIC1111 users type and diffusers' scheduler class names both resolve.

>>> get_sampler("Euler a").name, get_sampler("DPMSolverMultistepScheduler").name
('Euler a', 'DPM++ 2M')
>>> get_sampler("dpm++ 2m karras").name
'DPM++ 2M Karras'
"""

from collections.abc import Callable
from functools import partial

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

# A1111's display name -> how to build it (each class's defaults are SD v1's; prediction settings as keywords).
SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "DDPM": DDPMSampler,
    "DDIM": DDIMSampler,
    "PLMS": PNDMSampler,
    "LMS": LMSSampler,
    "Euler": EulerSampler,
    "Euler a": EulerAncestralSampler,
    "Heun": HeunSampler,
    "DPM++ 2M": DPMSolverPP2MSampler,
    "DPM++ 2M Karras": partial(DPMSolverPP2MSampler, use_karras_sigmas=True),
    "DPM++ 2M SDE": partial(DPMSolverPP2MSampler, sde=True),
    "DPM++ 2M SDE Karras": partial(DPMSolverPP2MSampler, use_karras_sigmas=True, sde=True),
}

# Other spellings -> the display name: diffusers' class names and A1111's internal ids (k_euler_a, ...).
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
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
}


def _key(name: str) -> str:
    """Case, spaces, '-' and '_' do not matter: 'Euler a' = 'euler_a' = 'EULER-A'."""
    return "".join(ch for ch in name.lower() if ch not in " _-")


_LOOKUP = {_key(n): n for n in SAMPLERS} | {_key(alias): n for alias, n in ALIASES.items()}


def sampler_names() -> list[str]:
    """The display names, in the order a menu would show them."""
    return list(SAMPLERS)


def get_sampler(
    name: str, eta: float = 0.0, *, prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False
) -> Sampler:
    """A new sampler set up for SD, by A1111 name or diffusers class name (case-insensitive).

    eta: DDIM's η (0 = deterministic DDIM, 1 = DDPM-like noise); the other samplers take none, so a non-zero eta
    with them is an error rather than silently ignored. prediction_type: what the model predicts, "epsilon"
    (SD v1, SD 2's 512 models) or "v_prediction" (SD 2's 768 models). rescale_betas_zero_snr: zero terminal SNR
    (v_prediction only; DDIM, DDPM, Euler, Euler a and the DPM++ 2M family, as diffusers).
    """
    if not isinstance(name, str) or _key(name) not in _LOOKUP:
        raise MinisdError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    display = _LOOKUP[_key(name)]
    prediction = {"prediction_type": prediction_type, "rescale_betas_zero_snr": rescale_betas_zero_snr}
    if display == "DDIM":
        return DDIMSampler(eta=eta, **prediction)
    if eta != 0.0:
        raise MinisdError(f"eta applies to the DDIM sampler only, got eta={eta!r} with {display!r}")
    return SAMPLERS[display](**prediction)


__all__ = ["SAMPLERS", "Sampler", "get_sampler", "sampler_names"]
