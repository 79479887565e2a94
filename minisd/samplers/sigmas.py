"""The σ view of SD's noise schedule, shared by the k-diffusion-style samplers (LMS, Euler, Euler a, Heun, DPM++).

code            paper / k-diffusion                              diffusers
sigma_table     σ_t for t = 0 … T−1, increasing                  ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
sigma           σ: the noise level of x = x_t / √ᾱ_t             sigmas[step_index]
sigmas          the σ a run visits, decreasing, ending at 0      sigmas
x               x = x_0 + σ·ε (Karras et al. 2022 §2)            sample
eps             ε_θ(x / √(σ² + 1), t)                            model_output
v               v_θ(x / √(σ² + 1), t), v-prediction models       model_output
denoised        D(x; σ) = x − σ·ε, the x_0 prediction            pred_original_sample
                (from v: x/(σ² + 1) − σ·v/√(σ² + 1))
d               slope(): dx/dσ = (x − D(x; σ)) / σ (Karras Alg. 1) derivative

SD's UNet was trained on x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε. Dividing by √ᾱ_t gives x = x_0 + σ_t·ε with
σ_t = √((1 − ᾱ_t)/ᾱ_t): the "variance exploding" form in which Karras et al. (arXiv:2206.00364) write every
sampler as an ODE in σ. The UNet still wants x_t, so it is fed x / √(σ² + 1) (= x_t, because √ᾱ_t = 1/√(σ² + 1)).
The samplers below step in σ; a run's σ list ends at 0, the clean image. Every method moves along D(x; σ), read
off the model's output by `SigmaSampler.denoised` (denoised_from_eps or denoised_from_v).

Which σ a run visits is its schedule type (A1111's "Schedule type", k-diffusion's σ schedules), chosen apart from
the sampler, as A1111 1.9+ does:
    "Uniform"       t spaced by `timestep_spacing` (diffusers' linspace / leading / trailing), σ read off the table
                    at those t: each sampler's diffusers schedule, and minisd's default
    "Karras"        σ evenly spaced in σ^(1/7) from σ_max to σ_min (karras_sigmas; k-diffusion get_sigmas_karras)
    "Exponential"   σ evenly spaced in log σ (exponential_sigmas; k-diffusion get_sigmas_exponential)
    "SGM Uniform"   t = linspace(T − 1, 0, n + 1) without its last point, σ interpolated in log σ there
                    (sgm_uniform_sigmas; A1111's sgm_uniform)
Under zero terminal SNR (v-prediction models) the table's σ_max is ≈ 4096 (sd_sigma_table): Karras, Exponential
and SGM Uniform start there, as does Uniform unless its spacing is "leading".
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from minisd.errors import MinisdError
from minisd.samplers.base import Sampler, img2img_start, upcast
from minisd.samplers.schedule import (
    NUM_TRAIN_TIMESTEPS,
    SPACINGS,
    check_num_inference_steps,
    check_timesteps,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    training_alphas_cumprod,
)

SCHEDULE_TYPES = ("Uniform", "Karras", "Exponential", "SGM Uniform")  # A1111's "Schedule type" labels
SMALLEST_ALPHA_BAR = 2.0**-24  # ᾱ_T under zero terminal SNR: float16's smallest subnormal, as diffusers sets it


def sd_sigma_table(rescale_betas_zero_snr: bool = False) -> Tensor:
    """σ_t of SD's training schedule for t = 0 … 999, float64, increasing (0.0292 … 14.61).

    With zero terminal SNR, ᾱ_T = 0 would make σ_T infinite; like diffusers' σ schedulers, ᾱ_T is set to 2⁻²⁴
    instead, so the run starts at σ_T = √((1 − 2⁻²⁴)/2⁻²⁴) ≈ 4096: noise 4096 times the image, pure noise in
    practice (the UNet sees x / √(σ² + 1)).
    """
    alphas_cumprod = training_alphas_cumprod(rescale_betas_zero_snr)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = SMALLEST_ALPHA_BAR
    return sigmas_from_alphas_cumprod(alphas_cumprod)


def linspace_exact(stop: float, num: int) -> Tensor:
    """num points i · (stop / (num − 1)) from 0 to stop, float64, increasing.

    numpy.linspace's own arithmetic (one division, then multiplies; the last point set to `stop`), so that a
    later rounding breaks ties exactly as diffusers' does (torch.linspace differs in the last bit for some num).

    >>> linspace_exact(999, 3).tolist()
    [0.0, 499.5, 999.0]
    """
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    points = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))
    points[-1] = stop
    return points


def sigma_at(t: Tensor, sigma_table: Tensor) -> Tensor:
    """σ at fractional timesteps t ∈ [0, T−1]: linear interpolation between the table's neighbours (as
    numpy.interp, which diffusers uses). t: any shape; returns float64 of t's shape.

    >>> table = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> sigma_at(torch.tensor([0.0, 0.5, 1.5, 2.0]), table).tolist()
    [1.0, 1.5, 3.0, 4.0]
    """
    t = t.double()
    low = t.floor().long().clamp(0, len(sigma_table) - 2)
    w = t - low  # in [0, 1]: how far past the lower neighbour
    return (1 - w) * sigma_table[low] + w * sigma_table[low + 1]


def log_sigma_at(t: Tensor, sigma_table: Tensor) -> Tensor:
    """σ at fractional timesteps t ∈ [0, T−1] by linear interpolation of log σ (k-diffusion's `t_to_sigma`, which
    A1111's "Uniform" and "SGM Uniform" schedules read σ with); sigma_at interpolates σ itself, as diffusers does.
    They agree at integer t. t: any shape; returns float64 of t's shape.

    >>> table = torch.tensor([1.0, 4.0], dtype=torch.float64)
    >>> log_sigma_at(torch.tensor([0.0, 0.5, 1.0]), table).tolist()  # √(1·4) halfway, where sigma_at gives 2.5
    [1.0, 2.0, 4.0]
    """
    t = t.double()
    low = t.floor().long().clamp(0, len(sigma_table) - 2)
    w = t - low
    log_table = sigma_table.log()
    return ((1 - w) * log_table[low] + w * log_table[low + 1]).exp()


def t_at(sigma: Tensor, sigma_table: Tensor) -> Tensor:
    """The fractional timestep whose σ is `sigma`: linear interpolation in log σ, clipped to [0, T−1]
    (k-diffusion `sigma_to_t`; diffusers `_sigma_to_t`). The inverse of `sigma_at` up to that log. float64.

    >>> table = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> [round(t, 6) for t in t_at(torch.tensor([1.0, 2.0**0.5, 2.0, 8.0]), table).tolist()]
    [0.0, 0.5, 1.0, 2.0]
    """
    log_table = sigma_table.log()
    log_sigma = sigma.double().clamp_min(1e-10).log()
    # the last table entry at or below log σ (kept one short of the end so low + 1 exists)
    low = (log_sigma[None, :] >= log_table[:, None]).sum(0).sub(1).clamp(0, len(log_table) - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return low + w


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """n noise levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5, ρ = 7):
    σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ. Dense near σ_min, where detail is made.

    >>> [round(s, 4) for s in karras_sigmas(0.1, 10.0, 3).tolist()]
    [10.0, 1.4507, 0.1]
    """
    ramp = linspace_exact(1.0, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # eq. 5


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """n noise levels from σ_max down to σ_min, evenly spaced in log σ (k-diffusion `get_sigmas_exponential`;
    A1111's "Exponential"): a constant ratio between neighbours. float64 (n,).

    >>> [round(s, 6) for s in exponential_sigmas(0.1, 10.0, 3).tolist()]
    [10.0, 1.0, 0.1]
    """
    ramp = linspace_exact(1.0, n)
    log_max, log_min = math.log(sigma_max), math.log(sigma_min)
    return (log_max + ramp * (log_min - log_max)).exp()


def sgm_uniform_sigmas(sigma_table: Tensor, n: int) -> Tensor:
    """A1111's "SGM Uniform" (Stability's sgm code): t = linspace(T − 1, 0, n + 1) without its last point (t = 0),
    σ read off the table in log σ (log_sigma_at). Evenly spaced in t like "Uniform", but every step one n-th of
    the way, the last ending above t = 0. float64 (n,).

    >>> [round(s, 4) for s in sgm_uniform_sigmas(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), 2).tolist()]
    [4.0, 2.0]
    """
    t = linspace_exact(len(sigma_table) - 1, n + 1).flip(0)[:-1]
    return log_sigma_at(t, sigma_table)


def schedule_sigmas(schedule_type: str, sigma_table: Tensor, n: int) -> Tensor:
    """The n σ of a "Karras", "Exponential" or "SGM Uniform" schedule over the table's range [σ_min, σ_max] (the
    model's, as k-diffusion and A1111 take it), decreasing, float64 (n,)."""
    sigma_min, sigma_max = sigma_table[0].item(), sigma_table[-1].item()
    if schedule_type == "Karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if schedule_type == "Exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    assert schedule_type == "SGM Uniform", schedule_type
    return sgm_uniform_sigmas(sigma_table, n)


def check_schedule(schedule_type: str, timestep_spacing: str) -> str:
    """A σ sampler's schedule settings, checked: a schedule type of SCHEDULE_TYPES, a spacing of SPACINGS, and a
    spacing other than "linspace" not with "SGM Uniform" (which spaces its own t). Returns schedule_type."""
    if schedule_type not in SCHEDULE_TYPES:
        raise MinisdError(f"schedule_type must be one of {', '.join(SCHEDULE_TYPES)}, got {schedule_type!r}")
    if timestep_spacing not in SPACINGS:
        raise MinisdError(f"timestep_spacing must be one of {', '.join(SPACINGS)}, got {timestep_spacing!r}")
    if schedule_type == "SGM Uniform" and timestep_spacing != "linspace":
        raise MinisdError(
            f"timestep_spacing {timestep_spacing!r} applies to Uniform, Karras and Exponential; SGM Uniform spaces "
            "its own t"
        )
    return schedule_type


def check_sigmas(sigmas: Tensor | list[float]) -> Tensor:
    """Validate caller-given σ: n + 1 >= 2 finite values, strictly decreasing, the last 0. Returns float64."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise MinisdError(f"sigmas must be a list of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise MinisdError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise MinisdError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if sigmas[-1] != 0:
        raise MinisdError(f"sigmas must end at 0 (the clean image), got last {sigmas[-1].item()}")
    return sigmas


def denoised_from_eps(x: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """D(x; σ) = x − σ·ε: the denoiser of an ε-predicting model (Karras et al. 2022 eq. 7 with c_skip = 1,
    c_out = −σ), the σ samplers' x̂_0. x, eps: (b, c, h, w).

    >>> denoised_from_eps(torch.tensor([3.0]), torch.tensor([1.0]), 2.0)
    tensor([1.])
    """
    return x - sigma * eps


def denoised_from_v(x: Tensor, v: Tensor, sigma: float) -> Tensor:
    """D(x; σ) = x/(σ² + 1) − σ·v/√(σ² + 1): the denoiser of a v-prediction model (Karras et al. 2022 eq. 7 with
    c_skip = 1/(σ² + 1), c_out = −σ/√(σ² + 1)): base.x0_from_v with x_t = x/√(σ² + 1) and √ᾱ = 1/√(σ² + 1),
    √(1 − ᾱ) = σ/√(σ² + 1). Needs no division by σ's inverse, so it holds at zero SNR's σ_T ≈ 4096. x, v: (b, c, h, w).

    >>> denoised_from_v(torch.tensor([2.0]), torch.tensor([1.0]), 1.0)  # 2/2 − 1/√2
    tensor([0.2929])
    """
    return v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)  # diffusers' order of the same terms


def slope(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx/dσ = (x − D(x; σ)) / σ: the probability-flow ODE's slope in σ (Karras et al. 2022, Alg. 1 line 4 with
    σ(t) = t; k-diffusion's `to_d`). x, denoised: (b, c, h, w).

    >>> slope(torch.tensor([3.0]), 2.0, torch.tensor([1.0]))
    tensor([1.])
    """
    return (x - denoised) / sigma


class SigmaSampler(Sampler):
    """What the σ samplers share: the schedule (timesteps, σ), image-to-image truncation, the UNet input scaling,
    add_noise, D(x; σ) from the model's output, and x̂_0. Subclasses write `step` (and Heun `calls_for`).

    After `set_timesteps`: `sigmas` (m + 1,) float64, the σ of the m method steps this run makes, then 0;
    `timesteps` one float32 entry per model call (what the UNet is given); `call_sigmas` the σ of x at each call;
    `step_index` the next call's index (base.Sampler).

    schedule_type: one of SCHEDULE_TYPES (see the module docstring); the UNet is shown the fractional t of each σ
    (t_at: log-σ interpolation, as k-diffusion and diffusers do). timestep_spacing places Uniform's t (and, as in
    diffusers, the ends of Karras and Exponential σ: schedule_range):
      "linspace" (the default: diffusers' default for these schedulers; SD v1.5's scheduler_config sets none)
                 t = linspace(T − 1, 0, n), kept fractional, σ interpolated there. n = 1 runs from t = T − 1 (pure
                 noise); diffusers' linspace(0, T − 1, 1) = [0] makes its one step start at σ_min = 0.029.
      "leading"  t = i·⌊T/n⌋ + 1 (SD v1's DDIM/PLMS grid: 50 steps visit 981 … 1; what
                 `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` inherits from SD v1.5's PNDM config)
      "trailing" t = round(T − i·T/n) − 1 (999 first)
    as schedule.spaced_timesteps computes them, each equal to diffusers' for that spacing.
    """

    timestep_dtype = torch.float32  # fractional t: what diffusers gives these UNet calls

    def __init__(
        self,
        schedule_type: str = "Uniform",
        timestep_spacing: str = "linspace",
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self.schedule_type = check_schedule(schedule_type, timestep_spacing)
        self.timestep_spacing = timestep_spacing
        self.set_prediction(prediction_type, rescale_betas_zero_snr)
        self.sigma_table = sd_sigma_table(rescale_betas_zero_snr)

    def schedule(self, num_inference_steps: int) -> tuple[Tensor, Tensor]:
        """The full run's (timesteps (n,), sigmas (n,) float64), before truncation and the final 0."""
        if self.schedule_type != "Uniform":
            sigmas = schedule_sigmas(self.schedule_type, self.schedule_range(num_inference_steps), num_inference_steps)
            return self.timesteps_for(sigmas), sigmas
        timesteps = self.uniform_timesteps(num_inference_steps).to(self.timestep_dtype)
        return timesteps, sigma_at(timesteps, self.sigma_table)  # σ of exactly the t the UNet sees

    def schedule_range(self, num_inference_steps: int) -> Tensor:
        """The σ that Karras and Exponential span, as a table whose [0] is σ_min and [-1] σ_max: the model's whole
        table with "linspace" (k-diffusion's, A1111's); with "leading" or "trailing", the σ of the spaced t, as
        diffusers' Euler, Heun and LMS take it (use_karras_sigmas reshapes the σ read at the spaced t)."""
        if self.timestep_spacing == "linspace":
            return self.sigma_table
        return sigma_at(self.uniform_timesteps(num_inference_steps), self.sigma_table).flip(0)  # increasing

    def uniform_timesteps(self, num_inference_steps: int) -> Tensor:
        """The "Uniform" schedule's t (n,), decreasing: the spacing's grid (see the class docstring)."""
        if self.timestep_spacing != "linspace":
            return spaced_timesteps(num_inference_steps, self.timestep_spacing).double()
        timesteps = linspace_exact(NUM_TRAIN_TIMESTEPS - 1, num_inference_steps).flip(0)
        if num_inference_steps == 1:  # diffusers: linspace(0, T−1, 1) = [0], one step from σ_min; start at T−1
            timesteps[0] = NUM_TRAIN_TIMESTEPS - 1
        return timesteps

    def timesteps_for(self, sigmas: Tensor) -> Tensor:
        """The timesteps the UNet is shown for caller-given σ: the fractional t of each (log-σ interpolation)."""
        return t_at(sigmas, self.sigma_table).float()

    def calls_for(self, timesteps: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
        """(timesteps, σ of x) per model call. One call per step here; Heun overrides."""
        return timesteps, sigmas[:-1]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
    ) -> None:
        """Plan a run of n steps; strength < 1 keeps only the last steps (image-to-image, base.img2img_start).

        Instead of n, the caller may give `timesteps` (decreasing integers; σ is read off the table there) or
        `sigmas` (n + 1 noise levels, strictly decreasing, ending at 0, e.g. `karras_sigmas(...)` plus 0; the
        UNet is shown the fractional t of each σ).
        """
        if (num_inference_steps is not None) + (timesteps is not None) + (sigmas is not None) != 1:
            given = [name for name, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
            raise MinisdError(
                f"set_timesteps needs exactly one of num_inference_steps, timesteps, sigmas; got "
                f"num_inference_steps={num_inference_steps!r} and {' and '.join(given) or 'nothing else'}"
            )
        if sigmas is not None:
            sigmas = check_sigmas(sigmas)
            timesteps = self.timesteps_for(sigmas[:-1])
        else:
            if timesteps is not None:
                timesteps = check_timesteps(timesteps).to(self.timestep_dtype)
                sigmas = sigma_at(timesteps, self.sigma_table)
            else:
                check_num_inference_steps(num_inference_steps)
                timesteps, sigmas = self.schedule(num_inference_steps)
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # the run ends at σ = 0, the clean image
        start = img2img_start(len(timesteps), strength)
        self.sigmas = sigmas[start:]
        call_timesteps, self.call_sigmas = self.calls_for(timesteps[start:], self.sigmas)
        self.start_run(call_timesteps)
        # the std of the first x: σ_max (the run's first σ), or with "leading" spacing, as diffusers does there,
        # √(σ_max² + 1): the std of x = x_0 + σ·ε for unit-variance x_0 (a leading run starts below t = T − 1)
        sigma_max = self.sigmas[0].item()
        self.init_noise_sigma = math.sqrt(sigma_max**2 + 1) if self.timestep_spacing == "leading" else sigma_max
        self.reset()

    def reset(self) -> None:
        """Forget the history of multistep methods: each run starts at its own first step."""

    def call_sigma(self, t: Tensor | float) -> float:
        """σ of x at the current model call, after checking t is the timestep this call expects."""
        return self.call_sigmas[self.call_index(t)].item()

    def scale_model_input(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The UNet's input x_t = x / √(σ² + 1) (Karras Table 1, VP: c_in = 1/√(σ² + 1))."""
        return x / math.sqrt(self.call_sigma(t) ** 2 + 1)

    def denoised(self, model_output: Tensor, x: Tensor, sigma: float) -> Tensor:
        """D(x; σ) from the model's output at x: denoised_from_eps or denoised_from_v, by prediction_type."""
        if self.prediction_type == "v_prediction":
            return denoised_from_v(x, model_output, sigma)
        return denoised_from_eps(x, model_output, sigma)

    def x0_pred(self, model_output: Tensor, t: Tensor | float, x: Tensor) -> Tensor:
        """x̂_0 = D(x; σ) (denoised), σ being this call's."""
        return self.denoised(upcast(model_output), upcast(x), self.call_sigma(t)).to(x.dtype)

    def sigma_of(self, t: Tensor | float) -> Tensor:
        """σ of each timestep in t (the first place it appears in this run's `timesteps`), float64, shape (b,)."""
        t = torch.as_tensor(t).reshape(-1).cpu().float()
        matches = t[:, None] == self.timesteps[None, :]
        if not matches.any(1).all():
            raise MinisdError(f"t must be among sampler.timesteps, got {t.tolist()}")
        return self.call_sigmas[matches.int().argmax(1)]

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x = x_0 + σ_t · ε (Karras §2): clean latents noised to timestep t of this run. x0, noise: (b, c, h, w)."""
        sigma = self.sigma_of(t).reshape(-1, *([1] * (x0.ndim - 1)))
        return x0 + noise * sigma.to(device=x0.device, dtype=x0.dtype)
