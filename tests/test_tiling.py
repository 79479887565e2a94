"""VAE precision and memory: minisd.tiling's tiled decode/encode against diffusers' AutoencoderKL.enable_tiling()
(live, fp32 CPU, the same weights and tile settings), what tiling changes against the untiled decode, the float16
NaN fallback of pipelines.common.decode, and (GPU only) the memory tiling saves on SD v1's full-size VAE."""

import copy
import types
import warnings

import pytest
import torch
from diffusers import AutoencoderKL

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.pipelines import common
from minisd.pipelines.img2img import img2img
from minisd.pipelines.txt2img import txt2img
from minisd.tiling import tiled_decode, tiled_encode
from minisd.tokenizer import Tokenizer
from minisd.unet import UNet
from minisd.vae import LATENT_SCALE, VAE, VAEConfig
from tests.fakes import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE
from tests.parity import REPORT, assert_parity
from tests.reference import reference_vae

TINY = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)  # SD v1, small numbers
TILE, OVERLAP = 8, 2  # latent pixels: diffusers tile_latent_min_size 8, tile_sample_min_size 64, overlap factor 0.25
# Tiled minisd and tiled diffusers run the same per-tile networks (each bit-equal to its twin, test_vae.py) and the
# same blend arithmetic (weights y/extent in float64, rounded to float32, as diffusers' Python floats are): the
# measured difference is 0. 1e-5 of the output's scale (test_vae.py's bar) leaves room for another BLAS's rounding;
# a wrong tile start, blend direction, blend order or crop moves pixels by 1e-2 and more.
REL_TOL = 1e-5


def twins(seed: int = 0) -> tuple[VAE, AutoencoderKL]:
    """minisd's VAE and diffusers' AutoencoderKL at TINY with the same random weights (every weight matters:
    conv/linear N(0, 1/fan_in), norms 1 + N(0, 0.2²), biases N(0, 0.1²))."""
    ref = reference_vae(TINY, seed)
    ours = VAE(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling()
    ref.tile_latent_min_size = TILE
    ref.tile_sample_min_size = 8 * TILE
    ref.tile_overlap_factor = OVERLAP / TILE
    return ours, ref


@pytest.fixture(scope="module")
def vaes() -> tuple[VAE, AutoencoderKL]:
    return twins()


# 14×20 latents with tiles of 8 starting every 6: 3 rows × 4 columns, the last row 2 and the last column 2 wide
# (diffusers starts a tile at every stride inside the input, however narrow).
LATENT_SHAPE = (1, 4, 14, 20)


@torch.no_grad()
def test_tiled_decode_matches_diffusers(vaes):
    ours, ref = vaes
    vae_latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    image = tiled_decode(ours, vae_latents, tile_size=TILE, overlap=OVERLAP)
    ref_image = ref.decode(vae_latents).sample
    assert image.shape == (1, 3, 112, 160)
    assert_parity("test_tiled_decode_matches_diffusers", "tiled VAE decode", image, ref_image, REL_TOL)


@torch.no_grad()
def test_tiled_encode_matches_diffusers(vaes):
    ours, ref = vaes
    image = torch.rand((1, 3, 112, 160), generator=torch.Generator().manual_seed(2)) * 2 - 1
    posterior = tiled_encode(ours, image, tile_size=TILE, overlap=OVERLAP)
    ref_posterior = ref.encode(image).latent_dist
    test = "test_tiled_encode_matches_diffusers"
    assert_parity(test, "tiled VAE encode mean", posterior.mean, ref_posterior.mean, REL_TOL)
    assert_parity(test, "tiled VAE encode logvar", posterior.logvar, ref_posterior.logvar, REL_TOL)


@torch.no_grad()
def test_one_tile_or_less_is_the_plain_decode(vaes):
    ours, _ = vaes
    vae_latents = torch.randn((1, 4, TILE, TILE - 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiled_decode(ours, vae_latents, TILE, OVERLAP), ours.decode(vae_latents))
    image = torch.rand((1, 3, 8 * TILE, 8 * TILE), generator=torch.Generator().manual_seed(4))
    assert torch.equal(tiled_encode(ours, image, TILE, OVERLAP).mean, ours.encode(image).mean)


@torch.no_grad()
def test_tiled_against_untiled(vaes):
    """What tiling costs: each tile is decoded alone, so the decoder's GroupNorm statistics and its mid-block
    self-attention (which sees every latent pixel of its input) differ per tile, and the difference is not confined
    to the seams. Measured here (recorded in the summary as information, not a parity claim): |tiled − untiled|
    where tiles were cross-faded and where they were not, and the same for tiles pasted side by side without
    overlap (overlap 0), which the cross-fade beats."""
    ours, _ = vaes
    vae_latents = torch.randn((1, 4, 20, 20), generator=torch.Generator().manual_seed(5))
    untiled = ours.decode(vae_latents)
    scale = untiled.abs().max()
    test = "test_tiled_against_untiled"
    mean_errors = {}
    for overlap in (OVERLAP, 0):
        tiled = tiled_decode(ours, vae_latents, TILE, overlap)
        stride = 8 * (TILE - overlap)
        near_seam = torch.zeros(160, dtype=torch.bool)  # image rows/columns within 8 px of where two tiles meet
        for start in range(stride, 160, stride):
            near_seam[max(start - 8, 0) : start + 8 * max(overlap, 1)] = True
        seams = near_seam[:, None] | near_seam[None, :]
        err = (tiled - untiled).abs().amax(dim=1)[0] / scale  # (H, W): the largest change over channels
        mean_errors[overlap] = err.mean().item()
        what = f"tiled (overlap {overlap}) vs untiled"
        REPORT.append((test, f"{what}: max (info)", err.max().item(), 1.0))
        REPORT.append((test, f"{what}: mean near seams (info)", err[seams].mean().item(), 1.0))
        REPORT.append((test, f"{what}: mean elsewhere (info)", err[~seams].mean().item(), 1.0))
    assert mean_errors[OVERLAP] < mean_errors[0]


def test_bad_tile_settings(vaes):
    ours, _ = vaes
    vae_latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(MinisdError, match="tile_size must be an integer >= 1"):
        tiled_decode(ours, vae_latents, tile_size=0)
    with pytest.raises(MinisdError, match=r"overlap must be an integer in \[0, tile_size=8\), got 8"):
        tiled_decode(ours, vae_latents, tile_size=8, overlap=8)
    with pytest.raises(MinisdError, match="vae_latents must have shape"):
        tiled_decode(ours, torch.zeros(1, 3, 16, 16), 8, 2)
    with pytest.raises(MinisdError, match="multiples of 8"):
        tiled_encode(ours, torch.zeros(1, 3, 100, 100), 8, 2)


@torch.no_grad()
def test_decode_helper_tiling(vaes):
    """pipelines.common.decode(tiling=True) is tiled_decode at diffusers' default 64-latent tiles."""
    ours, _ = vaes
    latents = torch.randn((1, 4, 65, 9), generator=torch.Generator().manual_seed(6))  # two tiles: 64 and 17 high
    assert torch.equal(common.decode(ours, latents, tiling=True), tiled_decode(ours, latents / LATENT_SCALE, 64, 16))


# ---------------------------------------------------------------------------------------------------------------
# float16 NaN fallback


def overflowing_vae(vaes) -> tuple[VAE, VAE]:
    """(fp32 VAE, its fp16 copy) with the same values (weights rounded through fp16), whose decoder overflows
    float16 but not float32: one conv of the last up block scaled by 1e5 makes activations ~4e5 > 65504; the
    GroupNorm right after it normalises them again, so in float32 the output is an ordinary image while in
    float16 the inf becomes NaN."""
    vae32 = copy.deepcopy(vaes[0])
    with torch.no_grad():
        vae32.decoder.up_blocks[-1].resnets[0].conv1.weight.mul_(1e5)
    vae32 = vae32.half().float()  # the values both copies hold
    return vae32, copy.deepcopy(vae32).half()


@torch.no_grad()
def test_fp16_nan_falls_back_to_fp32(vaes):
    vae32, vae16 = overflowing_vae(vaes)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7)).half()  # what an fp16 UNet gives
    expected = common.decode(vae32, latents)  # latents / LATENT_SCALE in fp16, then decoded in fp32
    assert torch.isfinite(expected).all()
    assert not torch.isfinite(vae16.decode(latents / LATENT_SCALE)).all(), "the fp16 VAE must overflow"
    with pytest.warns(UserWarning, match="torch.float16 VAE decoded to NaN/inf; decoding again with a float32"):
        image = common.decode(vae16, latents)
    assert image.dtype == torch.float16
    assert torch.equal(image, expected.half())  # exactly the fp32 decode, in the VAE's dtype
    assert vae16.post_quant_conv.weight.dtype == torch.float16  # the caller's VAE is left as it was


@torch.no_grad()
def test_fp16_without_overflow_does_not_warn(vaes):
    vae16 = copy.deepcopy(vaes[0]).half()
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8)).half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = common.decode(vae16, latents)
    assert image.dtype == torch.float16 and torch.isfinite(image).all()


@torch.no_grad()
def test_nonfinite_latents_are_not_redecoded(vaes):
    vae16 = copy.deepcopy(vaes[0]).half()
    latents = torch.zeros((1, 4, 8, 8), dtype=torch.float16)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="the UNet overflowed, not the VAE"):
        common.decode(vae16, latents)


# ---------------------------------------------------------------------------------------------------------------
# Memory, on a GPU: SD v1's full-size VAE (random weights), float16


def peak_decode_bytes(vae: VAE, vae_latents: torch.Tensor, tile_size: int | None) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad():
        if tile_size is None:
            image = vae.decode(vae_latents)
        else:
            image = tiled_decode(vae, vae_latents, tile_size, tile_size // 4)
    torch.cuda.synchronize()
    del image
    return torch.cuda.max_memory_allocated() - start


@pytest.mark.gpu
def test_tiling_bounds_decoder_memory_cuda():
    """A 512×512 decode in 256-pixel tiles and a 1024×1024 decode in 512-pixel tiles need less memory than the
    whole decode; recorded in the summary (GiB)."""
    vae = VAE(VAEConfig()).to("cuda", torch.float16).eval()
    for side, tile in ((64, 32), (128, 64)):
        vae_latents = torch.randn(1, 4, side, side, device="cuda", dtype=torch.float16)
        whole = peak_decode_bytes(vae, vae_latents, None)
        tiled = peak_decode_bytes(vae, vae_latents, tile)
        REPORT.append(
            ("test_tiling_bounds_decoder_memory_cuda", f"{8 * side}px whole decode GiB (info)", whole / 2**30, 0)
        )
        REPORT.append(
            ("test_tiling_bounds_decoder_memory_cuda", f"{8 * side}px tiles {8 * tile}px GiB (info)", tiled / 2**30, 0)
        )
        assert tiled < whole


# ---------------------------------------------------------------------------------------------------------------
# The pipelines' option


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    return types.SimpleNamespace(
        tokenizer=Tokenizer.from_default(),
        text_encoder=TextEncoder(TINY_TEXT_ENCODER).eval(),
        vae=VAE(TINY_VAE).eval(),
        unet=UNet(TINY_UNET).eval(),
    )


def test_pipelines_take_vae_tiling(components):
    """vae_tiling reaches the decode and encode (an image of one tile or less is unchanged by it) and must be a bool."""
    image = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(9)) * 2 - 1
    for pipeline, extra in ((txt2img, {"height": 64, "width": 64}), (img2img, {"image": image, "strength": 1.0})):
        runs = [
            pipeline(components, "a cat", num_inference_steps=1, seed=0, output_type="pt", vae_tiling=tiling, **extra)
            for tiling in (False, True)
        ]
        assert torch.equal(runs[0], runs[1])
        with pytest.raises(MinisdError, match="vae_tiling must be a bool, got 'yes'"):
            pipeline(components, "a cat", vae_tiling="yes", **extra)
