"""The unCLIP sampler of Kandinsky 2.2's prior: DDPM (ddpm.py) over the cosine schedule, with a model that
predicts x_0 itself (Ramesh et al. 2022, arXiv:2204.06125, §2.2: "we find it better to predict the unnoised z_i
directly"). Equal to diffusers' UnCLIPScheduler with the prior's scheduler_config.json.

code             paper                                   diffusers
alphas_cumprod   ᾱ_t from the cosine β (Nichol & Dhariwal eq. 17)  alphas_cumprod (squaredcos_cap_v2)
x0_pred          the model output z_0, clipped to ±10     pred_original_sample (clip_sample_range 10)
timesteps        round(i · 999 / (n − 1)), i = n−1 … 0   set_timesteps ("linspace" spacing)

What differs from DDPMSampler is only what the network predicts and the schedule: the step itself is DDPM's
posterior sample q(x_{t_prev} | x_t, x0_pred) (eqs. 6-7), with σ² = β̃_t (diffusers "fixed_small_log" takes
exp(½ log β̃) of the same number).
"""

from torch import Generator, Tensor

from minisd.noise import randn
from minisd.samplers import schedule
from minisd.samplers.ddpm import DDPMSampler, ddpm_posterior_step

CLIP_SAMPLE_RANGE = 10.0  # the prior's scheduler_config.json clip_sample_range: x0_pred is clamped to [-10, 10]


class UnCLIPSampler(DDPMSampler):
    """DDPM stepping for a model that predicts x_0 (prediction_type "sample"), cosine ᾱ, "linspace" timesteps
    (the first at T − 1 = 999, the last at 0). Noise: one draw per step with t > 0, as diffusers' UnCLIPScheduler."""

    name = "unCLIP"

    def __init__(self) -> None:
        super().__init__(timestep_spacing="linspace", betas=schedule.cosine_betas())

    def x0_pred(self, x0: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """x̂_0: the model's own prediction, clipped to ±10 (it predicts x_0, not ε; t and x are not needed)."""
        return x0.clamp(-CLIP_SAMPLE_RANGE, CLIP_SAMPLE_RANGE)

    def step(self, x0: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """x_t -> x_{t_prev} (ddpm_posterior_step), given the model's prediction x0 of the clean sample. x0, x: (b, d).
        One noise draw per step with t > 0, of the model output's shape and dtype (diffusers' UnCLIPScheduler)."""
        i = self.advance(t)
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(i, 1.0)  # past the last step (t = 0): x_0 itself
        noise = randn(x0.shape, generator, x0.dtype, x0.device) if self.timesteps[i] > 0 else None
        return ddpm_posterior_step(x, self.x0_pred(x0, t, x), alpha_bar_t, alpha_bar_prev, noise)
