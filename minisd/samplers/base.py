"""What every sampler offers: the small interface the lessons' denoising loops use.

sampler.set_timesteps(num_inference_steps)        # or strength=… for image-to-image
latents = noise * sampler.init_noise_sigma        # txt2img start
# img2img start instead: latents = sampler.add_noise(x0, noise, sampler.timesteps[:1])
for t in sampler.timesteps:                       # one entry per model call
    latent_model_input = sampler.scale_model_input(latents, t)
    model_output = unet(latent_model_input, t, context)          # ε, or v for a v-prediction model
    x0_pred = sampler.x0_pred(model_output, t, latents)          # optional: x̂_0, e.g. for a preview
    latents = sampler.step(model_output, t, latents, generator=generator)

Each sampler file states its maths as small pure functions with a doctest (ddim_step, ddpm_step, plms_eps,
euler_step, ...), which its class calls with the numbers of the current step. The class keeps the run's state,
and one piece of it is the same for all: `step_index`, the index in `timesteps` of the next model call, reset by
set_timesteps and moved on by every step (a call with another timestep than the expected one is an error).

What the model predicts (`prediction_type`, a setting of every sampler, as in diffusers):
  "epsilon"       the noise ε in x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (DDPM; SD v1, SD 2's 512 and inpainting models)
  "v_prediction"  the velocity v = √ᾱ_t·ε − √(1 − ᾱ_t)·x_0 (Salimans & Ho 2022, arXiv:2202.00512, §4;
                  SD 2's 768 models). (√ᾱ_t, √(1 − ᾱ_t)) is a unit vector, so (x_t, v) is (x_0, ε) rotated by
                  the angle φ_t with cos φ_t = √ᾱ_t, and rotating back gives both (x0_from_v, eps_from_v):
                      x̂_0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v        ε̂ = √ᾱ_t·v + √(1 − ᾱ_t)·x_t
                  Unlike x̂_0 from ε, this needs no division by √ᾱ_t: it holds at ᾱ_T = 0 (zero terminal SNR).
Each sampler turns the output into what its method moves along (x̂_0 and ε̂ for the ᾱ samplers, D(x; σ) for the
σ ones) at the top of its step, with these formulas; the rest of every method is the same for both kinds.
"""

from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from minisd.errors import MinisdError
from minisd.samplers import schedule
from minisd.samplers.schedule import check_timesteps, spaced_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names (its "sample" is not used by SD)


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """How many of the n scheduled steps an image-to-image run skips: n − min(⌊n · strength⌋, n).

    strength 1 keeps every step (the input image is fully noised: plain txt2img); strength 0.3 with 50 steps
    runs the last 15. The one place this is computed, for every sampler (diffusers' pipelines compute
    `init_timestep = min(int(n * strength), n)`, `t_start = n - init_timestep`). A strength so small that no step
    would run is an error here; diffusers silently returns an empty timestep list.

    >>> img2img_start(50, 0.3), img2img_start(50, 1.0), img2img_start(10, 0.75)
    (35, 0, 3)
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise MinisdError(f"strength must be in (0, 1], got {strength!r}")
    steps_run = min(int(num_inference_steps * strength), num_inference_steps)
    if steps_run == 0:
        raise MinisdError(
            f"strength {strength} with {num_inference_steps} steps runs no denoising step "
            f"(needs strength >= {1 / num_inference_steps:.3g} or more steps)"
        )
    return num_inference_steps - steps_run


def inference_timesteps(
    num_inference_steps: int | None = None,
    strength: float = 1.0,
    timesteps: Sequence[int] | Tensor | None = None,
    spacing: str = "leading",
) -> Tensor:
    """The distinct timesteps a run visits, decreasing, int64 (n,): the spaced schedule of `num_inference_steps`
    (or the caller's `timesteps`), less the first img2img_start(n, strength) entries.

    >>> inference_timesteps(10, strength=0.5).tolist()
    [401, 301, 201, 101, 1]
    >>> inference_timesteps(timesteps=[999, 500, 250, 0], strength=0.5).tolist()
    [250, 0]
    """
    if timesteps is not None:
        if num_inference_steps is not None:
            raise MinisdError(
                f"give num_inference_steps or timesteps, not both (got {num_inference_steps} and timesteps)"
            )
        schedule = check_timesteps(timesteps)
    elif num_inference_steps is None:
        raise MinisdError("set_timesteps needs num_inference_steps or timesteps, got neither")
    else:
        schedule = spaced_timesteps(num_inference_steps, spacing)
    return schedule[img2img_start(len(schedule), strength) :]


def check_eta(eta: float) -> float:
    """η (DDIM's, or an ancestral sampler's) as a float, or a one-line error unless it is a number in [0, 1]."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:  # NaN fails too
        raise MinisdError(f"eta must be in [0, 1], got {eta!r}")
    return float(eta)


def upcast(x: Tensor) -> Tensor:
    """x in at least float32: steps are computed there and cast back, so fp16 latents lose nothing to the step."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_prediction_type(prediction_type: object, rescale_betas_zero_snr: object = False) -> str:
    """prediction_type, or a one-line MinisdError unless it is one of PREDICTION_TYPES; zero terminal SNR needs
    v_prediction (at ᾱ_T = 0 an ε-model's x̂_0 = (x_T − ε)/0 is undefined; Lin et al. 2023, §3.2)."""
    if prediction_type not in PREDICTION_TYPES:
        raise MinisdError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if not isinstance(rescale_betas_zero_snr, bool):
        raise MinisdError(f"rescale_betas_zero_snr must be True or False, got {rescale_betas_zero_snr!r}")
    if rescale_betas_zero_snr and prediction_type != "v_prediction":
        raise MinisdError(
            "rescale_betas_zero_snr needs prediction_type v_prediction (zero terminal SNR: at the last timestep the "
            f"latents are pure noise, and an ε-model cannot say x_0 from them), got {prediction_type!r}"
        )
    return prediction_type


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar_t: float) -> Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t)·ε) / √ᾱ_t: DDPM eq. 4 solved for x_0 (DDIM eq. 12's "predicted x_0"; diffusers'
    `pred_original_sample`), the ᾱ samplers' x̂_0. x_t, eps: (b, c, h, w); alpha_bar_t: ᾱ_t in (0, 1].

    >>> x0_from_eps(torch.tensor([1.0]), torch.tensor([1.0]), 0.25)  # (1 − √0.75) / √0.25
    tensor([0.2679])
    """
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: float) -> Tensor:
    """x̂_0 = √ᾱ_t·x_t − √(1 − ᾱ_t)·v: the clean latents a v-prediction implies (Salimans & Ho 2022, §4; see the
    module docstring). x_t, v: (b, c, h, w); alpha_bar_t in [0, 1].

    >>> x0_from_v(torch.tensor([1.0]), torch.tensor([1.0]), 0.25)  # √0.25 − √0.75
    tensor([-0.3660])
    """
    return alpha_bar_t**0.5 * x_t - (1 - alpha_bar_t) ** 0.5 * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: float) -> Tensor:
    """ε̂ = √ᾱ_t·v + √(1 − ᾱ_t)·x_t: the noise a v-prediction implies (the same rotation back).

    >>> eps_from_v(torch.tensor([1.0]), torch.tensor([1.0]), 0.25)  # √0.25 + √0.75
    tensor([1.3660])
    """
    return alpha_bar_t**0.5 * v + (1 - alpha_bar_t) ** 0.5 * x_t


def predictions(model_output: Tensor, x_t: Tensor, alpha_bar_t: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from the model's output at x_t: for "epsilon" the output is ε̂ and x̂_0 is x0_from_eps; for
    "v_prediction" both come from v (x0_from_v, eps_from_v). model_output, x_t: (b, c, h, w).

    >>> predictions(torch.tensor([1.0]), torch.tensor([1.0]), 0.25, "v_prediction")
    (tensor([-0.3660]), tensor([1.3660]))
    """
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, model_output, alpha_bar_t), eps_from_v(x_t, model_output, alpha_bar_t)
    return x0_from_eps(x_t, model_output, alpha_bar_t), model_output


class Sampler:
    """Base class of minisd's samplers. Subclasses fill `timesteps` and `init_noise_sigma` in `set_timesteps`.

    order: model calls per step of the underlying method (Heun: 2); `timesteps` has one entry per model call.
    prediction_type: what the model's output is ("epsilon" or "v_prediction", see the module docstring).
    rescale_betas_zero_snr: β rescaled for zero terminal SNR (schedule.rescale_zero_terminal_snr), where the
    sampler supports it (`zero_snr`: diffusers' schedulers that have the option).
    """

    name: str = ""  # the A1111 name, for PNG parameters
    schedule_type: str = "Uniform"  # A1111's "Schedule type": which noise levels a run visits (sigmas.py)
    timestep_spacing: str  # diffusers' name for how "Uniform" spaces the timesteps
    order: int = 1
    zero_snr: bool = True  # whether this sampler can run a zero-terminal-SNR schedule
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timesteps: Tensor
    init_noise_sigma: float = 1.0
    step_index: int = 0  # the index in `timesteps` of the next model call

    @property
    def num_steps(self) -> int:
        """The method steps of this run, what a progress bar counts: one per model call here (PLMS, Heun differ)."""
        return len(self.timesteps)

    @property
    def steps_done(self) -> int:
        """How many of num_steps the model calls so far have completed."""
        return self.step_index

    def start_run(self, timesteps: Tensor) -> None:
        """Set the model calls of a run (one timestep each) and count from the first: every set_timesteps ends here."""
        self.timesteps = timesteps
        self.step_index = 0

    def call_index(self, t: Tensor | float) -> int:
        """The index in `timesteps` of the current model call (step_index), after checking t is its timestep."""
        if not 0 <= self.step_index < len(self.timesteps):
            raise MinisdError(f"step called {self.step_index + 1} times; this run has {len(self.timesteps)} calls")
        expected = self.timesteps[self.step_index].item()
        given = float(torch.as_tensor(t).reshape(-1)[0])
        if given != expected:
            raise MinisdError(
                f"t must be sampler.timesteps[{self.step_index}] = {expected} (step every entry of timesteps in order, "
                f"after set_timesteps), got {given}"
            )
        return self.step_index

    def advance(self, t: Tensor | float) -> int:
        """call_index(t), and count the call: what every step does first. Returns the call's index."""
        i = self.call_index(t)
        self.step_index += 1
        return i

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
    ) -> None:
        """Plan a run of n steps (or over the caller's decreasing `timesteps`); strength < 1 keeps only the last
        ⌊n · strength⌋ of them (image-to-image, see img2img_start)."""
        raise NotImplementedError

    def scale_model_input(self, x: Tensor, t: Tensor | int) -> Tensor:
        """What the UNet sees at step t. Identity for the ᾱ samplers (DDPM, DDIM, PLMS)."""
        return x

    def set_prediction(self, prediction_type: str, rescale_betas_zero_snr: bool) -> None:
        """Check and keep what the model predicts and whether β is rescaled for zero terminal SNR (each sampler's
        constructor calls this before building its tables)."""
        self.prediction_type = check_prediction_type(prediction_type, rescale_betas_zero_snr)
        if rescale_betas_zero_snr and not self.zero_snr:
            raise MinisdError(
                f"rescale_betas_zero_snr: the {self.name} sampler cannot start from pure noise (its method divides by "
                "√ᾱ_T = 0, and diffusers has no such option for it); use DDIM, DDPM, Euler, Euler a or DPM++ 2M"
            )
        self.rescale_betas_zero_snr = rescale_betas_zero_snr

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, generator: Generator | None = None) -> Tensor:
        """One move from x at t to the next, less noisy, x, given the model's output (ε or v) at x."""
        raise NotImplementedError

    def x0_pred(self, model_output: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """x̂_0: the clean latents the model call at t implies, in this sampler's own terms (diffusers'
        `pred_original_sample`). Call it between the UNet call and `step`, with the x that call was given (before
        scale_model_input). model_output, x: (b, c, h, w); computed in at least float32, returned in x's dtype."""
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Noise clean latents x0 to the level of timestep t, in this sampler's space."""
        raise NotImplementedError


class AlphaBarSampler(Sampler):
    """What the ᾱ samplers (DDPM, DDIM, PLMS) share: an ᾱ table (SD's unless `betas` are given; rescaled for zero
    terminal SNR on request), a timestep spacing, a plan of integer timesteps (one model call each; PLMS adds its
    warm-up call), x̂_0 and ε̂ from the model's output, and the forward process in x_t space. betas: another model's
    β_t (T,), e.g. schedule.linear_betas() for Kandinsky 2.2's decoder."""

    def __init__(
        self,
        timestep_spacing: str = "leading",
        betas: Tensor | None = None,
        *,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if timestep_spacing not in schedule.SPACINGS:
            raise MinisdError(f"timestep_spacing must be one of {schedule.SPACINGS}, got {timestep_spacing!r}")
        self.timestep_spacing = timestep_spacing
        self.set_prediction(prediction_type, rescale_betas_zero_snr)
        betas = schedule.scaled_linear_betas() if betas is None else betas.to(torch.float64)
        if rescale_betas_zero_snr:
            betas = schedule.rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = schedule.alphas_cumprod_from_betas(betas)  # float64 (T,)
        self.set_timesteps(50)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
    ) -> None:
        """One model call per timestep: n of them, or ⌊n · strength⌋ for image-to-image."""
        self.start_run(inference_timesteps(num_inference_steps, strength, timesteps, self.timestep_spacing))

    def alpha_bars(self, i: int, final_alpha_bar: float) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) of the step that model call i makes: from timesteps[i] to the next entry, or past the last
        one to final_alpha_bar (ᾱ_0 for DDIM as SD v1 runs it, 1 for DDPM: x_0 itself)."""
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        alpha_bar_prev = self.alphas_cumprod[t_prev].item() if t_prev >= 0 else final_alpha_bar
        return self.alphas_cumprod[t].item(), alpha_bar_prev

    def predictions(self, model_output: Tensor, x: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) of the model's output at x = x_t (base.predictions, by this sampler's prediction_type)."""
        return predictions(model_output, x, self.alphas_cumprod[int(t)].item(), self.prediction_type)

    def x0_pred(self, model_output: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t)·ε) / √ᾱ_t (x0_from_eps), or √ᾱ_t·x_t − √(1 − ᾱ_t)·v (x0_from_v); x being x_t."""
        return self.predictions(upcast(model_output), upcast(x), t)[0].to(x.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · noise (DDPM eq. 4); x0, noise: (b, c, h, w)."""
        return schedule.add_noise(x0, noise, t, self.alphas_cumprod)
