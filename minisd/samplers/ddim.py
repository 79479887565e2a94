"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2020, arXiv:2010.02502).

code             paper (DDIM writes α for DDPM's ᾱ)   diffusers
t, t_prev        τ_i, τ_{i−1}                         timestep, prev_timestep
alpha_bar_t      α_{τ_i} (= ᾱ_t)                      alphas_cumprod[t]
alpha_bar_prev   α_{τ_{i−1}}                          alpha_prod_t_prev
eps              ε_θ(x_t, t)                          model_output
x0_pred          "predicted x_0", eq. 12              pred_original_sample
sigma_t          σ_{τ_i}(η), eq. 16                   std_dev_t
eta              η: 0 = deterministic DDIM, 1 = DDPM  eta

One step (eq. 12): predict x_0 from x_t, then re-noise it to the level of t_prev along the predicted ε, plus
fresh noise of size σ_t when η > 0.
"""

from torch import Generator, Tensor

from minisd.noise import randn
from minisd.samplers.base import AlphaBarSampler, check_eta, x0_from_eps


def ddim_step(
    x_t: Tensor, eps: Tensor, alpha_bar_t: float, alpha_bar_prev: float, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """x_t -> x_{t_prev} by eq. 12: predict x_0, re-noise it to ᾱ_prev along the predicted ε, plus σ_t(η)·noise.

    x_t, eps, noise: (b, c, h, w); noise (z ~ N(0, I)) is needed when eta > 0. Coefficients are Python floats
    (float64), applied to the tensors in their dtype.

    >>> import torch
    >>> ddim_step(torch.tensor([1.0]), torch.tensor([0.0]), 0.25, 1.0)  # ε = 0: x̂_0 = x_t / √ᾱ_t = 2, kept at ᾱ = 1
    tensor([2.])
    """
    x0_pred = x0_from_eps(x_t, eps, alpha_bar_t)  # eq. 12, "predicted x_0"
    ddpm_variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)  # σ_t(η=1)²
    sigma_t = eta * ddpm_variance**0.5  # eq. 16
    direction = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps  # eq. 12, "direction pointing to x_t"
    x_prev = alpha_bar_prev**0.5 * x0_pred + direction  # eq. 12
    if eta > 0:
        x_prev = x_prev + sigma_t * noise  # eq. 12, "random noise" σ_t ε_t
    return x_prev


class DDIMSampler(AlphaBarSampler):
    """DDIM with SD v1's settings. eta in [0, 1]. With eta > 0 each step draws one noise tensor from the caller's
    generator (eps's shape and dtype, on the generator's device: minisd.noise.randn), exactly as diffusers'
    DDIMScheduler.step does, so one generator gives diffusers' numbers.

    Where diffusers differs: 1000 "leading" steps visit 999 … 0 here (diffusers visits 1000 and indexes past ᾱ's
    end); t_prev is the next entry of the schedule, so any spacing or caller-given timesteps step to where the
    schedule goes (diffusers steps to t − ⌊T / n⌋, the same for SD v1's "leading" spacing).
    """

    name = "DDIM"

    def __init__(self, eta: float = 0.0, timestep_spacing: str = "leading", betas: Tensor | None = None) -> None:
        self.eta = check_eta(eta)
        super().__init__(timestep_spacing, betas)
        # set_alpha_to_one=False (SD v1): past the last step, ᾱ_prev = ᾱ_0, not 1 (LDM's ddim.py does the same)
        self.final_alpha_bar = self.alphas_cumprod[0].item()

    def step(self, eps: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x_t -> x_{t_prev} (ddim_step). eps, x: (b, c, h, w)."""
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(self.advance(t), self.final_alpha_bar)
        noise = randn(eps.shape, generator, eps.dtype, eps.device) if self.eta > 0 else None  # DDIMScheduler.step's
        return ddim_step(x, eps, alpha_bar_t, alpha_bar_prev, self.eta, noise)
