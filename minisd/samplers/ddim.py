"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2020, arXiv:2010.02502).

code             paper (DDIM writes α for DDPM's ᾱ)   diffusers
t, t_prev        τ_i, τ_{i−1}                         timestep, prev_timestep
alpha_bar_t      α_{τ_i} (= ᾱ_t)                      alphas_cumprod[t]
alpha_bar_prev   α_{τ_{i−1}}                          alpha_prod_t_prev
eps              ε_θ(x_t, t)                          pred_epsilon (model_output for ε-models)
x0_pred          "predicted x_0", eq. 12              pred_original_sample
sigma_t          σ_{τ_i}(η), eq. 16                   std_dev_t
eta              η: 0 = deterministic DDIM, 1 = DDPM  eta

One step (eq. 12): predict x_0 from x_t, then re-noise it to the level of t_prev along the predicted ε, plus
fresh noise of size σ_t when η > 0. A v-prediction model gives x̂_0 and ε̂ by base.predictions.
"""

from torch import Generator, Tensor

from minisd.noise import randn
from minisd.samplers.base import AlphaBarSampler, check_eta


def ddim_step(
    x0_pred: Tensor,
    eps: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """x_t -> x_{t_prev} by eq. 12: re-noise the predicted x_0 to ᾱ_prev along the predicted ε, plus σ_t(η)·noise.

    x0_pred, eps: eq. 12's "predicted x_0" and ε at x_t (base.predictions); noise (z ~ N(0, I)), needed when
    eta > 0: all (b, c, h, w). Coefficients are Python floats (float64), applied to the tensors in their dtype.

    >>> import torch
    >>> ddim_step(torch.tensor([2.0]), torch.tensor([0.0]), 0.25, 1.0)  # ε = 0: x̂_0 = 2, kept at ᾱ = 1
    tensor([2.])
    """
    ddpm_variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)  # σ_t(η=1)²
    sigma_t = eta * ddpm_variance**0.5  # eq. 16
    # eq. 12, "direction pointing to x_t". Its weight is exactly 0 for η = 1 from ᾱ_t = 0 (zero terminal SNR), where
    # rounding can leave 1 − ᾱ_prev − σ_t² at −1e-17: clamped, so it stays 0 (diffusers' √ gives NaN there).
    direction = max(1 - alpha_bar_prev - sigma_t**2, 0.0) ** 0.5 * eps
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

    def __init__(
        self,
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        betas: Tensor | None = None,
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self.eta = check_eta(eta)
        super().__init__(
            timestep_spacing, betas, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr
        )
        # set_alpha_to_one=False (SD v1): past the last step, ᾱ_prev = ᾱ_0, not 1 (LDM's ddim.py does the same)
        self.final_alpha_bar = self.alphas_cumprod[0].item()

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x_t -> x_{t_prev} (ddim_step). model_output (ε or v), x: (b, c, h, w)."""
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(self.advance(t), self.final_alpha_bar)
        x0_pred, eps = self.predictions(model_output, x, t)  # eq. 12's "predicted x_0", and ε
        noise = None
        if self.eta > 0:  # DDIMScheduler.step's draw
            noise = randn(model_output.shape, generator, model_output.dtype, model_output.device)
        return ddim_step(x0_pred, eps, alpha_bar_t, alpha_bar_prev, self.eta, noise)
