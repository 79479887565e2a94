"""SD 2.x's UNet is minisd's UNet with four config fields (heads per level, linear projections, a 1024-wide
context, attention upcast): it computes what diffusers' UNet2DConditionModel computes with SD 2's config, tiny and
full size. The network is the same for ε- and v-prediction models (what the output means is the sampler's
business, tests/test_samplers_v.py), so one full-size check covers v2-1_512 and v2-1_768; the 9-channel
512-inpainting UNet is checked beside it."""

from dataclasses import asdict, replace

import pytest
import torch
from diffusers import UNet2DConditionModel

from minisd.attention import attention_in_float32, attention_reference
from minisd.errors import MinisdError
from minisd.unet import UNet, UNetConfig
from tests.test_unet import REL_TOL, TIMESTEPS, check_parity, inputs, load_on_meta, make_reference

# stabilityai/stable-diffusion-2-1's unet/config.json, in UNetConfig's fields (the rest equals SD v1's).
SD2 = UNetConfig(
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True
)
# SD 2 with smaller numbers: a head count per level, unequal so that a mirrored (up path) mix-up shows.
TINY_SD2 = UNetConfig(
    block_out_channels=(32, 32, 64, 64),
    attention_head_dim=(1, 2, 2, 4),
    cross_attention_dim=48,
    use_linear_projection=True,
    upcast_attention=True,
)


@pytest.fixture(scope="module", params=[4, 9], ids=["txt2img", "inpaint"])
def tiny(request):
    config = replace(TINY_SD2, in_channels=request.param)
    ref = make_reference(config, seed=10)
    ours = UNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return config, ours, ref


@pytest.mark.parametrize(
    ("t_name", "h", "w"),
    [("scalar_t", 16, 16), ("per_sample_t", 16, 16), ("fractional_t", 16, 16), ("per_sample_t", 9, 13)],
)
def test_tiny_sd2_unet_matches_diffusers(tiny, t_name, h, w):
    config, ours, ref = tiny
    latents, context = inputs(config, h, w, seed=11)
    name = f"tiny SD 2 UNet in={config.in_channels} {h}x{w} {t_name}"
    check_parity("test_tiny_sd2_unet_matches_diffusers", name, ours, ref, latents, TIMESTEPS[t_name], context)


def test_linear_projection_weights_are_linear():
    """The keys stay SD v1's; only the projections' shapes change: [c, c] instead of [c, c, 1, 1]."""
    state_dict = UNet(TINY_SD2).state_dict()
    assert state_dict["down_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32)
    assert state_dict["mid_block.attentions.0.proj_out.weight"].shape == (64, 64)
    sd1 = UNet(replace(TINY_SD2, use_linear_projection=False, attention_head_dim=8)).state_dict()
    assert sd1.keys() == state_dict.keys() and sd1["down_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32, 1, 1)


def test_heads_per_level_are_64_wide():
    with torch.device("meta"):  # sizes only
        ours = UNet(SD2)
    widths = {m.to_q.out_features // m.heads for name, m in ours.named_modules() if name.endswith(("attn1", "attn2"))}
    assert widths == {64}
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 20
    assert ours.up_blocks[3].attentions[0].transformer_blocks[0].attn2.heads == 5


def test_upcast_attention_float16():
    """upcast_attention: float16 q, k, v whose q·kᵀ passes float16's largest value (65504). Written out in
    float16 (attention_reference) the scores overflow to inf and the output is NaN; attention_in_float32 gives
    the float32 attention of the same numbers, rounded once to float16 (within float16's 2⁻¹¹ relative step).

    Measured on this CPU: torch's fused float16 scaled_dot_product_attention accumulates in float32 already, so it
    does not overflow either (diffusers' default SDPA processor ignores the flag for that reason); the flag keeps
    the float32 explicit for every backend and kernel. tests/test_gpu.py runs the SD 2 UNet in float16 on CUDA."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=g).half() for _ in range(3))
    q, k = q * 60, k * 60  # |q·kᵀ| / √64 up to ~2e5
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    naive = attention_reference(q, k, v)
    assert not torch.isfinite(naive).all()
    got = attention_in_float32(q, k, v)
    want = attention_reference(q.float(), k.float(), v.float())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=2**-10, atol=2**-10)  # one float16 rounding of |out| <= ~4


def test_upcast_keeps_the_dtype():
    """A float16 SD 2 UNet with upcast_attention returns float16 (the float32 is internal)."""
    ours = UNet(TINY_SD2).half().eval()
    latents, context = inputs(TINY_SD2, 8, 8, seed=13)
    with torch.no_grad():
        out = ours(latents.half(), 500, context.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---- full SD 2 size (865M parameters, random weights) -------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size():
    """diffusers' full SD 2.1 UNet (3.5 GB in fp32) built once; ours shares its tensors (assign=True)."""
    ref = make_reference(SD2, seed=14)
    ours = load_on_meta(SD2, ref.state_dict())
    return ours, ref


@pytest.mark.parametrize(("t_name", "h", "w"), [("per_sample_t", 16, 16), ("fractional_t", 12, 20)])
def test_full_size_sd2_unet_matches_diffusers(full_size, t_name, h, w):
    ours, ref = full_size
    latents, context = inputs(SD2, h, w, seed=15)
    name = f"SD 2 UNet (full size) {h}x{w} {t_name}"
    check_parity("test_full_size_sd2_unet_matches_diffusers", name, ours, ref, latents, TIMESTEPS[t_name], context)


def test_full_size_sd2_inpainting_unet_matches_diffusers(full_size):
    """512-inpainting-ema: the same UNet with a 9-channel conv_in (and no upcast in its config)."""
    _, ref4 = full_size
    config = replace(SD2, in_channels=9, upcast_attention=False)
    state_dict = dict(ref4.state_dict())
    state_dict["conv_in.weight"] = 0.1 * torch.randn(320, 9, 3, 3, generator=torch.Generator().manual_seed(16))
    with torch.device("meta"):
        ref = UNet2DConditionModel(**asdict(config))
    ref.load_state_dict(state_dict, strict=True, assign=True)
    ours = load_on_meta(config, state_dict)
    latents, context = inputs(config, 16, 16, seed=17)
    check_parity(
        "test_full_size_sd2_inpainting_unet_matches_diffusers", "SD 2 inpainting UNet (full size) 16x16", ours,
        ref.eval(), latents, TIMESTEPS["per_sample_t"], context,
    )  # fmt: skip


def test_bad_heads_per_level_raise():
    with pytest.raises(MinisdError, match=r"attention_head_dim must be one head count or one per level \(4\)"):
        UNet(replace(TINY_SD2, attention_head_dim=(1, 2)))


assert REL_TOL == 1e-6  # the bar of tests/test_unet.py: fp32, same kernels in the same order (measured 0)
