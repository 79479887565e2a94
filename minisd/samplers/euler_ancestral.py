"""Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up back up to σ_{i+1}
(k-diffusion `sample_euler_ancestral`; A1111 "Euler a", whose "Eta" is η here). Each step forgets part of the noise and
draws new noise, as DDPM's ancestral sampling does, so the result keeps changing with the step count.

code          paper / k-diffusion                        diffusers (EulerAncestralDiscreteScheduler)
sigma         σ_i                                        sigma_from
sigma_next    σ_{i+1}                                    sigma_to
sigma_up      σ_up: std of the noise added               sigma_up
sigma_down    σ_down = √(σ_{i+1}² − σ_up²)               sigma_down
eta           η: 1 = DDPM's posterior noise, 0 = Euler    (diffusers: always 1)
denoised      D(x_i; σ_i) = x_i − σ_i·ε                  pred_original_sample
d             (x_i − D) / σ_i                            derivative
"""

import math

from torch import Generator, Tensor

from minisd.noise import randn
from minisd.samplers.base import check_eta, upcast
from minisd.samplers.euler import euler_step
from minisd.samplers.sigmas import SigmaSampler


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) for a step σ -> σ_next: σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)), σ_down² =
    σ_next² − σ_up², so σ_down² + σ_up² = σ_next² (k-diffusion `get_ancestral_step`; at η = 1 DDPM's posterior
    variance (Ho et al. 2020 eq. 7) written in σ, at η = 0 no noise: Euler). Both 0 when σ_next = 0.

    >>> [round(s, 6) for s in ancestral_sigmas(2.0, 1.0)], ancestral_sigmas(2.0, 1.0, eta=0.0)
    ([0.5, 0.866025], (1.0, 0.0))
    """
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


class EulerAncestralSampler(SigmaSampler):
    """Euler ancestral; step-equal to diffusers' EulerAncestralDiscreteScheduler (SD v1.5 config, and every
    timestep_spacing) at η = 1. eta in [0, 1]: A1111's "Eta" (its default 1); diffusers has no other.

    Noise: every step, the last included (where σ_up = 0), draws one standard normal tensor shaped like the model
    output, in its dtype, from `generator` on the generator's device, then moves it to the output's device —
    diffusers' `randn_tensor(model_output.shape, generator=generator, device=..., dtype=model_output.dtype)`.
    So the same generator (same seed and state) gives diffusers' noise draw for draw.
    """

    name = "Euler a"

    def __init__(
        self,
        eta: float = 1.0,
        schedule_type: str = "Uniform",
        timestep_spacing: str = "linspace",
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self.eta = check_eta(eta)
        super().__init__(
            schedule_type,
            timestep_spacing,
            prediction_type=prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x at σ_i -> x at σ_{i+1} with fresh noise. model_output, x: (b, c, h, w); returns x's dtype."""
        i = self.advance(t)
        sigma = self.sigmas[i].item()
        sigma_down, sigma_up = ancestral_sigmas(sigma, self.sigmas[i + 1].item(), self.eta)
        x_i = upcast(x)
        denoised = self.denoised(upcast(model_output), x_i, sigma)
        x_down = euler_step(x_i, denoised, sigma, sigma_down)  # deterministic part, to σ_down
        noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)  # diffusers' step's
        return (x_down + sigma_up * noise).to(x.dtype)  # back up to σ_{i+1} with new noise
