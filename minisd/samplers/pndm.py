"""PLMS: the pseudo linear multistep method (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds", arXiv:2202.09778), as SD v1 runs it (CompVis plms.py; diffusers PNDMScheduler with
skip_prk_steps=True: no Runge-Kutta warm-up).

code             paper                                  diffusers
t, t_prev        t, t − δ                               timestep, prev_timestep
alpha_bar_t      ᾱ_t                                    alphas_cumprod[t]
model_output     ε_θ(x_t, t) (or v_θ)                   model_output
eps_history      e_t, e_{t−δ}, e_{t−2δ}, e_{t−3δ}       ets
plms_eps         e'_t, the combined ε (eq. 12)          model_output (after combining)
plms_transfer    φ(x_t, e'_t, t, t − δ), eq. 9          _get_prev_sample

Each step moves x along φ (the DDIM step, eq. 9) with ε extrapolated from the last four ε by the Adams-Bashforth
weights (55, −59, 37, −9) / 24 (eq. 12). Until four ε exist, lower orders: (3, −1) / 2, then (23, −16, 5) / 12.
The very first step has no history: it is a pseudo improved Euler (Heun) step, which costs a second model call
at the next timestep; so `timesteps` repeats its second entry and holds n + 1 calls for n ≥ 2 steps.

A v-prediction model: its outputs are what the history holds and combines, and ε is read off the combination at
the start of the step it moves (base.eps_from_v at x_t and ᾱ_t), in φ — diffusers' PNDMScheduler order. (Reading ε
off each output at its own x and t before combining would be the other choice; step parity follows diffusers.)
"""

from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from minisd.samplers.base import AlphaBarSampler, inference_timesteps, predictions


def plms_transfer(x_t: Tensor, eps: Tensor, alpha_bar_t: float, alpha_bar_prev: float) -> Tensor:
    """φ(x_t, ε, t, t_prev), eq. 9: the deterministic DDIM step from ᾱ_t to ᾱ_prev, written as PNDM writes it
    (diffusers' `_get_prev_sample`). x_t, eps: (b, c, h, w).

    >>> import torch
    >>> plms_transfer(torch.tensor([1.0]), torch.tensor([0.0]), 0.25, 1.0)  # ε = 0: x_t · √(ᾱ_prev / ᾱ_t)
    tensor([2.])
    """
    a_t, a_prev = alpha_bar_t, alpha_bar_prev
    x_coef = (a_prev / a_t) ** 0.5
    eps_coef = (a_prev - a_t) / (a_t**0.5 * (((1 - a_prev) * a_t) ** 0.5 + ((1 - a_t) * a_prev) ** 0.5))
    return x_coef * x_t - eps_coef * eps  # eq. 9


def plms_eps(eps_history: list[Tensor]) -> Tensor:
    """e'_t, the ε a step moves along: the last (up to four) ε, oldest first, combined by the Adams-Bashforth
    weights (55, −59, 37, −9) / 24 (eq. 12); with fewer, the lower orders (3, −1) / 2 and (23, −16, 5) / 12.

    >>> import torch
    >>> plms_eps([torch.tensor([1.0]), torch.tensor([2.0])])  # (3 · 2 − 1) / 2
    tensor([2.5000])
    """
    e = eps_history[::-1]  # e[0] = e_t, e[1] = e_{t−δ}, …
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2  # 2nd-order Adams-Bashforth
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12  # 3rd order
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24  # eq. 12, 4th order


class PNDMSampler(AlphaBarSampler):
    """PLMS with SD v1's settings. Deterministic: the generator is not used.

    Image-to-image: set_timesteps(n, strength) keeps the last ⌊n · strength⌋ distinct steps, as every sampler
    does, and runs a fresh warm-up from the first of them (timesteps [t_k, t_{k−1}, t_{k−1}, …, t_0]). diffusers'
    img2img pipeline instead slices a full run's [t_{n−1}, t_{n−2}, t_{n−2}, …], counting the duplicate as a
    step: it starts one step noisier than DDIM at the same strength, and after its warm-up the next call
    evaluates x at t_j labelled t_{j−1}, skipping a step (tests/test_samplers_alpha.py shows both).
    1000 "leading" steps visit 999 … 0 here (diffusers visits 1000 and indexes past ᾱ's end).
    """

    name = "PLMS"
    zero_snr = False  # φ divides by √ᾱ_t (eq. 9): undefined at ᾱ_T = 0; diffusers' PNDMScheduler has no such option

    def __init__(
        self,
        timestep_spacing: str = "leading",
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(
            timestep_spacing, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr
        )  # zero SNR: refused by Sampler.set_prediction (zero_snr = False)
        # set_alpha_to_one=False (SD v1): past the last step, ᾱ_prev = ᾱ_0, not 1 (CompVis plms.py does the same)
        self.final_alpha_bar = self.alphas_cumprod[0].item()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
    ) -> None:
        """Plan the run and forget the previous run's ε history. `timesteps` gets the warm-up's extra call."""
        self.steps = inference_timesteps(num_inference_steps, strength, timesteps, self.timestep_spacing)
        self.start_run(torch.cat([self.steps[:1], self.steps[1:2], self.steps[1:]]))  # warm-up: repeat t_{k−1}
        self.eps_history: list[Tensor] = []
        self.warmup_start: tuple[Tensor, Tensor] | None = None  # (x, eps) at the first step, until its second call

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def steps_done(self) -> int:
        """The warm-up's first call completes no step; every later call completes one."""
        return self.step_index if len(self.steps) == 1 else max(self.step_index - 1, 0)

    def transfer(self, x: Tensor, output: Tensor, j: int) -> Tensor:
        """φ (plms_transfer) over step j of `steps`: from steps[j] to the next one (past the last: ᾱ_0). output: the
        (combined) model output; for a v-prediction model, ε is read off it here at (x, steps[j])."""
        t_prev = int(self.steps[j + 1]) if j + 1 < len(self.steps) else -1
        a_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else self.final_alpha_bar
        a_t = self.alphas_cumprod[int(self.steps[j])].item()
        _, eps = predictions(output, x, a_t, self.prediction_type)  # ε itself for ε-models
        return plms_transfer(x, eps, a_t, a_prev)

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """One model call's move. model_output (ε or v), x: (b, c, h, w). Call with every entry of `timesteps`, in
        order."""
        i = self.advance(t)
        warmup = len(self.steps) > 1 and i < 2
        j = max(i - 1, 0)  # index in `steps` of the step this call completes
        output = model_output  # ε (or v: the history holds the outputs as they come, see the module docstring)
        if warmup and i == 0:  # improved Euler, stage 1: an Euler (DDIM) step, only to evaluate ε at t_prev
            self.warmup_start = (x, output)
            return self.transfer(x, output, j)
        if warmup:  # stage 2: redo the first step from its start with the mean of both ε
            x, first = self.warmup_start
            self.warmup_start = None
            self.eps_history = [first]
            return self.transfer(x, (first + output) / 2, j)
        self.eps_history = [*self.eps_history[-3:], output]
        return self.transfer(x, plms_eps(self.eps_history), j)
