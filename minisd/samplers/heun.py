"""Heun: Euler's step, then a second UNet call at the end point and the average of the two slopes
(Karras et al. 2022, arXiv:2206.00364, Alg. 1, the deterministic sampler; k-diffusion `sample_heun`; A1111 "Heun").
Second order, two UNet calls per step, except the last step to σ = 0, which is plain Euler (Alg. 1 line 6: the
slope at σ = 0 is undefined).

code          paper (Alg. 1)                      diffusers (HeunDiscreteScheduler)
sigma         t_i (σ(t) = t)                      sigma
sigma_next    t_{i+1}                             sigma_next
d             d_i = (x_i − D_θ(x_i; t_i)) / t_i   prev_derivative
x_pred        x_{i+1} (Euler, line 5)             prev_sample of the first call
d_next        d'_i, the slope at x_{i+1}          derivative of the second call
"""

from torch import Generator, Tensor

from minisd.samplers.base import upcast
from minisd.samplers.sigmas import SigmaSampler, slope


def heun_correct(
    x: Tensor, d: Tensor, x_pred: Tensor, denoised_next: Tensor, sigma: float, sigma_next: float
) -> Tensor:
    """Alg. 1 lines 7-8: the slope d' at the Euler point x_pred (whose D is denoised_next), then
    x_{i+1} = x_i + (σ_next − σ)·(d + d')/2."""
    d_next = slope(x_pred, sigma_next, denoised_next)  # line 7
    return x + (sigma_next - sigma) * (d + d_next) / 2  # line 8: the trapezoid rule


class HeunSampler(SigmaSampler):
    """Heun's method in σ; step-equal to diffusers' HeunDiscreteScheduler (SD v1.5 config: linspace).

    `timesteps` lists every UNet call: t_0, then t_1 t_1, t_2 t_2, …, t_{n−1} t_{n−1} (the second call of each pair
    evaluates the Euler point x_pred at σ_{i+1}; the first starts the next step): 2n − 1 calls for n steps.
    """

    name = "Heun"
    order = 2
    zero_snr = False  # diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr: no reference to prove it by

    def calls_for(self, timesteps: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
        """(timesteps, σ of x) per call: the first step's, then every later step's twice."""
        return timesteps.repeat_interleave(2)[1:], sigmas[:-1].repeat_interleave(2)[1:]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def steps_done(self) -> int:
        """Calls 1, 3, 5, … complete a step, and the last call (a lone Euler step to σ = 0) the last one."""
        return (self.step_index + 1) // 2

    def reset(self) -> None:
        self.pending = None  # (x_i, d_i, σ_i, σ_{i+1}) between a step's two calls

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, generator: Generator | None = None) -> Tensor:
        """One UNet call's move: an Euler prediction (first call) or its correction (second call). Returns x's dtype."""
        call = self.advance(t)
        if self.pending is not None:  # second call: the model was evaluated at the Euler point x = x_pred
            x_i, d, sigma, sigma_next = self.pending
            self.pending = None
            x_pred = upcast(x)
            denoised_next = self.denoised(upcast(model_output), x_pred, sigma_next)
            return heun_correct(x_i, d, x_pred, denoised_next, sigma, sigma_next).to(x.dtype)
        i = call // 2  # first calls are 0, 2, 4, …: they start steps 0, 1, 2, …
        sigma, sigma_next = self.sigmas[i].item(), self.sigmas[i + 1].item()
        x_i = upcast(x)
        d = slope(x_i, sigma, self.denoised(upcast(model_output), x_i, sigma))  # Alg. 1 line 4
        x_pred = x_i + (sigma_next - sigma) * d  # line 5: the Euler step
        if sigma_next > 0:  # line 6: correct unless this step lands on σ = 0
            self.pending = (x_i, d, sigma, sigma_next)
        return x_pred.to(x.dtype)
