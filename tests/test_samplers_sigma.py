"""The σ samplers (LMS, Euler, Euler a, Heun, DPM++ 2M and 2M SDE with and without Karras σ) stepped side by side
with their diffusers twins over every timestep, with the same ε function and the same generator; then their properties.

Tolerances (max |minisd − diffusers| / max |diffusers| of the sample, per step, the worst step reported), 1e-5
in float32 and float64 alike (exceptions in `tolerance`):
- float32: both compute each step in float32; minisd's σ come from a float64 ᾱ table, diffusers' from a
  float32 cumprod (up to 1.3e-5 relative apart at t = 0, ~5e-7 at t = 999), and the roundings of the two
  differ step by step.
- float64: diffusers still computes its σ, and for Euler / Euler a / DPM++ the whole step, in float32 (it casts
  the sample to float32), so float64 runs cannot agree better than float32 ones (up to ~5e-6 seen; LMS and
  Heun keep float64 samples).
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

from minisd.errors import MinisdError
from minisd.samplers.base import img2img_start
from minisd.samplers.dpm_solver import DPMSolverPP2MSampler
from minisd.samplers.euler import EulerSampler
from minisd.samplers.euler_ancestral import EulerAncestralSampler
from minisd.samplers.heun import HeunSampler
from minisd.samplers.lms import LMSSampler, lms_coefficients
from minisd.samplers.sigmas import karras_sigmas, sd_sigma_table
from tests.parity import REPORT, assert_parity, relative_error
from tests.reference import SD15_SCHEDULER_CONFIG

PAIRS = {  # name: (minisd sampler, diffusers scheduler)
    "lms": (LMSSampler, lambda: LMSDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)),
    "euler": (EulerSampler, lambda: EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)),
    "euler_a": (EulerAncestralSampler, lambda: EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)),
    "heun": (HeunSampler, lambda: HeunDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)),
    "dpmpp_2m": (DPMSolverPP2MSampler, lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)),
    "dpmpp_2m_karras": (
        lambda: DPMSolverPP2MSampler(schedule_type="Karras"),
        lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, use_karras_sigmas=True),
    ),
    "dpmpp_2m_sde": (
        lambda: DPMSolverPP2MSampler(sde=True),
        lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++"),
    ),
    "dpmpp_2m_sde_karras": (
        lambda: DPMSolverPP2MSampler(schedule_type="Karras", sde=True),
        lambda: DPMSolverMultistepScheduler.from_config(
            SD15_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        ),
    ),
}
SHAPE = (1, 4, 8, 8)


def tolerance(name: str, n: int) -> float:
    """The bar for one run (see the module docstring): 1e-5 of the sample scale, 2e-5 for Karras σ (the eq. 5
    ramp starts from σ_min = σ(0), where the two tables differ most, 1.3e-5), 3e-5 for 1000-step runs (a
    thousand float32 roundings; Euler a re-injects noise every step, 1.3e-5 seen).

    DPM++ 2M SDE: 5e-5, and 3e-4 for 1000-step runs. diffusers computes 1 − e^(−2h) and √(1 − e^(−2h)) in
    float32, which loses digits as h shrinks (h ≈ 0.01 at 1000 steps); minisd uses expm1 in float64. Measured
    against the same run computed in float64 throughout: minisd's float32 run 5.9e-6 away at n = 999,
    diffusers' 2.2e-4 (n = 50: 1.1e-6 and 5.9e-6); see test_sde_float32_run_stays_near_float64."""
    if "sde" in name:
        return 3e-4 if n >= 999 else 5e-5
    return 3e-5 if n >= 999 else 2e-5 if "karras" in name else 1e-5


def fake_eps(x: torch.Tensor, t: float) -> torch.Tensor:
    """A fixed, random-looking, smooth stand-in for the UNet: ε(x, t) = sin(a·x + b + t/97), a, b fixed per
    element. Depends on both x and t, so a wrong input scaling or timestep shows up in the trajectory."""
    g = torch.Generator().manual_seed(1234)
    a = 0.5 + torch.rand(x.shape, generator=g, dtype=torch.float64)
    b = 2 * math.pi * torch.rand(x.shape, generator=g, dtype=torch.float64)
    return torch.sin(a * x.double() + b + t / 97).to(x.dtype)


def run_both(name: str, n: int, dtype: torch.dtype, strength: float = 1.0, lms_order_fix: bool = False, pair=None):
    """Run minisd's sampler and diffusers' scheduler the way the SD pipelines do (txt2img, or img2img with
    `strength`). Returns ((ours, ref) sample trajectories and (ours, ref) UNet-input trajectories, each (k, b, c,
    h, w) with step k divided by diffusers' max |·| at that step), the two samplers, diffusers' timesteps.
    pair: (make_ours, make_ref) instead of PAIRS[name] (tests/test_samplers_v.py: other settings, same name)."""
    make_ours, make_ref = pair or PAIRS[name]
    ours, ref = make_ours(), make_ref()
    ours.set_timesteps(n, strength=strength)
    ref.set_timesteps(n)
    # diffusers' img2img pipeline: t_start = n − min(⌊n·strength⌋, n), timesteps[t_start·order:], set_begin_index
    begin = img2img_start(n, strength) * ref.order
    ref_timesteps = ref.timesteps[begin:]
    ref.set_begin_index(begin)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g, dtype=dtype)
    noise = torch.randn(SHAPE, generator=g, dtype=dtype)
    if strength == 1.0:
        x_ours, x_ref = noise * ours.init_noise_sigma, noise * ref.init_noise_sigma
    else:
        x_ours, x_ref = ours.add_noise(x0, noise, ours.timesteps[:1]), ref.add_noise(x0, noise, ref_timesteps[:1])
    gen_ours, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    traj_ours, traj_ref, inp_ours, inp_ref = [], [], [], []
    for k, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref_timesteps, strict=True)):
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        x_ours = ours.step(fake_eps(in_ours, float(t_ours)), t_ours, x_ours, generator=gen_ours)
        kwargs = {"generator": gen_ref} if name == "euler_a" or "sde" in name else {}
        if lms_order_fix:
            kwargs["order"] = min(k + 1, 4)  # the order a run with k earlier steps of its own can support
        x_ref = ref.step(fake_eps(in_ref, float(t_ref)), t_ref, x_ref, **kwargs).prev_sample
        for traj, x, scale_of in ((traj_ours, x_ours, x_ref), (traj_ref, x_ref, x_ref)):
            traj.append(x.double() / scale_of.double().abs().max())
        for traj, x, scale_of in ((inp_ours, in_ours, in_ref), (inp_ref, in_ref, in_ref)):
            traj.append(x.double() / scale_of.double().abs().max())
    trajs = torch.stack(traj_ours), torch.stack(traj_ref), torch.stack(inp_ours), torch.stack(inp_ref)
    return trajs, ours, ref, ref_timesteps


def check_pair(test: str, name: str, n: int, dtype: torch.dtype, strength: float = 1.0) -> None:
    (traj_ours, traj_ref, inp_ours, inp_ref), ours, ref, ref_timesteps = run_both(name, n, dtype, strength)
    # the UNet is shown the very same timesteps (DPM++: integers; the others: float32 fractions)
    assert torch.equal(ours.timesteps.to(ref_timesteps.dtype), ref_timesteps), (ours.timesteps, ref_timesteps)
    if strength == 1.0 and name.startswith("dpm"):
        assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    elif strength == 1.0:  # σ_max of the float32 vs float64 table: ~5e-7 apart
        assert math.isclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)
    label = f"{name} n={n} {str(dtype)[6:]}" + (f" strength={strength}" if strength < 1 else "")
    assert_parity(test, f"{label} UNet input", inp_ours, inp_ref, tolerance(name, n))
    assert_parity(test, f"{label} samples", traj_ours, traj_ref, tolerance(name, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_txt2img_parity(name, dtype):
    """Every step of a text-to-image run equals diffusers', for n in {1 (DPM++ only; see test_one_step), 2, 10,
    25, 50} and 1000 (999 for DPM++ without Karras: diffusers' n = 1000 repeats a timestep and returns NaN, see
    test_dpm_rejects_1000)."""
    for n in (1, 2, 10, 25, 50) if name.startswith("dpm") else (2, 10, 25, 50):
        check_pair("test_txt2img_parity", name, n, dtype)
    if dtype == torch.float32:  # the long runs once: 1000 steps (Heun 1999 calls) take most of the time
        check_pair("test_txt2img_parity", name, 999 if name in ("dpmpp_2m", "dpmpp_2m_sde") else 1000, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", [name for name in PAIRS if name != "lms"])
def test_img2img_parity(name, dtype):
    """Image-to-image: add_noise at the truncated start, then every remaining step, as diffusers' pipeline runs."""
    for n, strength in ((10, 0.75), (25, 0.3), (50, 0.5), (50, 0.99), (2, 0.5)):
        check_pair("test_img2img_parity", name, n, dtype, strength)


def test_lms_img2img_restarts_its_history():
    """LMS image-to-image: minisd restarts at order 1; diffusers takes the order from the absolute step index and
    so, for the first 3 steps after truncation, uses order-4 coefficients with fewer stored slopes. minisd equals
    diffusers given the right order (step(order=k + 1)); diffusers' default is shown beside it, and differs."""
    for n, strength in ((10, 0.75), (25, 0.3), (50, 0.5)):
        for dtype in (torch.float32, torch.float64):
            label = f"lms n={n} {str(dtype)[6:]} strength={strength}"
            (ours, ref, _, _), *_ = run_both("lms", n, dtype, strength, lms_order_fix=True)
            assert_parity("test_lms_img2img", f"{label} vs diffusers step(order=k+1)", ours, ref, 1e-5)
            (ours, ref_default, _, _), *_ = run_both("lms", n, dtype, strength)
            err = relative_error(ours[-1], ref_default[-1])
            REPORT.append(("test_lms_img2img", f"{label} vs diffusers' default order (differs: expected)", err, 1.0))
            assert err > 1e-3, "diffusers' LMS img2img now restarts its order: drop this side-by-side"


@pytest.mark.parametrize("n", [1, 2, 4, 10, 50, 1000])
def test_lms_coefficients_match_quad(n):
    """The closed-form ∫ ℓ_j equals diffusers' scipy.integrate.quad coefficients on diffusers' own σ, to 1e-6
    relative to the step's largest coefficient up to n = 50. quad integrates a degree-3 polynomial exactly, but
    diffusers evaluates the integrand in float32 (its σ are float32 tensors): at n = 1000 neighbouring σ near σ_min
    are ~1e-4 apart, so (τ − σ_k)/(σ_j − σ_k) loses ~6e-6 there. The same quad in float64 agrees with the closed
    form to 1e-9 at every n, so that 6e-6 is diffusers' rounding, not the closed form's."""
    from scipy.integrate import quad  # diffusers' own integrator, here in float64 (scipy: a test dependency)

    ref = LMSDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_timesteps(n)
    sigmas = ref.sigmas.double().tolist()
    worst_vs_diffusers = worst_vs_quad64 = 0.0
    for i in range(0, n, max(1, n // 50)):  # every step up to 50, then 50 spread over the run
        order = min(i + 1, 4)
        nodes = sigmas[i - order + 1 : i + 1][::-1]
        got = torch.tensor(lms_coefficients(nodes, sigmas[i + 1]), dtype=torch.float64)
        want = torch.tensor([ref.get_lms_coefficient(order, i, j) for j in range(order)], dtype=torch.float64)

        def basis(tau, j, nodes=nodes):
            return math.prod((tau - s) / (nodes[j] - s) for k, s in enumerate(nodes) if k != j)

        quad64 = torch.tensor(
            [quad(basis, nodes[0], sigmas[i + 1], args=(j,), epsabs=0, epsrel=1e-13)[0] for j in range(order)],
            dtype=torch.float64,
        )
        worst_vs_diffusers = max(worst_vs_diffusers, relative_error(got, want))
        worst_vs_quad64 = max(worst_vs_quad64, relative_error(got, quad64))
    bar = 1e-6 if n <= 50 else 1e-5
    REPORT.append(("test_lms_coefficients", f"LMS coefficients n={n} vs diffusers", worst_vs_diffusers, bar))
    REPORT.append(("test_lms_coefficients", f"LMS coefficients n={n} vs float64 quad", worst_vs_quad64, 1e-9))
    assert worst_vs_diffusers <= bar and worst_vs_quad64 <= 1e-9


def test_euler_caller_sigmas_and_timesteps():
    """Caller-given σ (Karras, plus the final 0) and caller-given timesteps match diffusers' Euler given the same."""
    table = sd_sigma_table()
    sigmas = torch.cat([karras_sigmas(table[0].item(), table[-1].item(), 20), torch.zeros(1, dtype=torch.float64)])
    timesteps = [999, 800, 500, 301, 120, 40, 3]
    for kwargs in ({"sigmas": sigmas}, {"timesteps": timesteps}):
        ours, ref = EulerSampler(), EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
        ours.set_timesteps(**kwargs)
        ref.set_timesteps(**{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        # fractional t from log-σ interpolation: float64 table vs diffusers' float32 one
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-3)
        x_ours = x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * ours.init_noise_sigma
        for t_ours, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
            eps = fake_eps(ref.scale_model_input(x_ref, t_ref), float(t_ref))  # same ε on both sides
            x_ours = ours.step(eps, t_ours, x_ours)
            x_ref = ref.step(eps, t_ref, x_ref).prev_sample
        assert_parity("test_euler_caller_schedule", f"euler {next(iter(kwargs))}=", x_ours, x_ref, 1e-5)


@pytest.mark.parametrize("name", ["lms", "euler", "euler_a", "heun"])
def test_one_step(name):
    """n = 1: diffusers' linspace(0, 999, 1) = [0] runs its one step from t = 0 (σ_min = 0.029, init_noise_sigma
    0.029: a "noise" 35× too small, and an output that is nearly that noise). minisd starts at t = 999 (σ_max), so
    its one step is Euler from pure noise to σ = 0 — which is diffusers' Euler given timesteps=[999]."""
    ours, ref_default = PAIRS[name][0](), PAIRS[name][1]()
    ours.set_timesteps(1)
    ref_default.set_timesteps(1)
    assert ref_default.timesteps.tolist() == [0.0] and float(ref_default.init_noise_sigma) < 0.03  # diffusers
    ref = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_timesteps(timesteps=[999])
    assert ours.timesteps.tolist() == [999.0] and math.isclose(
        ours.init_noise_sigma, ref.init_noise_sigma, rel_tol=1e-6
    )
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    x_ours, x_ref = noise * ours.init_noise_sigma, noise * ref.init_noise_sigma
    eps_ours = fake_eps(ours.scale_model_input(x_ours, ours.timesteps[0]), 999.0)
    eps_ref = fake_eps(ref.scale_model_input(x_ref, ref.timesteps[0]), 999.0)
    x_ours = ours.step(eps_ours, ours.timesteps[0], x_ours, generator=torch.Generator().manual_seed(1))
    x_ref = ref.step(eps_ref, ref.timesteps[0], x_ref).prev_sample
    assert_parity("test_one_step", f"{name} n=1 vs diffusers Euler timesteps=[999]", x_ours, x_ref, 1e-5)


def test_dpm_rejects_1000():
    """DPM++ 2M at n = 1000: diffusers repeats a timestep and divides by h = 0 (NaN); minisd says so up front."""
    ref = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ref.set_timesteps(1000)
    assert (ref.timesteps[1:] == ref.timesteps[:-1]).any()
    with pytest.raises(MinisdError, match="num_inference_steps"):
        DPMSolverPP2MSampler().set_timesteps(1000)
    DPMSolverPP2MSampler(schedule_type="Karras").set_timesteps(1000)  # Karras σ stay distinct: allowed


@pytest.mark.parametrize("name", list(PAIRS))
def test_timesteps_and_call_counts(name):
    """timesteps decrease (Heun: in pairs; DPM++ Karras: rounded Karras t repeat near σ_min from n = 50), one per
    model call: n calls, Heun 2n − 1; σ decrease strictly to 0; one call too many is an error."""
    for n in (1, 2, 10, 25, 50, 999):
        for strength in (1.0, 0.5) if n > 1 else (1.0,):
            sampler = PAIRS[name][0]()
            sampler.set_timesteps(n, strength=strength)
            m = n - img2img_start(n, strength)  # method steps this run makes
            t = sampler.timesteps
            assert len(t) == (2 * m - 1 if name == "heun" else m)
            assert len(sampler.sigmas) == m + 1 and sampler.sigmas[-1] == 0
            assert (sampler.sigmas[1:] < sampler.sigmas[:-1]).all()
            if name == "heun":
                assert (t[1:] <= t[:-1]).all() and torch.equal(t[1::2], t[2::2])
            elif name.startswith("dpmpp") and name.endswith("karras"):
                assert (t[1:] <= t[:-1]).all()
            else:
                assert (t[1:] < t[:-1]).all()
    x = torch.zeros(SHAPE)
    for t_k in sampler.timesteps:
        x = sampler.step(torch.ones(SHAPE), t_k, x)
    with pytest.raises(MinisdError):
        sampler.step(torch.ones(SHAPE), sampler.timesteps[-1], x)


def test_sde_float32_run_stays_near_float64(monkeypatch):
    """Why the SDE's bar is wider (see `tolerance`): minisd's float32 DPM++ 2M SDE run stays within 1e-5 of the very
    same run (same start, same noise) with every step computed in float64, where diffusers' drifts ~2e-4 away."""
    import minisd.samplers.dpm_solver as dpm_solver

    (_, _, ours, ref), *_ = run_both("dpmpp_2m_sde", 999, torch.float32)
    monkeypatch.setattr(dpm_solver, "upcast", lambda x: x.to(torch.float64))
    (_, _, exact, _), *_ = run_both("dpmpp_2m_sde", 999, torch.float32)
    assert relative_error(ours, exact) < 1e-5
    REPORT.append(("test_sde_float32_run_stays_near_float64", "diffusers' DPM++ 2M SDE n=999 float32 vs float64",
                   relative_error(ref, exact), 3e-4))  # fmt: skip


def one_line_error(call) -> str:
    with pytest.raises(MinisdError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("name", list(PAIRS))
def test_bad_input(name):
    """Bad n, strength, caller σ or timesteps, or a step at the wrong t: one-line MinisdError naming the parameter."""
    sampler = PAIRS[name][0]()
    for n in (0, -1, 1001, 2.5, True, None):
        assert "num_inference_steps" in one_line_error(lambda n=n: sampler.set_timesteps(n))
    for strength in (0.0, -0.1, 1.5, "1", 0.01):
        assert "strength" in one_line_error(lambda s=strength: sampler.set_timesteps(50, strength=s))
    for sigmas in ([3.0, 5.0, 0.0], [3.0, -1.0, 0.0], [3.0, 1.0], [0.0], [[1.0, 0.0]], [3.0, float("nan"), 0.0]):
        assert "sigmas" in one_line_error(lambda s=sigmas: sampler.set_timesteps(sigmas=s))
    for timesteps in ([500, 800], [1000, 10], [10, -1], [5.5, 1.0]):
        assert "timesteps" in one_line_error(lambda t=timesteps: sampler.set_timesteps(timesteps=t))
    one_line_error(lambda: sampler.set_timesteps(10, sigmas=[1.0, 0.0]))
    sampler.set_timesteps(10)
    assert "t must be" in one_line_error(lambda: sampler.step(torch.ones(SHAPE), 123, torch.zeros(SHAPE)))
    assert "t must be" in one_line_error(lambda: sampler.add_noise(torch.ones(SHAPE), torch.ones(SHAPE), 123))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde"])
def test_noisy_samplers_cuda_with_cpu_generator(name):
    """On CUDA with a CPU generator, the samplers that draw noise each step (Euler a, DPM++ 2M SDE) draw the same
    noise as diffusers (on CPU, then moved) and so the same image as the CPU run, within the CPU bar (CUDA's
    float32 arithmetic rounds like the CPU's)."""
    results, bar = {}, tolerance(name, 25)
    for device in ("cpu", "cuda"):
        ours, ref = PAIRS[name][0](), PAIRS[name][1]()
        ours.set_timesteps(25)
        ref.set_timesteps(25, device=device)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
        x_ours, x_ref = noise * ours.init_noise_sigma, noise * torch.as_tensor(ref.init_noise_sigma).to(device)
        gen_ours, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        for t_ours, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
            eps = fake_eps(ours.scale_model_input(x_ours, t_ours), float(t_ours))
            x_ours = ours.step(eps, t_ours, x_ours, generator=gen_ours)
            eps = fake_eps(ref.scale_model_input(x_ref, t_ref), float(t_ref))
            x_ref = ref.step(eps, t_ref, x_ref, generator=gen_ref).prev_sample
        assert x_ours.device.type == device
        assert_parity("test_noisy_samplers_cuda", f"{name} n=25 {device}", x_ours.cpu(), x_ref.cpu(), bar)
        results[device] = x_ours.cpu()
    assert_parity("test_noisy_samplers_cuda", f"{name} n=25 cuda vs cpu", results["cuda"], results["cpu"], bar)
