"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE written for the data prediction x_0
(Lu et al. 2022, arXiv:2211.01095, Alg. 2; k-diffusion `sample_dpmpp_2m`; A1111 "DPM++ 2M", with Schedule type
Karras its 1.5-era "DPM++ 2M Karras"); with sde=True the same multistep form for the reverse SDE ("DPM++ 2M SDE",
diffusers' algorithm_type "sde-dpmsolver++"), which forgets part of x_t each step and draws fresh noise for it.

Unlike the other σ samplers it moves x_t itself (diffusers does the same): x_t = α_t·x_0 + σ_t·ε, so the UNet
input needs no scaling and pure noise starts at std 1. The σ of the other samplers is σ_t / α_t = e^(−λ).

code          paper (Lu et al. 2022)                        diffusers (DPMSolverMultistepScheduler)
sigma         σ_t / α_t = e^(−λ_t) (k-diffusion's σ)        sigmas[step_index]
alpha_t       α_t = 1/√(σ² + 1) = √ᾱ                        alpha_t
sigma_t       σ_t = σ·α_t = √(1 − ᾱ)                        sigma_t
lambda_       λ_t = log(α_t / σ_t) = −log σ (half-log-SNR)  lambda_t
h             h_i = λ_{t_i} − λ_{t_{i−1}}                   h
r             r_i = h_{i−1} / h_i                           r0
x0_pred       x_θ(x̃_t, t) = (x_t − σ_t·ε) / α_t           model_output after convert_model_output
              (from v: α_t·x_t − σ_t·v)
x0_prev       x_θ at the previous step                      model_outputs[-2]
z             z ~ N(0, I), fresh each step (SDE only)       noise
eta           η: how much of x_t the SDE forgets (k-diffusion) (diffusers: always 1)
"""

import math
from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from minisd.errors import MinisdError
from minisd.noise import randn
from minisd.samplers.base import check_eta, upcast
from minisd.samplers.schedule import NUM_TRAIN_TIMESTEPS, spaced_timesteps
from minisd.samplers.sigmas import SigmaSampler, linspace_exact, t_at


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of the noise level σ: α_t = 1/√(σ² + 1), σ_t = σ·α_t (α_t² + σ_t² = 1).

    >>> vp_coefficients(0.0)
    (1.0, 0.0)
    """
    alpha_t = 1 / math.sqrt(sigma**2 + 1)
    return alpha_t, sigma * alpha_t


def data_prediction(x_t: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """x_θ = (x_t − σ_t·ε) / α_t: the data prediction from ε (Lu et al. 2022's x_θ; diffusers'
    `convert_model_output`), DPM++'s x̂_0. Unlike the other σ samplers' D(x; σ) = x − σ·ε, x_t here is the VP
    latent √ᾱ·x_0 + √(1 − ᾱ)·ε itself, not x_t / √ᾱ. x_t, eps: (b, c, h, w); sigma: σ = σ_t / α_t.

    >>> data_prediction(torch.tensor([1.0]), torch.tensor([1.0]), 1.0)  # α_t = σ_t = 1/√2: (1 − 1/√2)·√2
    tensor([0.4142])
    """
    alpha_t, sigma_t = vp_coefficients(sigma)
    return (x_t - sigma_t * eps) / alpha_t


def data_prediction_from_v(x_t: Tensor, v: Tensor, sigma: float) -> Tensor:
    """x_θ = α_t·x_t − σ_t·v: the data prediction of a v-prediction model (base.x0_from_v with √ᾱ = α_t,
    √(1 − ᾱ) = σ_t; diffusers' `convert_model_output` for "v_prediction"). x_t, v: (b, c, h, w).

    >>> data_prediction_from_v(torch.tensor([1.0]), torch.tensor([1.0]), 1.0)  # α_t = σ_t = 1/√2: 0
    tensor([0.])
    """
    alpha_t, sigma_t = vp_coefficients(sigma)
    return alpha_t * x_t - sigma_t * v


def dpmpp_2m_step(
    x: Tensor,
    x0_pred: Tensor,
    x0_prev: Tensor | None,
    sigma: float,
    sigma_next: float,
    sigma_prev: float | None,
    noise: Tensor | None = None,
    eta: float = 1.0,
) -> Tensor:
    """One DPM-Solver++ step from σ to σ_next in x_t space: first order (= DDIM) without a previous x_0 prediction,
    else the 2M update (Alg. 2). σ_next = 0 returns x0_pred itself (the update with e^(−h) = 0).

    With `noise` (z ~ N(0, I)), the step of the reverse SDE instead (Lu et al. 2022, App. B; diffusers'
    "sde-dpmsolver++", midpoint solver; k-diffusion `sample_dpmpp_2m_sde` written in x_t), with the same D_i:

        ODE:  x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x̃_{t_{i−1}} + α_{t_i}·(1 − e^(−h))·D_i
        SDE:  x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·e^(−ηh)·x̃_{t_{i−1}} + α_{t_i}·(1 − e^(−(1+η)h))·D_i
                        + σ_{t_i}·√(1 − e^(−2ηh))·z

    The SDE keeps e^(−ηh) less of x_t and adds back, as fresh noise, exactly the variance it removed; η = 1 is
    diffusers' (and A1111's default), η = 0 the ODE step."""
    if sigma_next == 0:
        return x0_pred
    alpha_next, sigma_t_next = vp_coefficients(sigma_next)
    _, sigma_t = vp_coefficients(sigma)
    h = math.log(sigma / sigma_next)  # λ_{t_i} − λ_{t_{i−1}}, λ = −log σ
    if x0_prev is None:
        D = x0_pred  # first order (Alg. 2's first step; = DDIM)
    else:
        r = math.log(sigma_prev / sigma) / h  # r_i = h_{i−1} / h_i
        D = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_prev  # Alg. 2: D_i
    if noise is None:
        return (sigma_t_next / sigma_t) * x - (alpha_next * math.expm1(-h)) * D  # Alg. 2: x̃_{t_i}
    kept = (sigma_t_next / sigma_t) * math.exp(-eta * h)
    x_next = kept * x - (alpha_next * math.expm1(-(1 + eta) * h)) * D
    return x_next + sigma_t_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise


def dpm_timesteps(num_inference_steps: int, spacing: str, steps_offset: int = 1) -> Tensor:
    """The "Uniform" grid of DPMSolverMultistepScheduler, int64 (n,), decreasing. diffusers spaces n + 1 points
    and drops the last (the end at t = 0: σ goes from there straight to 0):
      "linspace"  round(linspace(0, T − 1, n + 1)), reversed, without the final 0
      "leading"   i·⌊T/(n + 1)⌋ + steps_offset for i = n … 1 (the offset lowered where t would pass T − 1, as
                  schedule.spaced_timesteps does; diffusers shows the UNet t = 1000 there)
      "trailing"  schedule.spaced_timesteps(n, "trailing"), the other samplers' grid
    n = T would repeat a timestep (h = 0, a division by zero; diffusers returns NaN): refused.

    >>> dpm_timesteps(4, "linspace").tolist(), dpm_timesteps(4, "leading").tolist()
    ([999, 749, 500, 250], [801, 601, 401, 201])
    """
    n, T = num_inference_steps, NUM_TRAIN_TIMESTEPS
    if spacing == "trailing":
        return spaced_timesteps(n, spacing)
    if n >= T:
        raise MinisdError(f"num_inference_steps must be in [1, {T - 1}] for DPM++ 2M's {spacing} spacing, got {n}")
    if spacing == "linspace":
        return linspace_exact(T - 1, n + 1).round().flip(0)[:-1].long()
    step_ratio = T // (n + 1)
    offset = min(steps_offset, T - 1 - n * step_ratio)
    return torch.arange(n, 0, -1, dtype=torch.int64) * step_ratio + offset


class DPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M); step-equal to diffusers' DPMSolverMultistepScheduler with SD v1.5's scheduler config
    (algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final, final σ 0) and the
    same timestep_spacing or Karras σ: the first step of every run is first order, the last (to σ = 0) returns the
    x_0 prediction.

    Timesteps are integers, as diffusers shows this UNet: the "Uniform" grids of dpm_timesteps, or the rounded t of
    each σ of the other schedule types; near σ_min several Karras σ round to the same t (from n = 50), so
    `timesteps` may repeat there, exactly as in diffusers. (diffusers' Exponential truncates t where minisd rounds.)

    sde=True is diffusers' algorithm_type "sde-dpmsolver++": every step draws one float32 standard normal tensor
    shaped like the model output from `generator` (diffusers' randn_tensor), so the same generator gives diffusers'
    picture.
    A1111's "DPM++ 2M SDE" takes its noise from k-diffusion's Brownian tree instead: same method, other pictures
    (tests/test_schedule_types.py::test_differences_sde_noise_source measures both).
    eta (SDE only, in [0, 1]): k-diffusion's η, A1111's "Eta"; 1 is diffusers' (which has no other).
    """

    name = "DPM++ 2M"  # "DPM++ 2M SDE" with sde
    timestep_dtype = torch.int64

    def __init__(
        self,
        schedule_type: str = "Uniform",
        timestep_spacing: str = "linspace",
        sde: bool = False,
        eta: float = 1.0,
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            schedule_type,
            timestep_spacing,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        if eta != 1.0 and not sde:
            raise MinisdError(f"eta applies to DPM++ 2M SDE (the ODE step draws no noise), got eta={eta!r}")
        self.sde = sde
        self.eta = check_eta(eta)
        self.name = "DPM++ 2M SDE" if sde else "DPM++ 2M"

    def uniform_timesteps(self, num_inference_steps: int) -> Tensor:
        return dpm_timesteps(num_inference_steps, self.timestep_spacing)

    def schedule_range(self, num_inference_steps: int) -> Tensor:
        """The whole table, whatever the spacing: diffusers' DPM++ spaces Karras and exponential σ over it (a folder
        saved with use_karras_sigmas keeps PNDM's "leading", which changes nothing there)."""
        return self.sigma_table

    def timesteps_for(self, sigmas: Tensor) -> Tensor:
        """The integer timestep nearest (in log σ) to each σ, as diffusers rounds for DPM++."""
        return t_at(sigmas, self.sigma_table).round().long()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().set_timesteps(num_inference_steps, strength, timesteps=timesteps, sigmas=sigmas)
        self.init_noise_sigma = 1.0  # x_t space: pure noise x_T ≈ ε has std 1

    def reset(self) -> None:
        self.x0_prev = None  # the previous step's x_0 prediction (2M's one stored value)

    def scale_model_input(self, x: Tensor, t: Tensor | int) -> Tensor:
        """x_t is already what the UNet wants."""
        self.call_sigma(t)
        return x

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = α_t·x_0 + σ_t·ε at timestep t of this run (DDPM eq. 4 in x_t space)."""
        sigma = self.sigma_of(t).reshape(-1, *([1] * (x0.ndim - 1)))
        alpha_t = 1 / (sigma**2 + 1).sqrt()
        alpha_t, sigma_t = alpha_t.to(device=x0.device, dtype=x0.dtype), (sigma * alpha_t).to(x0.device, x0.dtype)
        return alpha_t * x0 + sigma_t * noise

    def data_prediction(self, model_output: Tensor, x_t: Tensor, sigma: float) -> Tensor:
        """x_θ from the model's output at x_t: data_prediction (ε) or data_prediction_from_v, by prediction_type."""
        if self.prediction_type == "v_prediction":
            return data_prediction_from_v(x_t, model_output, sigma)
        return data_prediction(x_t, model_output, sigma)

    def x0_pred(self, model_output: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """x̂_0 = x_θ (data_prediction: (x_t − σ_t·ε) / α_t, or α_t·x_t − σ_t·v), x being x_t, σ this call's."""
        return self.data_prediction(upcast(model_output), upcast(x), self.call_sigma(t)).to(x.dtype)

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x_t at step i -> x_t at step i + 1. model_output, x: (b, c, h, w); returns x's dtype (computed in >=
        float32)."""
        i = self.advance(t)
        sigma = self.sigmas[i].item()
        x_t = upcast(x)
        x0_pred = self.data_prediction(upcast(model_output), x_t, sigma)  # the data prediction x_θ
        sigma_prev = self.sigmas[i - 1].item() if i > 0 else None
        sigma_next = self.sigmas[i + 1].item()
        noise = None
        if self.sde:  # every step draws, the last (σ_next = 0, no noise added) included, as diffusers does
            noise = randn(model_output.shape, generator, torch.float32, model_output.device).to(x_t.dtype)
        x_next = dpmpp_2m_step(x_t, x0_pred, self.x0_prev, sigma, sigma_next, sigma_prev, noise, self.eta)
        self.x0_prev = x0_pred
        return x_next.to(x.dtype)
