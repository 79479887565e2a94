"""DDPM: ancestral sampling of the denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020,
arXiv:2006.11239), over any subset of the 1000 training timesteps.

code             paper                                  diffusers
t, t_prev        t, t − 1 (here: the schedule's next t) timestep, prev_t
alpha_bar_t      ᾱ_t                                    alphas_cumprod[t]
alpha_t, beta_t  α_t = ᾱ_t / ᾱ_prev, β_t = 1 − α_t      current_alpha_t, current_beta_t
model_output     ε_θ(x_t, t), or v_θ                    model_output
x0_pred          x_0 from eq. 4 solved with ε_θ        pred_original_sample
                 (or from v: base.predictions)
mean             μ̃_t(x_t, x_0), eq. 7                  pred_prev_sample
variance         β̃_t, eq. 7 ("fixed_small")            _get_variance(t)

One step samples p(x_{t_prev} | x_t) = q(x_{t_prev} | x_t, x0_pred) (eqs. 6-7): the posterior mean plus √β̃_t noise.
Written through x0_pred it equals eq. 11's μ_θ = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t.
"""

from torch import Generator, Tensor

from minisd.noise import randn
from minisd.samplers.base import AlphaBarSampler, x0_from_eps


def ddpm_step(
    x_t: Tensor, eps: Tensor, alpha_bar_t: float, alpha_bar_prev: float, noise: Tensor | None = None
) -> Tensor:
    """x_t -> x_{t_prev} ~ q(x_{t_prev} | x_t, x0_pred): the posterior mean μ̃_t (eq. 7), plus √β̃_t·noise unless
    noise is None (the last step, to x_0). x_t, eps, noise: (b, c, h, w); coefficients Python floats (float64).

    >>> import torch
    >>> ddpm_step(torch.tensor([1.0]), torch.tensor([0.0]), 0.25, 1.0)  # to ᾱ_prev = 1: x̂_0 = x_t / √ᾱ_t itself
    tensor([2.])
    """
    x0_pred = x0_from_eps(x_t, eps, alpha_bar_t)  # eq. 4 solved for x_0
    return ddpm_posterior_step(x_t, x0_pred, alpha_bar_t, alpha_bar_prev, noise)


def ddpm_posterior_step(
    x_t: Tensor, x0_pred: Tensor, alpha_bar_t: float, alpha_bar_prev: float, noise: Tensor | None = None
) -> Tensor:
    """Sample q(x_{t_prev} | x_t, x_0 = x0_pred) (eqs. 6-7) whatever predicted x_0: ddpm_step's second half, and
    the whole step of a model that predicts x_0 itself (samplers/unclip.py). Shapes as ddpm_step's.

    >>> import torch
    >>> ddpm_posterior_step(torch.tensor([1.0]), torch.tensor([3.0]), 0.25, 1.0)  # to ᾱ_prev = 1: x0_pred itself
    tensor([3.])
    """
    alpha_t = alpha_bar_t / alpha_bar_prev  # one step of the spaced chain: α_t = ᾱ_t / ᾱ_prev
    beta_t = 1 - alpha_t
    x0_coef = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)  # eq. 7, μ̃_t's weight on x_0
    xt_coef = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)  # eq. 7, μ̃_t's weight on x_t
    mean = x0_coef * x0_pred + xt_coef * x_t
    if noise is None:
        return mean
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t  # eq. 7, β̃_t
    return mean + variance**0.5 * noise  # Algorithm 2, line 4: + σ_t z


class DDPMSampler(AlphaBarSampler):
    """DDPM with SD's β (variance_type "fixed_small", clip_sample False; ε or v prediction: prediction_type).

    Noise: every step with t > 0 draws one noise tensor from the caller's generator (eps's shape and dtype, on the
    generator's device: minisd.noise.randn), as diffusers' DDPMScheduler.step does, so one generator gives
    diffusers' numbers. That includes SD v1's last step (t = 1 → x_0), whose variance is 0: the draw keeps the
    generator in step with diffusers (diffusers clamps that variance to 1e-20 and adds 1e-10 · noise).

    Where diffusers differs: 1000 "leading" steps visit 999 … 0 here (diffusers visits 1000 and indexes past ᾱ's
    end).
    """

    name = "DDPM"

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x_t -> x_{t_prev}: ddpm_posterior_step from x̂_0 (read off ε or v: base.predictions; for ε this is
        ddpm_step). model_output, x: (b, c, h, w)."""
        i = self.advance(t)
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(i, 1.0)  # past the end: x_0 itself
        x0_pred, _ = self.predictions(model_output, x, t)
        noise = None
        if self.timesteps[i] > 0:  # DDPMScheduler.step's draw
            noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)
        return ddpm_posterior_step(x, x0_pred, alpha_bar_t, alpha_bar_prev, noise)
