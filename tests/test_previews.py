"""Per-step previews: every sampler's x0_pred equals diffusers' x̂_0 (`pred_original_sample` where diffusers states
one) stepped side by side; x0_preview is the VAE decode of it; the cheap latent -> RGB map is the published table,
and fit_latent_rgb recovers a known linear map."""

import inspect

import pytest
import torch
from diffusers import DDIMScheduler

from minisd.errors import MinisdError
from minisd.images import image_to_pixels
from minisd.pipelines import common
from minisd.pipelines.previews import (
    LATENT_RGB_WEIGHT,
    fit_latent_rgb,
    latents_to_rgb,
    x0_preview,
)
from minisd.samplers import get_sampler, sampler_names
from minisd.samplers.euler import EulerSampler
from minisd.vae import VAE, VAEConfig
from tests.parity import assert_parity
from tests.reference import SD15_SCHEDULER_CONFIG, diffusers_twin

# diffusers computes ᾱ and σ in float32, minisd in float64 and casts last: ~1e-7 relative per value (x_t − σ·ε
# cancels to x̂_0, whose scale is about that of x, so the relative error stays near float32's 6e-8 · σ_max). 1e-5
# leaves room; using the σ or ᾱ of the wrong step changes x̂_0 by 1e-2 and more, and DPM++'s x_t read as x = x_t/√ᾱ
# by 14.6 at its first step.
REL_TOL = 1e-5
STEPS = 8


def reference_x0(name: str, ref, out, eps, t, x, ddim) -> torch.Tensor:
    """diffusers' x̂_0 for the model call just stepped (ref.step(eps, t, x) returned `out`)."""
    if name == "PLMS":  # PNDMScheduler states no x̂_0: DDIM's pred_original_sample is the ᾱ family's at (ε, t, x_t)
        return ddim.step(eps, t, x).pred_original_sample
    if name.startswith("DPM++"):  # DPMSolverMultistepScheduler keeps its data prediction x_θ, not in its output
        return ref.model_outputs[-1]
    return out.pred_original_sample


@pytest.mark.parametrize("name", sampler_names())
@torch.no_grad()
def test_x0_pred_matches_diffusers(name):
    """Step both side by side with the same ε (a fixed function of x) and compare x̂_0 at every model call."""
    ours, ref = get_sampler(name), diffusers_twin(name)
    ddim = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ours.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    ddim.set_timesteps(STEPS)
    assert torch.equal(ours.timesteps.float(), ref.timesteps.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=g) * ours.init_noise_sigma
    takes_generator = "generator" in inspect.signature(ref.step).parameters  # DDPM draws noise, Heun takes none
    x0_ours, x0_ref = [], []
    for t in ours.timesteps:
        eps = torch.sin(3 * x) + 0.1 * torch.randn(x.shape, generator=g)  # any ε: the formula is what is tested
        x0_ours.append(ours.x0_pred(eps, t, x))
        extra = {"generator": torch.Generator().manual_seed(1)} if takes_generator else {}
        out = ref.step(eps, t, x, **extra)
        x0_ref.append(reference_x0(name, ref, out, eps, t, x, ddim))
        ours.step(eps, t, x, generator=torch.Generator().manual_seed(1))  # keeps minisd's sampler in its run
        x = out.prev_sample  # both go on from diffusers' x
    test = f"test_x0_pred_matches_diffusers[{name}]"
    component = f"{name} x0 predictions, all {len(x0_ref)} calls"
    assert_parity(test, component, torch.stack(x0_ours), torch.stack(x0_ref), REL_TOL)


@torch.no_grad()
def test_x0_preview_is_the_decode_of_x0_pred():
    vae = VAE(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)).eval()
    sampler = EulerSampler()
    sampler.set_timesteps(4)
    sampler.step(torch.zeros(2, 4, 6, 5), sampler.timesteps[0], torch.zeros(2, 4, 6, 5))  # now at the 2nd call
    t = sampler.timesteps[1]
    g = torch.Generator().manual_seed(2)
    latents, eps = torch.randn((2, 4, 6, 5), generator=g) * 3, torch.randn((2, 4, 6, 5), generator=g)
    pixels = x0_preview(sampler, eps, t, latents, vae)
    assert pixels.shape == (2, 12, 10, 3) and pixels.dtype == torch.uint8
    expected = common.decode(vae, latents - sampler.sigmas[1].item() * eps)  # D(x; σ_1) = x − σ_1·ε
    assert torch.equal(pixels, image_to_pixels(expected))


def test_latents_to_rgb_uses_the_table():
    """Each latent channel alone at 1 gives that channel's row of the table: (row + 1)/2 · 255, rounded."""
    latents = torch.eye(4).reshape(4, 4, 1, 1)  # latent pixel k: channel k at 1
    rgb = latents_to_rgb(latents, as_image=True).reshape(4, 3)
    torch.testing.assert_close(rgb, torch.tensor(LATENT_RGB_WEIGHT), rtol=0, atol=0)
    pixels = latents_to_rgb(latents.half()).reshape(4, 3)
    expected = ((torch.tensor(LATENT_RGB_WEIGHT) + 1) / 2 * 255).round().to(torch.uint8)
    assert torch.equal(pixels, expected)
    assert latents_to_rgb(torch.zeros(2, 4, 3, 5)).shape == (2, 3, 5, 3)


def test_fit_latent_rgb_recovers_a_known_map():
    """Images made from latents by a known linear map (one colour per 8×8 block, then a little noise) give the map
    back. Least squares in float64 over 2·16·16 pixels: exact up to the noise's effect (~1e-3)."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn((4, 3), generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    latents = torch.randn((2, 4, 16, 16), generator=g)
    rgb = torch.einsum("bchw,cr->brhw", latents, weight) + bias.reshape(1, 3, 1, 1)
    image = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
    image = image + 0.01 * torch.randn(image.shape, generator=g)
    fitted_weight, fitted_bias = fit_latent_rgb(latents, image)
    torch.testing.assert_close(fitted_weight, weight.double(), rtol=0, atol=2e-3)
    torch.testing.assert_close(fitted_bias, bias.double(), rtol=0, atol=2e-3)
    # and the fitted map drives the preview
    pixels = latents_to_rgb(latents, fitted_weight, fitted_bias).int()
    assert (pixels - image_to_pixels(rgb).int()).abs().max() <= 1  # the 2e-3 fit error moves a pixel 1 level at most


def test_bad_input():
    with pytest.raises(MinisdError, match="latents must be a"):
        latents_to_rgb(torch.zeros(1, 3, 4, 4))
    with pytest.raises(MinisdError, match="weight must be"):
        latents_to_rgb(torch.zeros(1, 4, 4, 4), weight=torch.zeros(3, 4))
    vae = VAE(VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4))
    with pytest.raises(MinisdError, match="sampler must be a minisd Sampler"):
        x0_preview(object(), torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2), vae)
    sampler = EulerSampler()
    sampler.set_timesteps(4)
    with pytest.raises(MinisdError, match=r"t must be sampler.timesteps\[0\]"):  # x̂_0 of a call not made now
        sampler.x0_pred(torch.zeros(1, 4, 2, 2), sampler.timesteps[1], torch.zeros(1, 4, 2, 2))
