"""DDPM, DDIM and PLMS stepped side by side with their diffusers twins (DDPMScheduler, DDIMScheduler,
PNDMScheduler configured from SD v1.5's scheduler_config.json) over every timestep, with the same ε and the same
generator; and the places where diffusers misbehaves, shown next to what minisd does.

Precisions. diffusers keeps its β/ᾱ tables in float32 (cumprod included) even for float64 samples; minisd in
float64. Each case runs three ways:
  "float32"            float32 samples, diffusers as shipped.
  "float64"            float64 samples, diffusers as shipped: its float32 tables set the floor (~1e-6).
  "float32, f64 table" float32 samples, diffusers given the float64 ᾱ table the LDM code computes (which minisd
                       uses): the same float32 arithmetic on the same coefficients (DDPM and DDIM from
                       noise: bit-identical).
  "float64, f64 table" float64 samples, the same float64 table: only float64 rounding remains (~1e-15).
The f64-table runs prove the formulas, indexing and noise draws are the same; the other two measure what a user
of either library sees.
"""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr

from minisd.errors import MinisdError
from minisd.samplers.ddim import DDIMSampler
from minisd.samplers.ddpm import DDPMSampler
from minisd.samplers.pndm import PNDMSampler
from minisd.samplers.schedule import spaced_timesteps
from tests.parity import assert_parity, relative_error
from tests.reference import SD15_SCHEDULER_CONFIG

SD_V1 = SD15_SCHEDULER_CONFIG  # each twin takes the keys its constructor knows
PRECISIONS = ["float32", "float64", "float32, f64 table", "float64, f64 table"]
# max |error| / max |sample| over the whole trajectory:
#   float32: 1e-5 of the sample scale (float32's 6e-8 rounding of samples and coefficients, over ≤ 51 steps);
#   float64 with diffusers' float32 tables: the same 1e-5 (its ᾱ is ~5e-7 off, its step coefficients ~1e-6);
#   float32 with the same table: 2e-6 (measured 0 for DDPM/DDIM from noise; up to 6e-7 where diffusers' add_noise
#   rounds √ᾱ once more (img2img starts) or PLMS groups eq. 9's terms differently: a few float32 ulps);
#   float64 on both sides with the same table: 1e-12, float64 rounding only — except DDPM, whose last step
#   (to ᾱ = 1) has variance 0, which diffusers clamps to 1e-20 and so adds 1e-10 · z: bar 1e-9 there.
TOL = {"float32": 1e-5, "float64": 1e-5, "float32, f64 table": 2e-6, "float64, f64 table": 1e-12}


def tol(sampler: str, precision: str) -> float:
    return 1e-9 if sampler == "DDPM" and precision == "float64, f64 table" else TOL[precision]


SAMPLERS = ["DDPM", "DDIM eta=0", "DDIM eta=0.5", "DDIM eta=1", "PLMS"]


def ldm_alphas_cumprod(rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """ᾱ as CompVis LDM computes it (make_beta_schedule "linear", numpy float64), before its float32 buffer;
    rescaled for zero terminal SNR by diffusers' own rescale_zero_terminal_snr (in float64) on request."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    if rescale_betas_zero_snr:
        betas = diffusers_rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    return torch.from_numpy(np.cumprod(1.0 - betas))


def make_pair(sampler: str, precision: str, timestep_spacing: str = "leading", **settings):
    """(minisd sampler, its diffusers twin, ref_step(ref, eps, t, x, generator) -> x_prev). settings: keywords
    both sides take (prediction_type, rescale_betas_zero_snr: tests/test_samplers_v.py)."""
    eta = float(sampler.split("=")[1]) if sampler.startswith("DDIM") else 0.0
    kind = sampler.split()[0]
    cls = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler, "PLMS": PNDMScheduler}[kind]
    if kind == "DDIM":
        ours = DDIMSampler(eta, timestep_spacing, **settings)
    else:
        ours = {"DDPM": DDPMSampler, "PLMS": PNDMSampler}[kind](timestep_spacing, **settings)
    config = {**SD_V1, "timestep_spacing": timestep_spacing, **settings}
    ref = cls(**{k: v for k, v in config.items() if k in inspect.signature(cls.__init__).parameters})
    if precision.endswith("f64 table"):
        ref.alphas_cumprod = ldm_alphas_cumprod(settings.get("rescale_betas_zero_snr", False))
        ref.final_alpha_cumprod = ref.alphas_cumprod[0]  # DDIM, PNDM (set_alpha_to_one=False)
        ref.one = torch.tensor(1.0, dtype=torch.float64)  # DDPM
    if cls is PNDMScheduler:

        def ref_step(ref, eps, t, x, generator):
            return ref.step(eps, t, x).prev_sample

    else:

        def ref_step(ref, eps, t, x, generator):
            kwargs = {"eta": eta} if cls is DDIMScheduler else {}
            return ref.step(eps, t, x, generator=generator, **kwargs).prev_sample

    return ours, ref, ref_step


_g = torch.Generator().manual_seed(1234)
PERM_1, PERM_2 = torch.randperm(256, generator=_g), torch.randperm(256, generator=_g)
WEIGHTS = torch.randn(3, 256, generator=_g, dtype=torch.float64) * 0.6
PHASE = torch.rand(256, generator=_g, dtype=torch.float64) * 2 * math.pi


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in UNet, fixed, deterministic and random-looking in x and t: ε = tanh(A x + sin(t / 97 + φ)) with A
    a sparse random linear map (three random entries per row: elementwise ops and gathers, no matmul, so it
    stays fast on a busy 2-core runner). x: (2, 4, 8, 8)."""
    x_flat = x.flatten(1)  # (2, 256)
    w = WEIGHTS.to(x.dtype)
    mixed = w[0] * x_flat[:, PERM_1] + w[1] * x_flat[:, PERM_2] + w[2] * x_flat
    return torch.tanh(mixed + torch.sin(int(t) / 97.0 + PHASE).to(x.dtype)).reshape(x.shape)


def start(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise): a clean 'image' and the starting noise, (2, 4, 8, 8)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)


def run_side_by_side(ours, ref, ref_step, ref_timesteps, x_ours, x_ref):
    """Step both over their timesteps (which must agree), each on its own trajectory, same model and seed.
    Returns the stacked trajectories (steps, 2, 4, 8, 8) and both generators."""
    assert ours.timesteps.tolist() == ref_timesteps.tolist()
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    path_ours, path_ref = [], []
    for t_ours, t_ref in zip(ours.timesteps, ref_timesteps, strict=True):
        x_ours = ours.step(model(x_ours, t_ours), t_ours, x_ours, generator=g_ours)
        x_ref = ref_step(ref, model(x_ref, t_ref), t_ref, x_ref, g_ref)
        path_ours.append(x_ours)
        path_ref.append(x_ref)
    return torch.stack(path_ours), torch.stack(path_ref), g_ours, g_ref


def dtype_of(precision: str) -> torch.dtype:
    return torch.float32 if precision.startswith("float32") else torch.float64


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_parity(sampler, precision):
    """Every timestep of n = 1, 2, 10, 25, 50 steps; the generators end in the same state (same draws)."""
    for n in [1, 2, 10, 25, 50]:
        ours, ref, ref_step = make_pair(sampler, precision)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        _, noise = start(dtype_of(precision))
        x = noise * ours.init_noise_sigma
        path_ours, path_ref, g_ours, g_ref = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
        assert path_ours.dtype == x.dtype
        assert torch.equal(g_ours.get_state(), g_ref.get_state()), "a different number of noise draws"
        name = f"{sampler} n={n} {precision}"
        assert_parity("test_txt2img_parity", name, path_ours, path_ref, tol(sampler, precision))


# 1000 DDPM steps each compute β_t = 1 − ᾱ_t / ᾱ_{t−1} ≈ 1e-3…1e-2 from neighbouring entries of diffusers' float32
# table: up to 8.5e-5 relative error in β_t (4 of float32's 7 digits cancel); the chain multiplies x by
# ≈ 1/√ᾱ_999 ≈ 15 along the way. Measured: 2.6e-5 against diffusers as shipped (float32 or float64 samples), 0
# (float32) and 3e-15 (float64) against diffusers given the float64 table: the gap is diffusers' float32 table,
# and minisd's float64 run is the exact one. The other samplers' coefficients do not cancel this way.
TOL_1000 = {"float32": 5e-5, "float64": 5e-5, "float32, f64 table": 2e-6, "float64, f64 table": 1e-9}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "DDIM eta=1", "PLMS"])
def test_1000_steps(sampler, precision):
    """1000 "leading" steps: minisd visits 999 … 0; diffusers' "leading" visits 1000 … 1 and fails at t = 1000
    (past ᾱ's table). Its "trailing" 1000 steps visit 999 … 0, minisd's schedule: the twin for parity."""
    ours, ref, ref_step = make_pair(sampler, precision)
    ours.set_timesteps(1000)
    ref.set_timesteps(1000)
    assert ref.timesteps[0] == 1000
    x = start(dtype_of(precision))[1]
    with pytest.raises(IndexError):
        ref_step(ref, model(x, 1000), ref.timesteps[0], x, torch.Generator().manual_seed(7))
    _, ref, ref_step = make_pair(sampler, precision, timestep_spacing="trailing")
    ref.set_timesteps(1000)
    path_ours, path_ref, _, _ = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
    name = f"{sampler} n=1000 leading vs diffusers trailing {precision}"
    bar = TOL_1000[precision] if sampler == "DDPM" else tol(sampler, precision)
    assert_parity("test_1000_steps", name, path_ours, path_ref, bar)


@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "PLMS"])
def test_trailing_spacing_parity(sampler):
    """50 "trailing" steps (999, 979, …, 19), float64 on both sides."""
    ours, ref, ref_step = make_pair(sampler, "float64, f64 table", timestep_spacing="trailing")
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    x = start(torch.float64)[1]
    path_ours, path_ref, _, _ = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
    bar = tol(sampler, "float64, f64 table")
    assert_parity("test_trailing_spacing_parity", f"{sampler} trailing n=50", path_ours, path_ref, bar)


def diffusers_img2img_timesteps(ref, n: int, strength: float) -> torch.Tensor:
    """What diffusers' StableDiffusionImg2ImgPipeline.get_timesteps runs (after ref.set_timesteps(n))."""
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    return ref.timesteps[t_start * ref.order :]


@pytest.mark.parametrize("precision", ["float32", "float32, f64 table", "float64, f64 table"])
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "DDIM eta=1"])
def test_img2img_parity(sampler, precision):
    """Image-to-image: minisd's truncated schedule is the pipeline's, add_noise at its first timestep is
    diffusers' start, and every remaining step agrees."""
    for n, strength in [(50, 0.3), (50, 0.5), (50, 0.75), (50, 1.0), (10, 0.75), (25, 0.08)]:
        ours, ref, ref_step = make_pair(sampler, precision)
        ours.set_timesteps(n, strength=strength)
        ref.set_timesteps(n)
        ref_timesteps = diffusers_img2img_timesteps(ref, n, strength)
        x0, noise = start(dtype_of(precision))
        x_ours = ours.add_noise(x0, noise, ours.timesteps[:1])
        x_ref = ref.add_noise(x0, noise, ref_timesteps[:1])
        name = f"{sampler} img2img n={n} strength={strength} {precision}"
        assert_parity("test_img2img_parity", f"{name}: start", x_ours, x_ref, tol(sampler, precision))
        path_ours, path_ref, _, _ = run_side_by_side(ours, ref, ref_step, ref_timesteps, x_ours, x_ref)
        assert_parity("test_img2img_parity", name, path_ours, path_ref, tol(sampler, precision))


@pytest.mark.parametrize(("n", "strength"), [(50, 0.3), (50, 0.5), (50, 0.75), (10, 0.75), (25, 0.08), (2, 0.5)])
def test_plms_img2img_runs_its_own_warmup(n, strength):
    """PLMS image-to-image, diffusers' pipeline vs minisd, side by side.

    diffusers' pipeline slices PNDM's full-run schedule [t_{n−1}, t_{n−2}, t_{n−2}, t_{n−3}, …] at n − ⌊n · strength⌋,
    counting the warm-up's duplicate as a step. So (n = 50, strength 0.5) it starts at 501, one step noisier than
    the strength says (DDIM starts at 481); its warm-up 501 → 481 is sound, but the duplicate is gone, so the next
    call evaluates x_481 labelled t = 461 and steps it from 461 to 441: one step skipped, at the wrong noise level.
    n = 2, strength 0.5 runs [1, 1]: a step from t = 1 to the end, then x_1 treated as if it were x_501.
    minisd keeps the last ⌊n · strength⌋ steps (DDIM's start) and runs PLMS on them from scratch, warm-up and
    all. The twin for that: a fresh PNDMScheduler(n) stepped over minisd's timesteps (its PLMS step needs only t
    and ⌊T / n⌋)."""
    ours, right, ref_step = make_pair("PLMS", "float32")
    ours.set_timesteps(n, strength=strength)
    right.set_timesteps(n)
    ddim = DDIMSampler()
    ddim.set_timesteps(n, strength=strength)
    steps_run = min(int(n * strength), n)
    assert ours.timesteps[0] == ddim.timesteps[0], "PLMS and DDIM start from the same noise level"
    expected = ddim.timesteps.tolist()
    expected = expected[:1] + expected[1:2] + expected[1:]  # the warm-up's second call, at the next timestep
    assert ours.timesteps.tolist() == expected and len(ours.timesteps) == steps_run + (steps_run > 1)

    _, sliced, _ = make_pair("PLMS", "float32")
    sliced.set_timesteps(n)
    sliced_timesteps = diffusers_img2img_timesteps(sliced, n, strength)
    assert sliced_timesteps.tolist() != ours.timesteps.tolist()
    if (n, strength) == (50, 0.5):
        assert ours.timesteps[:4].tolist() == [481, 461, 461, 441]  # DDIM's start, then PLMS's own warm-up
        assert sliced_timesteps[:4].tolist() == [501, 481, 461, 441]  # one step earlier, no duplicate

    x0, noise = start(torch.float32)
    x = ours.add_noise(x0, noise, ours.timesteps[:1])
    path_ours, path_right, _, _ = run_side_by_side(ours, right, ref_step, ours.timesteps, x, x.clone())
    assert_parity("test_plms_img2img", f"PLMS img2img n={n} strength={strength}", path_ours, path_right, 1e-5)

    x_sliced = sliced.add_noise(x0, noise, sliced_timesteps[:1])
    for t in sliced_timesteps:
        x_sliced = sliced.step(model(x_sliced, t), t, x_sliced).prev_sample
    gap = relative_error(path_ours[-1], x_sliced)
    assert gap > 1e-2, f"diffusers' sliced PLMS img2img should differ visibly from the proper run, got {gap:.3g}"


@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "PLMS"])
def test_img2img_strength_too_small(sampler):
    """50 steps at strength 0.01 run no step. diffusers' pipeline slices an empty schedule without a word (PNDM's
    has one extra entry, so it runs one stray call at t = 1); minisd says why."""
    ours, ref, _ = make_pair(sampler, "float32")
    ref.set_timesteps(50)
    assert len(diffusers_img2img_timesteps(ref, 50, 0.01)) == (1 if sampler == "PLMS" else 0)
    with pytest.raises(MinisdError, match="runs no denoising step") as e:
        ours.set_timesteps(50, strength=0.01)
    assert "\n" not in str(e.value)


def test_caller_timesteps_ddpm_parity():
    """DDPM over caller-given timesteps, as diffusers' set_timesteps(timesteps=…)."""
    custom = [999, 850, 600, 420, 300, 100, 20, 3, 0]
    ours, ref, ref_step = make_pair("DDPM", "float64, f64 table")
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    x = start(torch.float64)[1]
    path_ours, path_ref, _, _ = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
    bar = tol("DDPM", "float64, f64 table")
    assert_parity("test_caller_timesteps", "DDPM caller timesteps", path_ours, path_ref, bar)


def test_caller_timesteps_equal_the_spaced_schedule():
    """Giving the spaced schedule by hand changes nothing; PLMS adds its warm-up call to caller timesteps too."""
    for make in [DDPMSampler, DDIMSampler, PNDMSampler]:
        a, b = make(), make()
        a.set_timesteps(25, strength=0.6)
        b.set_timesteps(timesteps=spaced_timesteps(25), strength=0.6)
        assert a.timesteps.tolist() == b.timesteps.tolist(), make.__name__


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_calls(sampler):
    """One model call per entry of `timesteps`: n for DDPM and DDIM; PLMS adds one for its warm-up (n ≥ 2)."""
    for n in [1, 2, 3, 10, 50, 1000]:
        for strength in [1.0, 0.5] if n > 1 else [1.0]:
            ours, _, _ = make_pair(sampler, "float32")
            ours.set_timesteps(n, strength=strength)
            steps_run = min(int(n * strength), n)
            calls = 0
            x = start(torch.float32)[1]
            for t in ours.timesteps:
                calls += 1
                x = ours.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0))
            expected = steps_run + (sampler == "PLMS" and steps_run > 1)
            assert calls == len(ours.timesteps) == expected, f"{sampler} n={n} strength={strength}"
            assert torch.isfinite(x).all()
            timesteps = ours.timesteps.unique_consecutive()
            assert (timesteps[:-1] > timesteps[1:]).all() and 0 <= timesteps[-1] and timesteps[0] <= 999


@pytest.mark.parametrize("make", [DDPMSampler, DDIMSampler, PNDMSampler])
def test_bad_input_is_one_line(make):
    cases = [
        (lambda s: s.set_timesteps(0), "num_inference_steps"),
        (lambda s: s.set_timesteps(-5), "num_inference_steps"),
        (lambda s: s.set_timesteps(1001), "num_inference_steps"),
        (lambda s: s.set_timesteps(12.5), "num_inference_steps"),
        (lambda s: s.set_timesteps(10, strength=0), "strength"),
        (lambda s: s.set_timesteps(10, strength=-0.3), "strength"),
        (lambda s: s.set_timesteps(10, strength=1.2), "strength"),
        (lambda s: s.set_timesteps(10, strength=math.nan), "strength"),
        (lambda s: s.set_timesteps(10, timesteps=[900, 10]), "not both"),
        (lambda s: s.set_timesteps(timesteps=[10, 900]), "decreasing"),
        (lambda s: make(timestep_spacing="cosine"), "timestep_spacing"),
    ]
    for call, match in cases:
        with pytest.raises(MinisdError, match=match) as e:
            call(make())
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [-0.1, math.nan, 1.5, math.inf, True, "0.5"])
def test_bad_eta(bad):
    with pytest.raises(MinisdError, match="eta") as e:
        DDIMSampler(eta=bad)
    assert "\n" not in str(e.value)


def test_step_off_schedule_is_an_error():
    """Every sampler counts its model calls (base.Sampler.step_index): a call must bring the timestep it expects."""
    x = torch.zeros(1, 4, 8, 8)
    for make in [DDPMSampler, DDIMSampler, PNDMSampler]:
        sampler = make()
        sampler.set_timesteps(10)
        with pytest.raises(MinisdError, match=r"t must be sampler.timesteps\[0\] = 901 .*got 801"):
            sampler.step(x, 801, x)  # the second timestep first
        sampler.step(x, 901, x)
        with pytest.raises(MinisdError, match=r"t must be sampler.timesteps\[1\] = \d+ .*got 901"):
            sampler.step(x, 901, x)  # the same call twice
