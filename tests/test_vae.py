"""minisd.vae.VAE computes what diffusers' AutoencoderKL computes, with the same state dict (live, fp32 CPU)."""

import pytest
import torch
from diffusers import AutoencoderKL

from minisd.errors import MinisdError
from minisd.vae import LATENT_SCALE, VAE, Downsample, VAEConfig
from tests.parity import assert_parity, relative_error
from tests.reference import reference_vae

TINY = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)  # SD v1, smaller numbers
FULL = VAEConfig()  # SD v1: 83.7M parameters

# fp32 on both sides, the same convolutions, GroupNorms and fused attention on the same memory layouts: on the
# CPU where this was written the outputs are bit-equal (measured 0). Another BLAS, thread count or kernel choice
# may round differently per op (~1e-7 of the scale); with the two sides' layouts not aligned the full decoder
# measured 4e-6, so 1e-5 (10× under the 1e-4 bar) leaves room for rounding while a wrong weight, a missing
# residual or a shifted pad gives errors of order 1e-1 (see test_symmetric_pad_would_not_match).
REL_TOL = 1e-5


def ours_on_meta(config: VAEConfig, state_dict: dict) -> VAE:
    """Build on the meta device (no init spent), then take the reference's tensors as they are."""
    with torch.device("meta"):
        ours = VAE(config)
    ours.load_state_dict(state_dict, strict=True, assign=True)
    for name, tensor in [*ours.named_parameters(), *ours.named_buffers()]:
        assert not tensor.is_meta, f"{name} left on the meta device"
    return ours.eval()


def check_parity(test: str, config: VAEConfig, ours: VAE, ref: AutoencoderKL, image: torch.Tensor) -> None:
    """Encoder moments, posterior sample with one seed, decoder output: each against the reference."""
    with torch.no_grad():
        posterior = ours.encode(image)
        ref_posterior = ref.encode(image).latent_dist
        b, h, w = image.shape[0], image.shape[2] // 8, image.shape[3] // 8
        assert posterior.mean.shape == (b, config.latent_channels, h, w)

        def run_ours():
            return ours.encode(image).mean

        def run_ref():
            return ref.encode(image).latent_dist.mean

        models = (ours, ref, run_ours, run_ref)
        assert_parity(test, "VAE encoder mean", posterior.mean, ref_posterior.mean, REL_TOL, models)
        assert_parity(test, "VAE encoder logvar", posterior.logvar, ref_posterior.logvar, REL_TOL, models)
        assert_parity(test, "VAE posterior std", posterior.std, ref_posterior.std, REL_TOL, models)

        sample = posterior.sample(torch.Generator().manual_seed(7))
        ref_sample = ref_posterior.sample(generator=torch.Generator().manual_seed(7))
        assert_parity(test, "VAE posterior sample (same generator)", sample, ref_sample, REL_TOL, models)
        assert not torch.equal(sample, posterior.mode())  # the sample really is noisy

        # Decode the reference's own sample, so the decoder is tested on the same input in both.
        def run_ours_dec():
            return ours.decode(ref_sample)

        def run_ref_dec():
            return ref.decode(ref_sample).sample

        decoded, ref_decoded = run_ours_dec(), run_ref_dec()
        assert decoded.shape == image.shape
        assert_parity(test, "VAE decoder output", decoded, ref_decoded, REL_TOL, (ours, ref, run_ours_dec, run_ref_dec))


def test_tiny_parity():
    ref = reference_vae(TINY, seed=0)
    ours = VAE(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    check_parity("test_tiny_parity", TINY, ours, ref, image)
    # A contiguous latent, as the pipelines pass (the posterior sample above is a view of the moments).
    vae_latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        decoded, ref_decoded = ours.decode(vae_latents), ref.decode(vae_latents).sample
    assert_parity("test_tiny_parity", "VAE decoder output (contiguous latents)", decoded, ref_decoded, REL_TOL)


def test_full_sd_v1_parity_meta_construction():
    """The full SD v1 size, random weights, built on meta and loaded with assign=True."""
    ref = reference_vae(FULL, seed=0)
    ours = ours_on_meta(FULL, ref.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    check_parity("test_full_sd_v1_parity_meta_construction", FULL, ours, ref, image)


def test_state_dict_keys_equal_diffusers():
    ours, ref = VAE(TINY), reference_vae(TINY, seed=0)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for key in ("encoder.down_blocks.0.downsamplers.0.conv.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight"):
        assert key in ours.state_dict()
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in ours.state_dict()


def test_downsample_pads_bottom_right():
    """With a kernel that copies its centre tap, output pixel (i, j) is input pixel (2i+1, 2j+1): the (0, 1, 0, 1)
    pad. A symmetric pad would give (2i, 2j), shifting features by one pixel per level."""
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0
        down.conv.bias.zero_()
    x = torch.arange(8 * 6, dtype=torch.float32).reshape(1, 1, 8, 6)
    torch.testing.assert_close(down(x), x[:, :, 1::2, 1::2], rtol=0, atol=0)


def test_symmetric_pad_would_not_match():
    """A port with the symmetric pad (the classic bug) fails parity by orders of magnitude over REL_TOL."""
    ref = reference_vae(TINY, seed=0)
    ours = VAE(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(image).latent_dist.mean
        got = ours.encode(image).mean
        for block in ref.encoder.down_blocks:  # turn the reference into the symmetric-pad variant
            for downsampler in block.downsamplers or []:
                downsampler.padding = 1  # diffusers then skips its (0, 1, 0, 1) F.pad ...
                downsampler.conv.padding = (1, 1)  # ... and the conv pads 1 on every side
        symmetric = ref.encode(image).latent_dist.mean
    assert symmetric.shape == want.shape
    assert relative_error(got, want) <= REL_TOL
    assert relative_error(symmetric, want) > 1000 * REL_TOL


def test_posterior_clamps_logvar_and_mode_is_mean():
    ours = VAE(TINY)
    with torch.no_grad():
        ours.quant_conv.bias[4:] = 100.0  # logvar channels far above the clamp
    posterior = ours.encode(torch.zeros(1, 3, 16, 16))
    assert posterior.logvar.max() == 20.0
    assert torch.equal(posterior.mode(), posterior.mean)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_bad_shapes_raise_one_line_errors():
    vae = VAE(TINY)
    for image in (torch.zeros(1, 3, 60, 64), torch.zeros(1, 4, 64, 64), torch.zeros(3, 64, 64)):
        with pytest.raises(MinisdError) as info:
            vae.encode(image)
        assert "\n" not in str(info.value)
    with pytest.raises(MinisdError, match="vae_latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_latent_scale():
    assert LATENT_SCALE == 0.18215  # v1-inference.yaml scale_factor
