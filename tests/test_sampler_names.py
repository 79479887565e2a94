"""Sampler names: A1111's names and diffusers' class names resolve to the matching minisd sampler."""

import diffusers
import pytest

from minisd import MinisdError
from minisd.samplers import ALIASES, SAMPLERS, get_sampler, sampler_names
from minisd.samplers.ddim import DDIMSampler
from minisd.samplers.dpm_solver import DPMSolverPP2MSampler
from minisd.samplers.euler_ancestral import EulerAncestralSampler
from minisd.samplers.pndm import PNDMSampler


@pytest.mark.parametrize("name", sampler_names())
def test_display_names_round_trip(name):
    sampler = get_sampler(name)
    assert sampler.name == name
    assert get_sampler(name.upper()).name == name
    assert get_sampler(name.lower().replace(" ", "_")).name == name


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("Euler a", EulerAncestralSampler),
        ("euler_a", EulerAncestralSampler),
        ("EulerAncestralDiscreteScheduler", EulerAncestralSampler),
        ("eulerancestraldiscretescheduler", EulerAncestralSampler),
        ("PLMS", PNDMSampler),
        ("PNDMScheduler", PNDMSampler),
        ("ddim", DDIMSampler),
        ("DPM++ 2M Karras", DPMSolverPP2MSampler),
        ("DPM++ 2M SDE Karras", DPMSolverPP2MSampler),
        ("k_dpmpp_2m_sde", DPMSolverPP2MSampler),
    ],
)
def test_spellings(name, cls):
    assert isinstance(get_sampler(name), cls)


def test_karras_variant_uses_karras_sigmas():
    assert get_sampler("DPM++ 2M Karras").use_karras_sigmas
    assert not get_sampler("DPM++ 2M").use_karras_sigmas


def test_sde_variants():
    for name in ("DPM++ 2M SDE", "DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"):
        sampler = get_sampler(name)
        assert sampler.sde and sampler.use_karras_sigmas == name.lower().endswith("karras")
        assert sampler.name == get_sampler(sampler.name).name  # the name written into PNGs reads back
    assert not get_sampler("DPM++ 2M Karras").sde


def test_every_diffusers_alias_is_a_real_diffusers_class():
    """The aliases name classes that exist in the reference library (no typo can hide there)."""
    for alias in ALIASES:
        if alias.endswith("Scheduler"):
            assert hasattr(diffusers, alias), alias


def test_each_call_returns_a_fresh_sampler():
    """Samplers carry state (history of multistep methods): two pipelines must never share one."""
    assert get_sampler("LMS") is not get_sampler("LMS")


def test_ddim_eta():
    assert get_sampler("DDIM", eta=0.5).eta == 0.5
    with pytest.raises(MinisdError, match="eta applies to the DDIM sampler only"):
        get_sampler("Euler a", eta=0.3)


@pytest.mark.parametrize("bad", ["Euler b", "", "k_dpm_fast", None, 3])
def test_unknown_name_is_one_line_listing_the_known(bad):
    with pytest.raises(MinisdError) as info:
        get_sampler(bad)
    message = str(info.value)
    assert "\n" not in message
    for name in SAMPLERS:
        assert name in message
