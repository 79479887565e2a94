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


def test_a1111_15_names_are_sampler_and_schedule():
    """A1111 before 1.9 wrote the schedule into the sampler's name ("DPM++ 2M Karras"); 1.9+ writes the sampler and a
    separate "Schedule type". Both spellings give the same sampler and schedule, as A1111's own reader splits them."""
    for name, display, schedule in [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("dpmpp_2m_sde_karras", "DPM++ 2M SDE", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("Euler SGM Uniform", "Euler", "SGM Uniform"),
        ("DPM++ 2M", "DPM++ 2M", "Uniform"),
    ]:
        sampler = get_sampler(name)
        assert (sampler.name, sampler.schedule_type) == (display, schedule), name
        assert get_sampler(name, schedule_type="Automatic").schedule_type == (
            schedule if name != "DPM++ 2M" else "Karras"
        )
    with pytest.raises(MinisdError, match="names the Karras schedule"):
        get_sampler("DPM++ 2M Karras", schedule_type="Exponential")


def test_schedule_types_and_automatic():
    """Every σ sampler takes every schedule type; Automatic is A1111's choice per sampler; the ᾱ samplers refuse."""
    for name in ("LMS", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE"):
        for schedule in ("Uniform", "Karras", "Exponential", "SGM Uniform"):
            assert get_sampler(name, schedule_type=schedule).schedule_type == schedule
    automatic = {n: get_sampler(n, schedule_type="Automatic").schedule_type for n in sampler_names()}
    assert automatic == {
        **dict.fromkeys(sampler_names(), "Uniform"),
        "DPM++ 2M": "Karras",
        "DPM++ 2M SDE": "Exponential",
    }
    for name in ("DDPM", "DDIM", "PLMS"):
        with pytest.raises(MinisdError, match="integer timesteps"):
            get_sampler(name, schedule_type="Karras")
    with pytest.raises(MinisdError, match="SGM Uniform spaces its own t"):
        get_sampler("Euler", schedule_type="SGM Uniform", timestep_spacing="leading")
    with pytest.raises(MinisdError, match="schedule_type must be one of"):
        get_sampler("Euler", schedule_type="Polyexponential")
    for spelling, label in (("karras", "Karras"), ("sgm_uniform", "SGM Uniform"), ("automatic", "Karras")):
        assert get_sampler("DPM++ 2M", schedule_type=spelling).schedule_type == label  # A1111's ids too


def test_sde_variants():
    for name in ("DPM++ 2M SDE", "DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"):
        sampler = get_sampler(name)
        assert sampler.sde and (sampler.schedule_type == "Karras") == name.lower().endswith("karras")
        assert sampler.name == get_sampler(sampler.name).name == "DPM++ 2M SDE"  # the name written into PNGs
    assert not get_sampler("DPM++ 2M Karras").sde


def test_every_diffusers_alias_is_a_real_diffusers_class():
    """The aliases name classes that exist in the reference library (no typo can hide there)."""
    for alias in ALIASES:
        if alias.endswith("Scheduler"):
            assert hasattr(diffusers, alias), alias


def test_each_call_returns_a_fresh_sampler():
    """Samplers carry state (history of multistep methods): two pipelines must never share one."""
    assert get_sampler("LMS") is not get_sampler("LMS")


def test_eta_ddim_and_ancestral():
    """DDIM's η (A1111's "Eta DDIM", default 0) and the ancestral η of Euler a and DPM++ 2M SDE (A1111's "Eta",
    default 1); the other samplers take none (0, what they do anyway, is accepted)."""
    assert get_sampler("DDIM", eta=0.5).eta == 0.5 and get_sampler("DDIM").eta == 0.0
    assert get_sampler("Euler a", eta=0.3).eta == 0.3 and get_sampler("Euler a").eta == 1.0
    assert get_sampler("DPM++ 2M SDE", eta=0.0).eta == 0.0 and get_sampler("DPM++ 2M SDE Karras").eta == 1.0
    get_sampler("Euler", eta=0.0)
    for name in ("Euler", "DPM++ 2M", "PLMS", "LMS"):
        with pytest.raises(MinisdError, match="eta applies to DDIM"):
            get_sampler(name, eta=0.3)
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(MinisdError, match="eta must be in"):
            get_sampler("Euler a", eta=bad)


@pytest.mark.parametrize("bad", ["Euler b", "", "k_dpm_fast", None, 3, "UniPC", "DPM++ SDE Karras", "Restart"])
def test_unknown_name_is_one_line_listing_the_known(bad):
    with pytest.raises(MinisdError) as info:
        get_sampler(bad)
    message = str(info.value)
    assert "\n" not in message
    if bad in ("UniPC", "DPM++ SDE Karras", "Restart"):  # A1111's: said so, not "unknown"
        assert "is an A1111 sampler minisd does not have" in message
    if isinstance(bad, str):
        for name in SAMPLERS:
            assert name in message
