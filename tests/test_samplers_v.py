"""Every sampler with prediction_type="v_prediction" (SD 2's 768 models), stepped side by side with its diffusers
twin configured the same way, over every timestep, with the same model outputs and generator; zero terminal SNR
(rescale_betas_zero_snr) where diffusers has it, with "trailing" spacing for the ᾱ samplers; x̂_0 against diffusers'
pred_original_sample; and the one-line refusals.

The stand-in models and runners are the ε tests' (tests/test_samplers_alpha.py, tests/test_samplers_sigma.py): a
fixed random-looking function of (x, t) now read as v. Tolerances are those files' (same arithmetic: reading x̂_0
and ε̂ off v adds two products per step), except where stated.
"""

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from minisd.errors import MinisdError
from minisd.samplers import get_sampler, sampler_names
from minisd.samplers.dpm_solver import DPMSolverPP2MSampler
from minisd.samplers.euler import EulerSampler
from minisd.samplers.euler_ancestral import EulerAncestralSampler
from minisd.samplers.heun import HeunSampler
from minisd.samplers.lms import LMSSampler
from minisd.samplers.schedule import rescale_zero_terminal_snr, scaled_linear_betas
from tests.parity import assert_parity
from tests.reference import SD15_SCHEDULER_CONFIG
from tests.test_samplers_alpha import dtype_of, make_pair, model, run_side_by_side, start, tol
from tests.test_samplers_sigma import fake_eps, run_both, tolerance

V = {"prediction_type": "v_prediction"}
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}

# ---- the ᾱ samplers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "float32, f64 table", "float64, f64 table"])
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "DDIM eta=1", "PLMS"])
def test_alpha_samplers_v_parity(sampler, precision):
    """Every timestep of n = 1, 2, 10, 50 steps, SD v1's "leading" spacing; the generators end in the same state."""
    for n in [1, 2, 10, 50]:
        ours, ref, ref_step = make_pair(sampler, precision, **V)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = start(dtype_of(precision))[1] * ours.init_noise_sigma
        path_ours, path_ref, g_ours, g_ref = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
        assert torch.equal(g_ours.get_state(), g_ref.get_state())
        name = f"v {sampler} n={n} {precision}"
        assert_parity("test_alpha_samplers_v_parity", name, path_ours, path_ref, tol(sampler, precision))


@pytest.mark.parametrize("precision", ["float32", "float64, f64 table"])
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "DDIM eta=0.5"])
def test_alpha_samplers_zero_snr_trailing_parity(sampler, precision):
    """Zero terminal SNR and "trailing" spacing (Lin et al. 2023's fix): the first step starts from ᾱ_999 = 0
    (x̂_0 = −v there), 2, 10, 25, 50 steps. (DDIM η = 1: test_ddim_eta_1_from_zero_snr.)"""
    for n in [2, 10, 25, 50]:
        ours, ref, ref_step = make_pair(sampler, precision, timestep_spacing="trailing", **ZERO_SNR)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps[0] == 999 and ours.alphas_cumprod[999] == 0
        x = start(dtype_of(precision))[1]
        path_ours, path_ref, _, _ = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
        name = f"v zero-SNR trailing {sampler} n={n} {precision}"
        assert_parity(
            "test_alpha_samplers_zero_snr_trailing_parity", name, path_ours, path_ref, tol(sampler, precision)
        )


def test_ddim_eta_1_from_zero_snr():
    """DDIM η = 1 from ᾱ_t = 0: σ_t² = 1 − ᾱ_prev, so the step is x̂_0 re-noised with fresh noise only,
    x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev)·z, and the direction term's weight √(1 − ᾱ_prev − σ_t²) is exactly 0.
    Rounding leaves −1e-17 under that root for some step counts: minisd clamps it to 0; diffusers' DDIMScheduler
    returns NaN there (float64, n = 2 and 25; in float32 √ of the rounding, up to 2e-4 of the sample)."""
    for n in (2, 25):
        ours, ref, ref_step = make_pair("DDIM eta=1", "float64, f64 table", timestep_spacing="trailing", **ZERO_SNR)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        x = start(torch.float64)[1]
        t = ours.timesteps[0]
        v = model(x, t)
        g = torch.Generator().manual_seed(7)
        got = ours.step(v, t, x, generator=g)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
        alpha_bar_prev = ours.alphas_cumprod[int(ours.timesteps[1])].item()
        want = alpha_bar_prev**0.5 * (-v) + (1 - alpha_bar_prev) ** 0.5 * z  # x̂_0 = √0·x − √1·v = −v
        assert_parity("test_ddim_eta_1_from_zero_snr", f"DDIM eta=1 zero-SNR first step n={n}", got, want, 1e-12)
        theirs = ref_step(ref, v, ref.timesteps[0], x, torch.Generator().manual_seed(7))
        assert torch.isnan(theirs).all(), "diffusers now handles η = 1 at ᾱ_t = 0: compare it like the others"


@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0"])
def test_alpha_samplers_x0_pred_is_pred_original_sample(sampler):
    ours, ref, _ = make_pair(sampler, "float64, f64 table", **V)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = start(torch.float64)[1]
    for t in ours.timesteps[:3]:
        v = model(x, t)
        x0 = ours.x0_pred(v, t, x)
        out = ref.step(v, t, x, generator=torch.Generator().manual_seed(0))
        assert_parity("test_x0_pred_v", f"v {sampler} x0_pred t={int(t)}", x0, out.pred_original_sample, 1e-12)
        x = ours.step(v, t, x, generator=torch.Generator().manual_seed(0))


def test_rescale_zero_terminal_snr_equals_diffusers():
    """Lin et al.'s Algorithm 1 as diffusers writes it, on the same float64 β: equal to float64 rounding."""
    betas = scaled_linear_betas()
    assert_parity("test_rescale", "zero-SNR β", rescale_zero_terminal_snr(betas), diffusers_rescale(betas), 1e-12)


# ---- the σ samplers ----------------------------------------------------------------------------------------------

CONFIG = SD15_SCHEDULER_CONFIG
SIGMA_PAIRS = {  # name: (minisd class and options, diffusers class and options), prediction settings added below
    "lms": ((LMSSampler, {}), (LMSDiscreteScheduler, {})),
    "euler": ((EulerSampler, {}), (EulerDiscreteScheduler, {})),
    "euler_a": ((EulerAncestralSampler, {}), (EulerAncestralDiscreteScheduler, {})),
    "heun": ((HeunSampler, {}), (HeunDiscreteScheduler, {})),
    "dpmpp_2m": ((DPMSolverPP2MSampler, {}), (DPMSolverMultistepScheduler, {})),
    "dpmpp_2m_karras": (
        (DPMSolverPP2MSampler, {"schedule_type": "Karras"}),
        (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    ),
    "dpmpp_2m_sde": (
        (DPMSolverPP2MSampler, {"sde": True}),
        (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    ),
}
ZERO_SNR_SIGMA = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde"]  # diffusers has rescale_betas_zero_snr for these


def sigma_pair(name: str, settings: dict):
    (ours_cls, ours_options), (ref_cls, ref_options) = SIGMA_PAIRS[name]
    return (
        lambda: ours_cls(**ours_options, **settings),
        lambda: ref_cls.from_config(CONFIG, **ref_options, **settings),
    )


def check_sigma_pair(test: str, name: str, n: int, dtype: torch.dtype, settings: dict, bar: float, strength=1.0):
    (traj_ours, traj_ref, inp_ours, inp_ref), ours, ref, ref_timesteps = run_both(
        name, n, dtype, strength, pair=sigma_pair(name, settings)
    )
    assert torch.equal(ours.timesteps.to(ref_timesteps.dtype), ref_timesteps)
    label = f"v {'zero-SNR ' if settings.get('rescale_betas_zero_snr') else ''}{name} n={n} {str(dtype)[6:]}"
    label += f" strength={strength}" if strength < 1 else ""
    assert_parity(test, f"{label} UNet input", inp_ours, inp_ref, bar)
    assert_parity(test, f"{label} samples", traj_ours, traj_ref, bar)
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(SIGMA_PAIRS))
def test_sigma_samplers_v_parity(name, dtype):
    for n in (2, 10, 50):
        check_sigma_pair("test_sigma_samplers_v_parity", name, n, dtype, V, tolerance(name, n))
    if name != "lms":  # image-to-image: add_noise at the truncated start, then every remaining step
        check_sigma_pair("test_sigma_samplers_v_parity", name, 25, dtype, V, tolerance(name, 25), strength=0.6)


@pytest.mark.parametrize("name", ZERO_SNR_SIGMA)
def test_sigma_samplers_zero_snr_parity(name):
    """Zero terminal SNR: ᾱ_999 set to 2⁻²⁴ on both sides, so the run starts at σ ≈ 4096, the noise 4096 times the
    image. Samples are compared relative to each step's own scale (the first steps' is 4096 times the last's).

    Bar 5e-5: the first step from σ = 4096 to σ_next ≈ 16 cancels x ≈ 4096·ε against (σ − σ_next)·dx/dσ. Both
    sides do it in float32 (diffusers casts the sample to float32), where x is known to 4096 · 6e-8 = 2.4e-4, on a
    result of scale ~16: 1.5e-5 of it, the measured gap (Euler, n = 10), carried on by the later steps."""
    for n, spacing in ((2, "linspace"), (10, "linspace"), (50, "linspace"), (10, "trailing"), (50, "trailing")):
        settings = {**ZERO_SNR, "timestep_spacing": spacing}  # "trailing": what Lin et al. pair zero SNR with
        ours, ref = check_sigma_pair("test_sigma_samplers_zero_snr_parity", name, n, torch.float32, settings, 5e-5)
        if not name.startswith("dpm"):
            assert math.isclose(ours.init_noise_sigma, 4096.0, rel_tol=1e-6)
            assert math.isclose(float(ref.init_noise_sigma), ours.init_noise_sigma, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "lms"])
def test_sigma_samplers_x0_pred_is_pred_original_sample(name):
    make_ours, make_ref = sigma_pair(name, V)
    ours, ref = make_ours(), make_ref()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = start(torch.float32)[1] * ours.init_noise_sigma
    t = ours.timesteps[0]
    v = fake_eps(ours.scale_model_input(x, t), float(t))
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name == "euler_a" else {}
    want = ref.step(v, ref.timesteps[0], x, **kwargs).pred_original_sample
    assert_parity("test_x0_pred_v", f"v {name} x0_pred", ours.x0_pred(v, t, x), want, 1e-6)


# ---- names and refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sampler_names())
def test_get_sampler_passes_the_prediction_type(name):
    sampler = get_sampler(name, prediction_type="v_prediction")
    assert sampler.prediction_type == "v_prediction" and not sampler.rescale_betas_zero_snr
    if name in ("PLMS", "LMS", "Heun"):
        with pytest.raises(MinisdError, match=f"the {name} sampler cannot start from pure noise") as error:
            get_sampler(name, **ZERO_SNR)
        assert "\n" not in str(error.value)
    else:
        assert get_sampler(name, **ZERO_SNR).rescale_betas_zero_snr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prediction_type": "v"}, "prediction_type must be one of epsilon, v_prediction, got 'v'"),
        ({"prediction_type": "sample"}, "prediction_type must be one of epsilon, v_prediction"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr needs prediction_type v_prediction"),
        ({**V, "rescale_betas_zero_snr": 1}, "rescale_betas_zero_snr must be True or False"),
    ],
)
def test_bad_prediction_settings_are_one_line(settings, message):
    with pytest.raises(MinisdError, match=message) as error:
        get_sampler("DDIM", **settings)
    assert "\n" not in str(error.value)
