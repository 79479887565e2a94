"""minisd's UNet computes what diffusers' UNet2DConditionModel computes, with the same state dict: at a tiny
config, at the full SD v1 size (random weights) and for the 9-channel inpainting UNet."""

import inspect
from dataclasses import asdict

import pytest
import torch
from diffusers import UNet2DConditionModel

from minisd.errors import MinisdError
from minisd.unet import UNet, UNetConfig
from tests.parity import assert_parity

# SD v1 with smaller numbers: 4 levels, 8 heads (head width 4 at 32 channels), 32 GroupNorm groups.
TINY = {"block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32}

# Both sides run the same fp32 CPU kernels (conv, GroupNorm, scaled_dot_product_attention) in the same order, so
# the measured error is 0 (bit-identical). The bar leaves room for a different summation order (~1e-7 per op)
# while catching real slips the loose 1e-4 would miss: the SpatialTransformer GroupNorms at eps 1e-5 instead of
# 1e-6 move the tiny UNet's output by 2.3e-5 of its scale (1.4e-6 when only the mid block's one is wrong).
REL_TOL = 1e-6

TIMESTEPS = {
    "scalar_t": 981,  # one Python int for the whole batch
    "per_sample_t": torch.tensor([999, 37]),  # one timestep per sample
    "fractional_t": torch.tensor([700.25, 12.5]),  # k-diffusion samplers (Euler, LMS) pass fractional timesteps
}


def make_reference(config: UNetConfig, seed: int) -> UNet2DConditionModel:
    """diffusers' UNet from our config (the field names are its config keys), norms given random affine
    parameters: diffusers initialises them to weight 1, bias 0, which would hide a swapped or missing norm."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**asdict(config)).eval()
    randomize_norms(ref, seed)
    return ref


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))


def load_on_meta(config: UNetConfig, state_dict: dict[str, torch.Tensor]) -> UNet:
    """Build on the meta device (no memory, no init) and take the reference's tensors as our parameters."""
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(state_dict, strict=True, assign=True)
    return ours.eval()


def inputs(config: UNetConfig, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config.in_channels, h, w, generator=g)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    return latents, context


def check_parity(test: str, component: str, ours: UNet, ref: UNet2DConditionModel, latents, t, context) -> None:
    def run_ours():
        return ours(latents, t, context)

    def run_ref():
        return ref(latents, t, encoder_hidden_states=context).sample

    with torch.no_grad():
        eps, eps_ref = run_ours(), run_ref()
    assert eps.shape == (latents.shape[0], 4, *latents.shape[-2:])
    assert_parity(test, component, eps, eps_ref, REL_TOL, models=(ours, ref, run_ours, run_ref))


# ---- tiny config ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[4, 9], ids=["txt2img", "inpaint"])
def tiny(request):
    """The tiny reference, and ours built the ordinary way (random init, then a strict load)."""
    config = UNetConfig(in_channels=request.param, **TINY)
    ref = make_reference(config, seed=0)
    ours = UNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return config, ours, ref


@pytest.mark.parametrize("t_name", list(TIMESTEPS))
# 9x13 and 5x7: latent sizes that are not multiples of 8 (72x104-pixel images), where the up path must
# upsample to the odd size of each skip as diffusers' forward_upsample_size does.
@pytest.mark.parametrize(("h", "w"), [(16, 16), (16, 24), (9, 13), (5, 7)], ids=["16x16", "16x24", "9x13", "5x7"])
def test_tiny_unet_matches_diffusers(tiny, t_name, h, w):
    config, ours, ref = tiny
    latents, context = inputs(config, h, w, seed=1)
    name = f"tiny UNet in={config.in_channels} {h}x{w} {t_name}"
    check_parity("test_tiny_unet_matches_diffusers", name, ours, ref, latents, TIMESTEPS[t_name], context)


def test_meta_construction_leaves_nothing_on_meta():
    config = UNetConfig(**TINY)
    ref = make_reference(config, seed=0)
    ours = load_on_meta(config, ref.state_dict())
    assert list(ours.buffers()) == []  # frequencies are computed in forward, nothing to initialise
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert ours.state_dict().keys() == ref.state_dict().keys()


# ---- full SD v1 size (860M parameters, random weights) ------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size():
    """diffusers' full SD v1 UNet (3.4 GB in fp32) built once; ours shares its tensors (assign=True), so the pair
    costs one copy of the weights."""
    config = UNetConfig()
    ref = make_reference(config, seed=0)
    ours = load_on_meta(config, ref.state_dict())
    return config, ours, ref


@pytest.mark.parametrize(
    ("t_name", "h", "w"),
    [("scalar_t", 16, 16), ("per_sample_t", 16, 16), ("per_sample_t", 16, 24), ("scalar_t", 9, 13)],
)
def test_full_size_unet_matches_diffusers(full_size, t_name, h, w):
    config, ours, ref = full_size
    latents, context = inputs(config, h, w, seed=2)
    name = f"SD v1 UNet (full size) {h}x{w} {t_name}"
    check_parity("test_full_size_unet_matches_diffusers", name, ours, ref, latents, TIMESTEPS[t_name], context)


def test_full_size_inpainting_unet_matches_diffusers(full_size):
    """The 9-channel UNet differs only in conv_in: reuse the full-size tensors, with a new random conv_in."""
    _, _, ref4 = full_size
    config = UNetConfig(in_channels=9)
    state_dict = dict(ref4.state_dict())
    g = torch.Generator().manual_seed(3)
    state_dict["conv_in.weight"] = 0.1 * torch.randn(320, 9, 3, 3, generator=g)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**asdict(config))
    ref.load_state_dict(state_dict, strict=True, assign=True)
    ref.eval()
    ours = load_on_meta(config, state_dict)
    latents, context = inputs(config, 16, 16, seed=4)
    name = "SD v1 inpainting UNet (full size) 16x16 per_sample_t"
    check_parity(
        "test_full_size_inpainting_unet_matches_diffusers", name, ours, ref, latents, TIMESTEPS["per_sample_t"], context
    )


# The UNet keys of SD v1's diffusers config.json (e.g. runwayml/stable-diffusion-v1-5, unet/config.json).
SD_V1_CONFIG_JSON = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}


def test_config_fields_are_diffusers_keys_with_sd_v1_defaults():
    diffusers_keys = inspect.signature(UNet2DConditionModel.__init__).parameters
    fields = asdict(UNetConfig())
    assert all(key in diffusers_keys for key in fields)
    from_json = {key: tuple(v) if isinstance(v, list) else v for key, v in SD_V1_CONFIG_JSON.items()}
    assert UNetConfig(**from_json) == UNetConfig()


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latents_shape", "t", "context_shape", "message"),
    [
        ((2, 9, 16, 16), 10, (2, 77, 32), "latents must be"),  # 9 channels into the 4-channel UNet
        ((2, 4, 16), 10, (2, 77, 32), "latents must be"),
        ((2, 4, 0, 16), 10, (2, 77, 32), "must be positive"),
        ((2, 4, 16, 16), 10, (2, 77, 768), "context must be"),  # wrong width
        ((2, 4, 16, 16), 10, (1, 77, 32), "context must be"),  # wrong batch
        ((2, 4, 16, 16), torch.tensor([1, 2, 3]), (2, 77, 32), "t must be"),
        ((2, 4, 16, 16), torch.zeros(2, 1), (2, 77, 32), "t must be"),
    ],
)
def test_bad_input_raises_one_line(latents_shape, t, context_shape, message):
    ours = UNet(UNetConfig(**TINY))
    with pytest.raises(MinisdError, match=message) as info:
        ours(torch.zeros(latents_shape), t, torch.zeros(context_shape))
    assert "\n" not in str(info.value)
