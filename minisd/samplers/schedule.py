"""The SD v1 noise schedule: β, ᾱ, σ, timestep spacing and the forward process q(x_t | x_0).

code                 paper / k-diffusion                     diffusers
betas                β_t (DDPM, Ho et al. 2020)              betas
alphas_cumprod       ᾱ_t = ∏_{s<=t} (1 − β_s)                alphas_cumprod
sigmas               σ_t = √((1 − ᾱ_t) / ᾱ_t) (Karras 2022)  ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
t                    timestep index in [0, 999]              timestep

SD v1 trained with 1000 steps of a "scaled linear" β: a linspace of √β from √0.00085 to √0.012, squared
(CompVis `ldm/modules/diffusionmodules/util.py` `make_beta_schedule("linear", ...)`, which LDM calls "linear";
diffusers calls it "scaled_linear"). LDM computes it in float64 and stores float32 buffers in every official
checkpoint; minisd keeps float64 and casts at the last moment.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from minisd.errors import MinisdError

NUM_TRAIN_TIMESTEPS = 1000  # T: the training chain's length (v1-inference.yaml `timesteps: 1000`)
BETA_START = 0.00085  # β_1 (v1-inference.yaml `linear_start`)
BETA_END = 0.012  # β_T (v1-inference.yaml `linear_end`)
SPACINGS = ("leading", "trailing", "linspace")


def scaled_linear_betas(
    beta_start: float = BETA_START, beta_end: float = BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """SD v1's β_t: (linspace(√β_start, √β_end, T))², float64, shape (T,).

    >>> betas = scaled_linear_betas()
    >>> betas.shape, round(betas[0].item(), 5), round(betas[-1].item(), 5)
    (torch.Size([1000]), 0.00085, 0.012)
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def linear_betas(
    beta_start: float = BETA_START, beta_end: float = BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """DDPM's own β_t: linspace(β_start, β_end, T), float64, shape (T,) (Ho et al. 2020, §4; diffusers "linear").
    Kandinsky 2.2's decoder was trained with it over SD v1's endpoints (its scheduler_config.json: "linear",
    0.00085, 0.012), so its ᾱ falls faster than SD v1's "scaled linear" in the middle of the chain.

    >>> betas = linear_betas()
    >>> round(betas[500].item(), 6), round(scaled_linear_betas()[500].item(), 6)
    (0.006431, 0.004815)
    """
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def cosine_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
    with s = 0.008, and β_t = 1 − ᾱ(t+1)/ᾱ(t) capped at max_beta (their §3.2, "to prevent singularities near
    t = T"). float64, shape (T,). Kandinsky 2.2's prior uses it (diffusers "squaredcos_cap_v2").

    >>> betas = cosine_betas()
    >>> round(betas[0].item(), 6), betas[-1].item()
    (4.1e-05, 0.999)
    """
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + 0.008) / 1.008 * torch.pi / 2) ** 2  # eq. 17, at t = 0, 1/T, …, 1
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s<=t} (1 − β_s) (DDPM eq. 4's ᾱ). Same shape and dtype as `betas`.

    >>> ac = alphas_cumprod_from_betas(scaled_linear_betas())
    >>> round(ac[0].item(), 5), round(ac[-1].item(), 5)
    (0.99915, 0.00466)
    """
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """β rescaled so the last timestep is pure noise, ᾱ_T = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", arXiv:2305.08891, Algorithm 1; diffusers' rescale_betas_zero_snr).

    SD's schedule ends at ᾱ_T = 0.0047: a little of the image survives at t = T in training, but inference starts
    from pure noise. Shift √ᾱ_t so that √ᾱ_T = 0, scale it so that √ᾱ_1 is unchanged, and read β back off it:
        √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T),   β'_t = 1 − ᾱ'_t / ᾱ'_{t−1}   (β'_T = 1)
    Same shape and dtype as `betas`. Meant for v-prediction models (base.check_prediction_type).

    >>> ac = alphas_cumprod_from_betas(rescale_zero_terminal_snr(scaled_linear_betas()))
    >>> round(ac[0].item(), 5), ac[-1].item()
    (0.99915, 0.0)
    """
    alphas_bar_sqrt = alphas_cumprod_from_betas(betas).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # √ᾱ'_T = 0, √ᾱ'_1 = √ᾱ_1
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


def training_alphas_cumprod(rescale_betas_zero_snr: bool = False) -> Tensor:
    """SD's ᾱ table (T,) float64: from the scaled-linear β, rescaled first for zero terminal SNR on request."""
    betas = scaled_linear_betas()
    return alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t): the noise level of x_t / √ᾱ_t, the variable k-diffusion samplers move
    (Karras et al. 2022, arXiv:2206.00364, Table 1 "VP"). Same shape as the input, increasing with t.

    >>> s = sigmas_from_alphas_cumprod(alphas_cumprod_from_betas(scaled_linear_betas()))
    >>> round(s[0].item(), 4), round(s[-1].item(), 3)
    (0.0292, 14.615)
    """
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
    """One-line error unless 1 <= num_inference_steps <= T."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise MinisdError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise MinisdError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")


def spaced_timesteps(
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """The n timesteps a sampler visits, decreasing, int64, shape (n,).

    spacing (Lin et al. 2023, arXiv:2305.08891, Table 2, whose names diffusers uses):
      "leading"   t = i · ⌊T / n⌋ + steps_offset for i = n−1 … 0. SD v1's own (steps_offset 1, from
                  v1-inference's DDIM/PLMS code), so 50 steps visit 981, 961, …, 1.
      "trailing"  t = round(T − i · T / n) − 1 for i = 0 … n−1: always starts at T − 1.
      "linspace"  t = round(linspace(0, T − 1, n)), reversed.

    Where "leading" + steps_offset would pass the end of the table (n = 1000: t = 1000), the offset is lowered
    so the first step is T − 1. diffusers keeps t = 1000 there and then indexes past ᾱ's end. For 62 values of n
    (61, 103, …) diffusers' "trailing" float arange yields n + 1 timesteps, the last t = −1 (ᾱ[−1] = ᾱ_999);
    here always n. Otherwise the timesteps equal diffusers' for every n and spacing (tests/test_schedule.py).

    >>> spaced_timesteps(5).tolist()
    [801, 601, 401, 201, 1]
    >>> spaced_timesteps(5, "trailing").tolist()
    [999, 799, 599, 399, 199]
    >>> spaced_timesteps(5, "linspace").tolist()
    [999, 749, 500, 250, 0]
    >>> spaced_timesteps(1000)[:3].tolist()
    [999, 998, 997]
    """
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    n, T = num_inference_steps, num_train_timesteps
    i = torch.arange(n, dtype=torch.float64)
    if spacing == "leading":
        step_ratio = T // n
        steps_offset = min(steps_offset, T - 1 - (n - 1) * step_ratio)
        timesteps = i * step_ratio + steps_offset
    elif spacing == "trailing":
        delta = (T - T / n) - T  # −T/n rounded as numpy.arange rounds it, so .5 ties round as in diffusers
        timesteps = (T + i * delta).round() - 1
    elif spacing == "linspace":
        timesteps = (i * ((T - 1) / max(n - 1, 1))).round()  # numpy.linspace's arithmetic, for the same ties
    else:
        raise MinisdError(f"timestep spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    timesteps = timesteps.to(torch.int64)
    return timesteps.sort(descending=True).values


def check_timesteps(timesteps: Sequence[int] | Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Caller-given timesteps, checked: a non-empty 1-D integer sequence, strictly decreasing, in [0, T−1].
    Returns them as an int64 tensor of shape (n,).

    >>> check_timesteps([999, 500, 0]).tolist()
    [999, 500, 0]
    """
    t = torch.as_tensor(timesteps)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise MinisdError(f"timesteps must be a non-empty 1-D sequence of integers, got {timesteps!r}")
    t = t.to(torch.int64).cpu()
    if not (t[:-1] > t[1:]).all():
        raise MinisdError(f"timesteps must be strictly decreasing, got {t.tolist()}")
    if t[0] > num_train_timesteps - 1 or t[-1] < 0:
        raise MinisdError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {t.tolist()}")
    return t


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x_0) in one jump (DDPM eq. 4): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

    x0, noise: (b, c, h, w); t: an int or (b,) integer timesteps in [0, T−1]. Returns (b, c, h, w) in x0's dtype.
    The coefficients are computed in alphas_cumprod's dtype (float64) and cast last.
    """
    t = torch.as_tensor(t, device=alphas_cumprod.device).reshape(-1)
    alpha_bar_t = alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1)))  # (b, 1, 1, 1) broadcasts over c h w
    signal = alpha_bar_t.sqrt().to(device=x0.device, dtype=x0.dtype)
    noise_level = (1.0 - alpha_bar_t).sqrt().to(device=x0.device, dtype=x0.dtype)
    return signal * x0 + noise_level * noise


def velocity(x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """v_t = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0: what a v-prediction model learns to predict (Salimans & Ho 2022,
    arXiv:2202.00512, §4; SD 2's 768 models). x0, noise: (b, c, h, w); t: an int or (b,) integer timesteps.
    Returns (b, c, h, w) in x0's dtype, coefficients computed in alphas_cumprod's dtype (float64) as add_noise's.

    >>> velocity(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 999, torch.full((1000,), 0.25)).flatten()
    tensor([-0.8660])
    """
    t = torch.as_tensor(t, device=alphas_cumprod.device).reshape(-1)
    alpha_bar_t = alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1)))  # (b, 1, 1, 1)
    signal = alpha_bar_t.sqrt().to(device=x0.device, dtype=x0.dtype)
    noise_level = (1.0 - alpha_bar_t).sqrt().to(device=x0.device, dtype=x0.dtype)
    return signal * noise - noise_level * x0
