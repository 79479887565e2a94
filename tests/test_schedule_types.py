"""Timestep spacings and schedule types, against two references.

1. diffusers: every sampler × timestep_spacing (leading, linspace, trailing) stepped side by side with its diffusers
   twin built the way `XScheduler.from_config(pipe.scheduler.config, timestep_spacing=...)` builds it; and every
   σ sampler's Karras and Exponential schedule against diffusers' use_karras_sigmas / use_exponential_sigmas where
   diffusers offers them.
2. k-diffusion (what A1111 samples with): its σ schedules (`get_sigmas_karras`, `get_sigmas_exponential`, A1111's
   `sgm_uniform`, `DiscreteSchedule.get_sigmas`) and its sampling loops (`sample_euler`, `sample_euler_ancestral`,
   `sample_heun`, `sample_lms`, `sample_dpmpp_2m`, `sample_dpmpp_2m_sde`) re-derived below from the published
   algorithms, in float64. k-diffusion itself cannot be a test dependency: its wheel requires torchvision (and
   clean-fid, kornia, wandb, ...), `pip download --no-deps k-diffusion` and its METADATA show.

Then the differences by design between minisd and A1111/k-diffusion, each measured (test_differences_*); A1111's
Brownian-tree noise for DPM++ 2M SDE comes from torchsde, as A1111's does (a test dependency: it needs only torch,
numpy, scipy and trampoline).
"""

import math

import pytest
import torch
import torchsde
from diffusers import DPMSolverMultistepScheduler
from scipy.integrate import quad

from minisd.errors import MinisdError
from minisd.samplers import get_sampler
from minisd.samplers.sigmas import sd_sigma_table
from tests.parity import REPORT, assert_parity, relative_error
from tests.reference import SD15_SCHEDULER_CONFIG, diffusers_twin
from tests.test_samplers_alpha import make_pair, run_side_by_side, start
from tests.test_samplers_sigma import fake_eps, tolerance

SHAPE = (1, 4, 8, 8)
SPACINGS = ("leading", "linspace", "trailing")
SIGMA_NAMES = ("LMS", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE")
TABLE = sd_sigma_table()  # float64 σ_t, t = 0 … 999


# ---------------------------------------------------------------------------------------------------------------
# 1. diffusers, stepped side by side


def diffusers_options(schedule: str) -> dict:
    return {"Uniform": {}, "Karras": {"use_karras_sigmas": True}, "Exponential": {"use_exponential_sigmas": True}}[
        schedule
    ]


def step_side_by_side(name: str, ours, ref, n: int, dtype: torch.dtype, same_t: bool = False):
    """txt2img with both: same start, same ε function, same generator seed. Returns the sample trajectories, each
    step divided by diffusers' max |x| there. same_t: evaluate ε at minisd's t on both sides (where diffusers' t
    differ by design)."""
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x_ours, x_ref = noise * ours.init_noise_sigma, noise * ref.init_noise_sigma
    gen_ours, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    traj_ours, traj_ref = [], []
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
        eps_ours = fake_eps(ours.scale_model_input(x_ours, t_ours), float(t_ours))
        eps_ref = fake_eps(ref.scale_model_input(x_ref, t_ref), float(t_ours if same_t else t_ref))
        x_ours = ours.step(eps_ours, t_ours, x_ours, generator=gen_ours)
        noisy = name == "Euler a" or "SDE" in name
        x_ref = ref.step(eps_ref, t_ref, x_ref, **({"generator": gen_ref} if noisy else {})).prev_sample
        scale = x_ref.double().abs().max()
        traj_ours.append(x_ours.double() / scale)
        traj_ref.append(x_ref.double() / scale)
    return torch.stack(traj_ours), torch.stack(traj_ref)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SIGMA_NAMES)
def test_sigma_samplers_every_spacing_match_diffusers(name, spacing):
    """The σ samplers with each timestep_spacing: the UNet is shown diffusers' very timesteps and every step equals
    diffusers' (float64 samples, where diffusers' float32 σ table sets the floor, ~1e-6, and Euler, Euler a and
    DPM++ compute their step in float32; the bars of test_samplers_sigma.tolerance). n = 2, 10, 25, 50 (none of
    them one of the 62 n where diffusers' "trailing" arange yields an extra step, see schedule.spaced_timesteps).
    With "leading", diffusers starts these samplers from std √(σ_max² + 1), and so does minisd."""
    for n in (2, 10, 25, 50):
        ours, ref = get_sampler(name, timestep_spacing=spacing), diffusers_twin(name, timestep_spacing=spacing)
        ours_t, ref_t = get_sampler(name, timestep_spacing=spacing), diffusers_twin(name, timestep_spacing=spacing)
        ours_t.set_timesteps(n)
        ref_t.set_timesteps(n)
        assert torch.equal(ours_t.timesteps.to(ref_t.timesteps.dtype), ref_t.timesteps), (
            ours_t.timesteps,
            ref_t.timesteps,
        )
        traj_ours, traj_ref = step_side_by_side(name, ours, ref, n, torch.float64)
        bar = tolerance(name.lower(), n)
        assert_parity("test_sigma_samplers_every_spacing", f"{name} {spacing} n={n}", traj_ours, traj_ref, bar)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", ["DDPM", "DDIM eta=0", "DDIM eta=0.5", "PLMS"])
def test_alpha_samplers_every_spacing_match_diffusers(sampler, spacing):
    """DDPM, DDIM and PLMS with each timestep_spacing, float64 on both sides with the same ᾱ table (the bars of
    test_samplers_alpha: float64 rounding only), n = 2, 10, 25, 50: the same timesteps, every step equal.

    Where diffusers is wrong: its DDIM and PNDM step from t to t − ⌊T/n⌋, not to the next timestep they visit. For
    "leading" and for "trailing" with n dividing T these coincide; for "linspace" they do not (n = 10 visits 999,
    888, … but steps 999 -> 899), so the UNet's next call gets a sample of another noise level than its t says.
    minisd steps to the next visited timestep. There, DDIM is compared with diffusers' own DDIMScheduler.step given
    the ᾱ pair of that move (ddim_between), and PLMS's timesteps only."""
    for n in (2, 10, 25, 50):
        ours, ref, ref_step = make_pair(sampler, "float64, f64 table", timestep_spacing=spacing)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        inconsistent = spacing == "linspace" and not sampler.startswith("DDPM")
        if inconsistent:
            visited = ref.timesteps.unique().flip(0)
            assert (visited[:-1] - visited[1:] != 1000 // n).any()  # diffusers' t − ⌊T/n⌋ misses the next t
            assert ours.timesteps.tolist() == ref.timesteps.tolist()
            if sampler.startswith("PLMS"):
                continue
            eta = float(sampler.split("=")[1])

            def ref_step(ref, eps, t, x, generator, eta=eta, visited=visited):
                return ddim_between(eps, t, visited, x, eta, generator)

        x = start(torch.float64)[1]
        path_ours, path_ref, g_ours, g_ref = run_side_by_side(ours, ref, ref_step, ref.timesteps, x, x.clone())
        assert torch.equal(g_ours.get_state(), g_ref.get_state())
        bar = 1e-9 if sampler == "DDPM" else 1e-12  # DDPM: diffusers' 1e-20 variance clamp adds 1e-10 · z
        assert_parity("test_alpha_samplers_every_spacing", f"{sampler} {spacing} n={n}", path_ours, path_ref, bar)


def ddim_between(eps, t, visited, x, eta, generator):
    """diffusers' DDIMScheduler.step for the move from t to the next visited timestep (or past the last, to ᾱ_0):
    a scheduler whose ᾱ table holds just that pair, stepped from index 1 to index 0 (⌊T/T⌋ = 1 back)."""
    from diffusers import DDIMScheduler

    from tests.test_samplers_alpha import ldm_alphas_cumprod

    table = ldm_alphas_cumprod()
    i = (visited == t).nonzero().item()
    alpha_bar_prev = table[visited[i + 1]] if i + 1 < len(visited) else table[0]
    pair = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    pair.set_timesteps(1000)
    pair.alphas_cumprod = torch.stack([alpha_bar_prev, table[t]])
    return pair.step(eps, torch.tensor(1), x, eta=eta, generator=generator).prev_sample


@pytest.mark.parametrize("schedule", ["Karras", "Exponential"])
@pytest.mark.parametrize("name", ["LMS", "Euler", "Heun", "DPM++ 2M", "DPM++ 2M SDE"])
def test_karras_and_exponential_match_diffusers(name, schedule):
    """Karras and Exponential σ for every σ sampler diffusers offers them for (its Euler ancestral has neither:
    see the k-diffusion tests below): the same σ, the same timesteps, every step equal. One difference: diffusers'
    DPM++ with exponential σ truncates the UNet's t (int64 cast of the fractional t) where minisd rounds, as
    diffusers itself does for Karras; there t differ by at most 1 and the steps are compared with minisd's t."""
    for n in (2, 10, 25, 50):
        ours = get_sampler(name, schedule_type=schedule)
        ref = diffusers_twin(name, **diffusers_options(schedule))
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        # σ from float64 (minisd) vs float32 (diffusers) tables: ~1e-6 relative; Heun's lists every call's σ
        sigmas = torch.cat([ours.call_sigmas, ours.sigmas[-1:]]) if name == "Heun" else ours.sigmas
        torch.testing.assert_close(sigmas.float(), ref.sigmas, rtol=2e-5, atol=0)
        truncates = name.startswith("DPM") and schedule == "Exponential"
        if truncates:
            assert (ours.timesteps - ref.timesteps).abs().max() <= 1 and (ours.timesteps != ref.timesteps).any()
        else:
            torch.testing.assert_close(ours.timesteps.float(), ref.timesteps.float(), rtol=0, atol=2e-3)
        ours.set_timesteps(n)
        traj_ours, traj_ref = step_side_by_side(
            name, ours, diffusers_twin(name, **diffusers_options(schedule)), n, torch.float32, same_t=truncates
        )
        bar = 5e-5 if "SDE" in name else 2e-5
        assert_parity("test_karras_and_exponential", f"{name} {schedule} n={n}", traj_ours, traj_ref, bar)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", ["LMS", "Euler", "Heun", "DPM++ 2M", "DPM++ 2M SDE"])
def test_karras_and_exponential_under_every_spacing_match_diffusers(name, spacing):
    """Karras and Exponential with a timestep_spacing, as a folder saved after
    `XScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)` holds it (PNDM's "leading"): diffusers'
    DPM++ spans the whole table whatever the spacing; its Euler, Heun and LMS span the σ of the spaced t. minisd
    does each (schedule_range): same σ, same t, every step equal, bars as the test above. SGM Uniform spaces its own
    t: refused with a spacing, in one line."""
    for schedule in ("Karras", "Exponential"):
        for n in (10, 25):
            ours = get_sampler(name, schedule_type=schedule, timestep_spacing=spacing)
            ref = diffusers_twin(name, timestep_spacing=spacing, **diffusers_options(schedule))
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            sigmas = torch.cat([ours.call_sigmas, ours.sigmas[-1:]]) if name == "Heun" else ours.sigmas
            torch.testing.assert_close(sigmas.float(), ref.sigmas, rtol=2e-5, atol=0)
            truncates = name.startswith("DPM") and schedule == "Exponential"  # diffusers truncates t there
            assert (ours.timesteps - ref.timesteps).abs().max() <= (1 if truncates else 2e-3)
            ours.set_timesteps(n)
            twin = diffusers_twin(name, timestep_spacing=spacing, **diffusers_options(schedule))
            traj_ours, traj_ref = step_side_by_side(name, ours, twin, n, torch.float32, same_t=truncates)
            bar = 5e-5 if "SDE" in name else 2e-5
            label = f"{name} {schedule} {spacing} n={n}"
            assert_parity("test_karras_and_exponential_under_every_spacing", label, traj_ours, traj_ref, bar)
    with pytest.raises(MinisdError, match="SGM Uniform spaces its own t"):
        get_sampler(name, schedule_type="SGM Uniform", timestep_spacing=spacing)


# ---------------------------------------------------------------------------------------------------------------
# 2. k-diffusion's schedules and sampling loops, re-derived (k_diffusion/sampling.py, k_diffusion/external.py,
#    A1111 modules/sd_schedulers.py), float64 throughout


def kd_append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def kd_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """DiscreteSchedule.sigma_to_t: interpolate t linearly in log σ between the neighbouring table entries."""
    log_sigmas, log_sigma = TABLE.log(), sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(TABLE) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


def kd_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """DiscreteSchedule.t_to_sigma: log σ interpolated linearly between floor(t) and ceil(t)."""
    t = t.double()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * TABLE.log()[low] + w * TABLE.log()[high]).exp()


def kd_get_sigmas(n: int) -> torch.Tensor:
    """DiscreteSchedule.get_sigmas(n): A1111's "Uniform" (and "Automatic" for Euler, LMS, Heun, Euler a)."""
    return kd_append_zero(kd_t_to_sigma(torch.linspace(len(TABLE) - 1, 0, n, dtype=torch.float64)))


def kd_karras(n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = TABLE[0] ** (1 / rho), TABLE[-1] ** (1 / rho)
    return kd_append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def kd_exponential(n: int) -> torch.Tensor:
    return kd_append_zero(torch.linspace(math.log(TABLE[-1]), math.log(TABLE[0]), n, dtype=torch.float64).exp())


def a1111_sgm_uniform(n: int) -> torch.Tensor:
    start, end = kd_sigma_to_t(TABLE[-1:]), kd_sigma_to_t(TABLE[:1])
    ts = torch.linspace(start.item(), end.item(), n + 1, dtype=torch.float64)[:-1]
    return kd_append_zero(torch.stack([kd_t_to_sigma(t) for t in ts]))


KD_SCHEDULES = {"Karras": kd_karras, "Exponential": kd_exponential, "SGM Uniform": a1111_sgm_uniform}


@pytest.mark.parametrize("schedule", list(KD_SCHEDULES))
def test_schedule_types_equal_k_diffusion(schedule):
    """Each schedule type's σ (and the final 0) equal the k-diffusion / A1111 function's, n = 1 … 1000 sampled; the
    σ samplers all take them (DPM++ too). Both float64 on the same table: only the ramp's arithmetic differs
    (torch.linspace vs numpy's), 1e-13 relative."""
    worst = 0.0
    for n in (1, 2, 3, 10, 20, 25, 50, 150, 1000):
        want = KD_SCHEDULES[schedule](n)
        for name in SIGMA_NAMES:
            sampler = get_sampler(name, schedule_type=schedule)
            sampler.set_timesteps(n)
            assert sampler.sigmas.shape == want.shape and sampler.sigmas[-1] == 0
            worst = max(worst, relative_error(sampler.sigmas, want))
    REPORT.append(("test_schedule_types_equal_k_diffusion", f"{schedule} σ vs k-diffusion", worst, 1e-13))
    assert worst <= 1e-13


def kd_denoiser(x: torch.Tensor, sigma: float, round_t: bool = False) -> torch.Tensor:
    """CompVisDenoiser with the stand-in UNet: D(x; σ) = x − σ·ε(x/√(σ² + 1), t(σ)), t fractional (A1111's
    quantize off) or rounded (what minisd's DPM++ shows the UNet); t as float32, the UNet's dtype."""
    t = kd_sigma_to_t(torch.tensor([sigma], dtype=torch.float64))
    t = (t.round() if round_t else t).float().item()
    return x - sigma * fake_eps(x / math.sqrt(sigma**2 + 1), t)


def kd_lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """k-diffusion's linear_multistep_coeff: ∫ of the Lagrange basis polynomial over [σ_i, σ_{i+1}], by quad."""

    def basis(tau):
        return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)

    return quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-13, epsabs=0)[0]


def kd_sample(name: str, x: torch.Tensor, sigmas: torch.Tensor, eta: float, noise, round_t: bool) -> torch.Tensor:
    """k-diffusion's sampling loop for `name` over `sigmas` (x in its σ-space: x = x_t · √(σ² + 1)); `noise()`
    returns the next standard normal draw (k-diffusion's noise_sampler / randn_like)."""
    s = sigmas.tolist()
    old_denoised, ds, h_last = None, [], None
    for i in range(len(s) - 1):
        denoised = kd_denoiser(x, s[i], round_t)
        d = (x - denoised) / s[i]  # to_d
        if name == "Euler":
            x = x + d * (s[i + 1] - s[i])
        elif name == "Euler a":  # get_ancestral_step
            sigma_up = min(s[i + 1], eta * (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5)
            sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
            x = x + d * (sigma_down - s[i])
            if s[i + 1] > 0:
                x = x + noise() * sigma_up
        elif name == "Heun":
            if s[i + 1] == 0:
                x = x + d * (s[i + 1] - s[i])
            else:
                x_2 = x + d * (s[i + 1] - s[i])
                d_2 = (x_2 - kd_denoiser(x_2, s[i + 1], round_t)) / s[i + 1]
                x = x + (d + d_2) / 2 * (s[i + 1] - s[i])
        elif name == "LMS":
            ds = [*ds, d][-4:]
            order = min(i + 1, 4)
            x = x + sum(kd_lms_coefficient(order, s, i, j) * d_j for j, d_j in enumerate(reversed(ds)))
        elif name == "DPM++ 2M":
            t, t_next = -math.log(s[i]), (-math.log(s[i + 1]) if s[i + 1] > 0 else math.inf)
            h = t_next - t
            if old_denoised is None or s[i + 1] == 0:
                x = (s[i + 1] / s[i]) * x - math.expm1(-h) * denoised
            else:
                r = (t - (-math.log(s[i - 1]))) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (s[i + 1] / s[i]) * x - math.expm1(-h) * denoised_d
        elif name == "DPM++ 2M SDE":  # solver_type "midpoint"
            if s[i + 1] == 0:
                x = denoised
            else:
                h = -math.log(s[i + 1]) + math.log(s[i])
                eta_h = eta * h
                x = s[i + 1] / s[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
                if old_denoised is not None:
                    x = x - 0.5 * math.expm1(-h - eta_h) * (1 / (h_last / h)) * (denoised - old_denoised)
                if eta:
                    x = x + noise() * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h if s[i + 1] > 0 else None
        old_denoised = denoised
    return x


def minisd_sample(sampler, sigmas: torch.Tensor, noise: torch.Tensor, generator) -> torch.Tensor:
    """minisd's loop over caller-given σ (set_timesteps(sigmas=...)), from `noise` at σ_max; returns x_0."""
    sampler.set_timesteps(sigmas=sigmas)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        eps = fake_eps(sampler.scale_model_input(x, t), float(t))
        x = sampler.step(eps, t, x, generator=generator)
    return x


def draws(seed: int, dtype: torch.dtype):
    """minisd's per-step noise as k-diffusion's noise(): Euler a draws in ε's dtype (float64 here), DPM++ 2M SDE in
    float32 (diffusers' rule for each), from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(SHAPE, generator=generator, dtype=dtype).double()


@pytest.mark.parametrize("schedule", list(KD_SCHEDULES))
@pytest.mark.parametrize("name", SIGMA_NAMES)
def test_samplers_step_equal_to_k_diffusion(name, schedule):
    """Every σ sampler on every schedule type equals k-diffusion's sampling loop on the same σ, float64: 1e-12 of the
    sample scale (LMS: 1e-9, k-diffusion integrates its coefficients with quad to ~1e-13). The reference starts
    where minisd does (DPM++: x_t = ε, i.e. x = √(σ_max² + 1)·ε) and its UNet sees minisd's t (DPM++: rounded);
    those two differences by design are measured in test_differences_dpm_start_and_integer_t."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n, eta in ((10, 1.0), (25, 1.0), (25, 0.5)):
        if eta != 1.0 and name not in ("Euler a", "DPM++ 2M SDE"):
            continue
        sigmas = KD_SCHEDULES[schedule](n)
        options = {"eta": eta} if name in ("Euler a", "DPM++ 2M SDE") else {}
        sampler = get_sampler(name, schedule_type=schedule, **options)
        ours = minisd_sample(sampler, sigmas, noise.clone(), torch.Generator().manual_seed(7))
        dpm = name.startswith("DPM")
        x_start = noise * (math.sqrt(sigmas[0] ** 2 + 1) if dpm else sigmas[0])
        noise_dtype = torch.float32 if "SDE" in name else torch.float64
        ref = kd_sample(name, x_start, sigmas, eta, draws(7, noise_dtype), round_t=dpm)
        bar = 1e-9 if name == "LMS" else 1e-12
        label = f"{name} {schedule} n={n} eta={eta} vs k-diffusion"
        assert_parity("test_samplers_step_equal_to_k_diffusion", label, ours, ref, bar)


# ---------------------------------------------------------------------------------------------------------------
# 3. The differences by design, measured


def test_differences_uniform_sigma_interpolation():
    """ "Uniform" visits the same t as A1111 (linspace(999, 0, n), for Euler, Euler a, LMS, Heun), but reads σ there
    as diffusers does, interpolating σ linearly between table entries; k-diffusion interpolates log σ. Equal at
    integer t, apart by up to 7.3e-5 relative between them (measured below, n = 10 … 50: largest at small t, where
    σ grows fastest from one table entry to the next)."""
    worst = 0.0
    for n in (10, 20, 25, 30, 50):
        sampler = get_sampler("Euler")
        sampler.set_timesteps(n)
        want = kd_get_sigmas(n)
        worst = max(worst, ((sampler.sigmas - want).abs() / want.clamp_min(1e-30)).max().item())
    REPORT.append(
        ("test_differences", "Uniform σ: linear (minisd, diffusers) vs log (A1111) interpolation", worst, 1e-4)
    )
    assert 1e-8 < worst < 1e-4


def test_differences_dpm_uniform_grid():
    """DPM++ 2M "Uniform" is diffusers' grid: n + 1 points of linspace(999, 0), the last (t = 0) dropped, so the last
    step jumps from σ(≈999/n) straight to 0. A1111's Uniform for DPM++ 2M is k-diffusion's get_sigmas(n): n points
    ending at σ_min = σ(0), then 0. Measured: the σ lists differ from the second step on; the final x_0 of the
    stand-in model differs by 1.6% of its scale (A1111 1.9+ uses Karras for DPM++ 2M unless told
    otherwise, where minisd and A1111 agree: test_samplers_step_equal_to_k_diffusion)."""
    n = 20
    sampler = get_sampler("DPM++ 2M")
    sampler.set_timesteps(n)
    a1111 = kd_get_sigmas(n)
    assert sampler.sigmas[0] == TABLE[-1] and abs(a1111[0] - TABLE[-1]) < 1e-12
    assert sampler.sigmas[-2] == TABLE[round(999 / n)] and a1111[-2] == TABLE[0]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = minisd_sample(get_sampler("DPM++ 2M"), sampler.sigmas, noise.clone(), None)
    ref = kd_sample("DPM++ 2M", noise * a1111[0], a1111, 1.0, None, round_t=False)
    err = relative_error(ours, ref)
    REPORT.append(("test_differences", "DPM++ 2M Uniform n=20: diffusers' grid vs A1111's (x_0)", err, 1.0))
    assert err > 1e-3


def test_differences_dpm_start_and_integer_t():
    """DPM++ in minisd (as in diffusers) starts from x_t = ε (std 1, VP form), which is x = √(σ_max² + 1)·ε in
    k-diffusion's terms; k-diffusion starts from x = σ_max·ε: 0.23% less noise (σ_max = 14.61). And it shows the
    UNet the rounded timestep; k-diffusion the fractional one. Each measured alone on DPM++ 2M Karras, n = 25."""
    sigmas = kd_karras(25)
    factor = math.sqrt(sigmas[0] ** 2 + 1) / sigmas[0]
    assert 1.002 < factor < 1.003
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    minisd_like = kd_sample("DPM++ 2M", noise * math.sqrt(sigmas[0] ** 2 + 1), sigmas, 1.0, None, round_t=True)
    a1111_start = kd_sample("DPM++ 2M", noise * sigmas[0], sigmas, 1.0, None, round_t=True)
    a1111_t = kd_sample("DPM++ 2M", noise * math.sqrt(sigmas[0] ** 2 + 1), sigmas, 1.0, None, round_t=False)
    start_err, t_err = relative_error(minisd_like, a1111_start), relative_error(minisd_like, a1111_t)
    REPORT.append(("test_differences", "DPM++ 2M Karras: VP start ε vs σ_max·ε (x_0)", start_err, 1e-2))
    REPORT.append(("test_differences", "DPM++ 2M Karras: integer vs fractional t (x_0)", t_err, 1e-1))
    assert 1e-5 < start_err < 1e-2 and 1e-5 < t_err < 1e-1


def a1111_brownian_noise(sigmas: torch.Tensor, seed: int):
    """A1111's noise for DPM++ 2M SDE (k-diffusion's BrownianTreeNoiseSampler, as A1111 builds it), re-derived: one
    Brownian motion W per picture, over σ ∈ [σ_min, σ_max] (the smallest σ > 0 and the first), W(σ_min) = 0, shaped
    like one latent (and of its dtype and device: float32 on the CPU here), drawn by torchsde's Brownian tree from
    entropy = the picture's seed. The step σ → σ' (σ' < σ) takes the increment (W(σ') − W(σ)) / √(σ − σ'): a
    standard normal, independent between steps, and a function of σ and σ' alone (not of the query order). Returns
    noise(σ, σ') -> (1, c, h, w). The tree is queried at σ rounded to float32, A1111's σ dtype. On the CPU: a GPU
    tree draws other numbers from the same seed."""
    sigmas = sigmas.float()
    sigma_min, sigma_max = sigmas[sigmas > 0].min().item(), sigmas.max().item()
    tree = torchsde.BrownianTree(sigma_min, torch.zeros(SHAPE[1:]), sigma_max, entropy=seed)

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next = torch.tensor([sigma, sigma_next]).tolist()  # float32 σ, as A1111's
        return ((tree(sigma_next, sigma) * -1) / math.sqrt(sigma - sigma_next)).unsqueeze(0)  # W(σ') − W(σ)

    return noise


# torchsde rounds the tree's ends to its tolerance (6 decimals) and clamps a query at σ_max onto the rounded end,
# with this warning: A1111's tree does the same
@pytest.mark.filterwarnings("ignore:Should have tb<=t1")
def test_differences_sde_noise_source(monkeypatch):
    """DPM++ 2M SDE's per-step noise: minisd draws it as diffusers does (torch.randn from the picture's generator,
    after the starting noise, one draw a step); A1111 takes k-diffusion's Brownian-tree increments seeded with the
    picture's seed (a1111_brownian_noise). Same start, same stand-in model, same σ (A1111's "Automatic" for this
    sampler, Exponential, n = 25, η = 1), the start and t as minisd's (their differences are measured above), so
    only the noise source differs. 1. The method is the same: minisd's own step(), fed the tree's increments in place
    of its draws, equals the k-diffusion loop on the tree to float rounding (2.7e-15). 2. The noise differs: the
    final x_0 are 0.24 apart in the mean (mean |Δ| / max |x_0|; 0.88 of mean |x_0|), 1.2 at the worst element: as
    far apart as minisd's own x_0 when only its per-step draws come from another seed (0.23, 0.98), i.e. another
    picture from the same starting noise."""
    seed, n = 0, 25
    sigmas = kd_exponential(n)
    generator = torch.Generator().manual_seed(seed)
    start_noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    sampler = get_sampler("DPM++ 2M SDE", schedule_type="Exponential")
    ours = minisd_sample(sampler, sigmas, start_noise.clone(), generator)  # the generator goes on into the steps

    def tree_noise():
        """k-diffusion's noise(): the increment of the step it is called in (no call on the last, σ' = 0)."""
        i = next(steps)
        return brownian(sigmas[i].item(), sigmas[i + 1].item()).double()

    brownian, steps = a1111_brownian_noise(sigmas, seed), iter(range(n))
    x_start = start_noise * math.sqrt(sigmas[0] ** 2 + 1)
    a1111 = kd_sample("DPM++ 2M SDE", x_start, sigmas, 1.0, tree_noise, round_t=True)

    # 1. minisd's step() with the tree's increments as its noise (its last draw, at σ' = 0, is not used)
    increments = [brownian(sigmas[i].item(), sigmas[i + 1].item()) for i in range(n - 1)] + [torch.zeros(SHAPE)]
    fed = iter(increments)
    monkeypatch.setattr("minisd.samplers.dpm_solver.randn", lambda shape, generator, dtype, device: next(fed))
    ours_on_tree = minisd_sample(get_sampler("DPM++ 2M SDE", schedule_type="Exponential"), sigmas, start_noise, None)
    assert next(fed, None) is None  # every increment was taken, one a step
    assert_parity("test_differences", "DPM++ 2M SDE fed the Brownian tree vs k-diffusion", ours_on_tree, a1111, 1e-12)
    monkeypatch.undo()

    # 2. the two noise sources: both standard normal, other numbers, another x_0
    tree_draws = torch.stack(increments[:-1])
    assert abs(tree_draws.mean().item()) < 0.05 and abs(tree_draws.std().item() - 1) < 0.05
    worst = relative_error(ours, a1111)
    mean = ((ours - a1111).abs().mean() / a1111.abs().max()).item()
    other_seed = minisd_sample(  # for scale: minisd itself with its per-step draws from another seed
        get_sampler("DPM++ 2M SDE", schedule_type="Exponential"), sigmas, start_noise, torch.Generator().manual_seed(1)
    )
    seed_mean = ((ours - other_seed).abs().mean() / a1111.abs().max()).item()
    REPORT.append(("test_differences", "DPM++ 2M SDE: per-step randn vs Brownian tree (x_0, max)", worst, 2.0))
    REPORT.append(("test_differences", "DPM++ 2M SDE: per-step randn vs Brownian tree (x_0, mean)", mean, 2.0))
    REPORT.append(("test_differences", "DPM++ 2M SDE: per-step randn, seed 0 vs 1 (x_0, mean)", seed_mean, 2.0))
    assert 0.05 < mean < 2.0 and 0.5 < mean / seed_mean < 2


def test_dpm_spacing_refusals():
    """DPM++ 2M's linspace and leading grids hold n + 1 points in [0, 999]: n = 1000 would repeat a timestep (h = 0,
    NaN in diffusers) and is refused in one line; trailing takes it."""
    for spacing in ("linspace", "leading"):
        with pytest.raises(MinisdError, match="num_inference_steps must be in"):
            get_sampler("DPM++ 2M", timestep_spacing=spacing).set_timesteps(1000)
    get_sampler("DPM++ 2M", timestep_spacing="trailing").set_timesteps(1000)
    ref = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, timestep_spacing="leading")
    ref.set_timesteps(999)
    ours = get_sampler("DPM++ 2M", timestep_spacing="leading")
    ours.set_timesteps(999)
    assert ref.timesteps[0] == 1000 and ours.timesteps[0] == 999  # diffusers shows t = 1000, past the table
