"""The SD v1 noise schedule: β and ᾱ as the official checkpoints store them, the three timestep spacings as
diffusers computes them, add_noise, the image-to-image start and the noise draws, against diffusers live."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from minisd.errors import MinisdError
from minisd.noise import randn
from minisd.samplers import schedule
from minisd.samplers.base import img2img_start, inference_timesteps
from tests.parity import assert_parity

# SD v1.5's scheduler_config.json (the values every alpha-sampler twin is built from).
SD_V1 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)
ALPHAS_CUMPROD = schedule.alphas_cumprod_from_betas(schedule.scaled_linear_betas())


def test_alphas_cumprod_equals_the_checkpoints_buffer():
    """ᾱ exactly as CompVis LDM registers `alphas_cumprod` in every official SD v1 checkpoint: make_beta_schedule
    ("linear") in numpy float64, cumprod, stored as float32."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ldm = np.cumprod(1.0 - betas, axis=0).astype(np.float32)
    ours = ALPHAS_CUMPROD.to(torch.float32).numpy()
    assert np.array_equal(ours, ldm), f"max |diff| {np.abs(ours - ldm).max():.3g}"


def test_schedule_matches_diffusers():
    """diffusers computes β and ᾱ in float32 (cumprod included), minisd in float64: float32's rounding over a
    1000-term product bounds the difference (measured ~1e-6 relative)."""
    ref = DDIMScheduler(**SD_V1)
    assert_parity("test_schedule_matches_diffusers", "betas", schedule.scaled_linear_betas(), ref.betas, 1e-6)
    assert_parity("test_schedule_matches_diffusers", "alphas_cumprod", ALPHAS_CUMPROD, ref.alphas_cumprod, 1e-5)
    ref_sigmas = ((1 - ref.alphas_cumprod.double()) / ref.alphas_cumprod.double()) ** 0.5
    sigmas = schedule.sigmas_from_alphas_cumprod(ALPHAS_CUMPROD)
    assert_parity("test_schedule_matches_diffusers", "sigmas", sigmas, ref_sigmas, 1e-5)


@pytest.mark.parametrize("spacing", schedule.SPACINGS)
def test_spaced_timesteps_match_diffusers_for_every_n(spacing):
    """Every n in 1…1000: n timesteps, decreasing, distinct, inside [0, 999], and equal to diffusers' timesteps.
    Two places where diffusers is wrong: 1000 "leading" steps, where steps_offset pushes the first step to
    t = 1000, past ᾱ's table; and "trailing" for 62 values of n, where a float arange yields an extra last step
    at t = −1 (which then reads ᾱ[−1] = ᾱ_999, the noisiest level, as the last step's)."""
    ref = DDIMScheduler(**SD_V1, timestep_spacing=spacing)
    extra_step = []
    for n in range(1, 1001):
        ours = schedule.spaced_timesteps(n, spacing)
        assert ours.dtype == torch.int64 and ours.shape == (n,)
        assert (ours[:-1] > ours[1:]).all(), f"{spacing} n={n}: not strictly decreasing"
        assert 0 <= ours[-1] and ours[0] <= 999, f"{spacing} n={n}: outside [0, 999]"
        ref.set_timesteps(n)
        if spacing == "leading" and n == 1000:
            assert ref.timesteps[0] == 1000 and ours[0] == 999, "diffusers: t=1000 is past the table; minisd: 999"
            assert ours.tolist() == list(range(999, -1, -1))
        elif len(ref.timesteps) == n + 1:
            assert spacing == "trailing" and ref.timesteps[-1] == -1
            assert ours.tolist() == ref.timesteps[:n].tolist(), f"{spacing} n={n}"
            extra_step.append(n)
        else:
            assert ours.tolist() == ref.timesteps.tolist(), f"{spacing} n={n}"
    assert len(extra_step) == (62 if spacing == "trailing" else 0) and extra_step[:2] == [61, 103][: len(extra_step)]


def test_sd_v1_timesteps():
    """SD v1's 50 DDIM/PLMS steps (v1-inference, steps_offset 1): 981, 961, …, 1."""
    assert schedule.spaced_timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, "10", True, None])
def test_bad_num_inference_steps(bad):
    with pytest.raises(MinisdError, match="num_inference_steps") as e:
        schedule.spaced_timesteps(bad)
    assert "\n" not in str(e.value)


def test_bad_spacing():
    with pytest.raises(MinisdError, match="spacing"):
        schedule.spaced_timesteps(10, "quadratic")


@pytest.mark.parametrize(
    ("bad", "match"),
    [([], "non-empty"), ([[999, 0]], "1-D"), ([999.0, 0.0], "integers"), ([5, 5, 0], "decreasing"),
     ([0, 10], "decreasing"), ([1000, 0], r"\[0, 999\]"), ([10, -1], r"\[0, 999\]")],
)  # fmt: skip
def test_bad_caller_timesteps(bad, match):
    with pytest.raises(MinisdError, match=match) as e:
        schedule.check_timesteps(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_matches_diffusers(dtype):
    """q(x_t | x_0) at a batch of timesteps. diffusers takes √ᾱ from its float32 table: ~1e-6 relative apart."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(5, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([999, 981, 500, 1, 0])
    ref = DDIMScheduler(**SD_V1).add_noise(x0, noise, t)
    ours = schedule.add_noise(x0, noise, t, ALPHAS_CUMPROD)
    assert ours.dtype == dtype
    assert_parity("test_add_noise_matches_diffusers", f"add_noise {dtype}", ours, ref, 1e-5)


def test_img2img_start_matches_diffusers_pipelines():
    """The pipelines' formula, for every n in 1…100 and strengths on a grid, where at least one step runs."""
    for n in range(1, 101):
        for strength in np.linspace(0.01, 1.0, 100).tolist():
            init_timestep = min(int(n * strength), n)  # pipeline_stable_diffusion_img2img.get_timesteps
            if init_timestep == 0:
                with pytest.raises(MinisdError, match="runs no denoising step"):
                    img2img_start(n, strength)
            else:
                assert img2img_start(n, strength) == n - init_timestep


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, math.nan, math.inf, "1", True])
def test_bad_strength(bad):
    with pytest.raises(MinisdError, match="strength") as e:
        inference_timesteps(10, bad)
    assert "\n" not in str(e.value)


def test_inference_timesteps_needs_exactly_one_schedule():
    with pytest.raises(MinisdError, match="not both"):
        inference_timesteps(10, timesteps=[999, 0])
    with pytest.raises(MinisdError, match="neither"):
        inference_timesteps()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_randn_is_diffusers_draw(dtype):
    """Same generator state -> bit-identical noise, for each dtype (a float16 draw is its own sequence)."""
    like = torch.empty(2, 4, 8, 8, dtype=dtype)
    ours = randn(like.shape, torch.Generator().manual_seed(3), dtype, like.device)
    ref = randn_tensor(like.shape, generator=torch.Generator().manual_seed(3), device=like.device, dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, ref)
