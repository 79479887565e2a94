"""Euler: the first-order solver of the probability-flow ODE in σ (Karras et al. 2022, arXiv:2206.00364, Alg. 1
without its Heun correction; k-diffusion `sample_euler`; A1111 "Euler").

code          paper                              diffusers (EulerDiscreteScheduler)
sigma         σ_i                                sigmas[step_index]
sigma_next    σ_{i+1}                            sigmas[step_index + 1]
model_output  ε_θ(x_i; σ_i) (or v_θ)             model_output
denoised      D_θ(x_i; σ_i) = x_i − σ_i·ε        pred_original_sample
d             d_i = (x_i − D_θ(x_i; σ_i)) / σ_i  derivative
"""

from torch import Generator, Tensor

from minisd.samplers.base import upcast
from minisd.samplers.sigmas import SigmaSampler, slope


def euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of dx/dσ = (x − D(x; σ)) / σ from σ to σ_next, D = `denoised`. x, denoised: (b, c, h, w).

    >>> import torch
    >>> euler_step(torch.tensor([3.0]), torch.tensor([2.0]), 2.0, 1.0)  # slope (3 − 2)/2 = 0.5, Δσ = −1
    tensor([2.5000])
    """
    d = slope(x, sigma, denoised)  # dx/dσ at σ (Karras Alg. 1 line 4)
    return x + (sigma_next - sigma) * d  # Alg. 1 line 5


class EulerSampler(SigmaSampler):
    """Euler in σ: one UNet call per step, deterministic. Step-equal to diffusers' EulerDiscreteScheduler with
    SD v1.5's scheduler config (linspace spacing, σ interpolated at fractional t, final σ 0, no churn)."""

    name = "Euler"

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x at σ_i -> x at σ_{i+1}. model_output, x: (b, c, h, w); returns x's dtype (computed in >= float32)."""
        i = self.advance(t)
        sigma, sigma_next = self.sigmas[i].item(), self.sigmas[i + 1].item()
        x_i = upcast(x)
        return euler_step(x_i, self.denoised(upcast(model_output), x_i, sigma), sigma, sigma_next).to(x.dtype)
