"""minisd's Kandinsky 2.2 MoVQ and decoder UNet compute what diffusers' VQModel and UNet2DConditionModel compute,
given the same weights (one state dict loaded strictly into both), at tiny configs and at the published full size.

Full-size tests build the reference on the meta device, give it random weights once, and load them into minisd's
module with assign=True: one copy of the weights in memory (the UNet: 1.25 G parameters, 5 GB).
"""

import pytest
import torch
from diffusers import UNet2DConditionModel, VQModel

from minisd.errors import MinisdError
from minisd.kandinsky.movq import MoVQ, MoVQConfig
from minisd.kandinsky.unet import DecoderUNet, DecoderUNetConfig
from tests.kandinsky_reference import (
    DECODER_UNET,
    MOVQ,
    TINY_MOVQ,
    TINY_UNET,
    diffusers_config,
    randomize,
)
from tests.parity import assert_parity

# fp32 on the CPU, the same operations in the same order: what may differ is the summation order inside matmuls
# and convolutions, ~1e-7 relative per operation. Measured: 0 (bit-identical) for the tiny models; ~2e-6 for the
# full-size UNet, whose 52 ResNets and 25 attentions add that up. The bar, 1e-4 of the output's scale, keeps
# fifty-fold margin and still catches real mistakes (a missing (1 + scale) gives O(1), pixels-first key order 0.3).
REL_TOL = 1e-4
# Snapping to the nearest code is discontinuous, but random latents are never near a tie between two codes, so the
# quantised decode has the same bar; the codes themselves must be equal.
MOVQ_TINY = MoVQConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, num_vq_embeddings=24)
UNET_TINY = DecoderUNetConfig(
    block_out_channels=(32, 64, 96), layers_per_block=2, attention_head_dim=16, cross_attention_dim=48,
    encoder_hid_dim=40,
)  # fmt: skip


def shared(ours_class, config, ref: torch.nn.Module) -> torch.nn.Module:
    """minisd's module built on the meta device, holding the reference's tensors (strict: every name, every shape)."""
    with torch.device("meta"):
        ours = ours_class(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval()


def check_movq(test: str, ours: MoVQ, ref: VQModel, image: torch.Tensor) -> None:
    with torch.no_grad():
        latents_ref = ref.encode(image).latents
        assert_parity(test, "movq encode", ours.encode(image), latents_ref, REL_TOL)
        for quantize in (False, True):
            got = ours.decode(latents_ref, quantize=quantize)
            want = ref.decode(latents_ref, force_not_quantize=not quantize).sample
            assert_parity(test, f"movq decode quantize={quantize}", got, want, REL_TOL)
        _, _, (_, _, want_codes) = ref.quantize(latents_ref)
        assert torch.equal(ours.quantize.codes(latents_ref).flatten(), want_codes.flatten())


def test_movq_parity_tiny():
    ref = randomize(VQModel(**diffusers_config(TINY_MOVQ)), seed=0)
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    check_movq("test_movq_parity_tiny", shared(MoVQ, MOVQ_TINY, ref), ref, image)


@pytest.mark.full_size
def test_movq_parity_full_size():
    """The published MoVQ (67 M parameters), random weights, a 64×96 image."""
    with torch.device("meta"):
        ref = VQModel(**diffusers_config(MOVQ))
    randomize(ref, seed=1)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    check_movq("test_movq_parity_full_size", shared(MoVQ, MoVQConfig(), ref), ref, image)


def check_unet(test: str, ours: DecoderUNet, ref: UNet2DConditionModel, latents, t, image_embeds) -> None:
    def run_ours():
        return ours(latents, t, image_embeds)

    def run_ref():
        return ref(latents, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds}).sample

    with torch.no_grad():
        got, want = run_ours(), run_ref()
    assert_parity(test, "decoder unet", got, want, REL_TOL, (ours, ref, run_ours, run_ref))


@pytest.mark.parametrize("in_channels", [4, 9])
def test_unet_parity_tiny(in_channels):
    ref = randomize(UNet2DConditionModel(**diffusers_config({**TINY_UNET, "in_channels": in_channels})), seed=2)
    config = DecoderUNetConfig(**{**UNET_TINY.__dict__, "in_channels": in_channels})
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, in_channels, 8, 16, generator=g)
    image_embeds = torch.randn(2, 40, generator=g)
    check_unet(f"test_unet_parity_tiny[{in_channels}]", shared(DecoderUNet, config, ref), ref, latents,
               torch.tensor([981, 21]), image_embeds)  # fmt: skip


@pytest.mark.full_size
def test_unet_parity_full_size():
    """The published decoder UNet (1.25 G parameters), random weights, 8×8 latents (64 pixels: the least the three
    ResNet↓ allow). The inpainting decoder differs only in conv_in's input channels (tested tiny)."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_config(DECODER_UNET))
    randomize(ref, seed=3)
    g = torch.Generator().manual_seed(3)
    latents, image_embeds = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 1280, generator=g)
    check_unet("test_unet_parity_full_size", shared(DecoderUNet, DecoderUNetConfig(), ref), ref, latents, 500.0,
               image_embeds)  # fmt: skip


def test_unet_refuses_bad_inputs_in_one_line():
    unet = DecoderUNet(UNET_TINY).eval()
    good = (torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 40))
    for latents, t, image_embeds, fragment in [
        (torch.zeros(1, 4, 6, 8), *good[1:], "multiples of 4"),
        (torch.zeros(1, 3, 8, 8), *good[1:], "(b, 4, h, w)"),
        (good[0], good[1], torch.zeros(1, 39), "image_embeds must be (1, 40)"),
        (good[0], torch.tensor([1, 2]), good[2], "t must be"),
    ]:
        with pytest.raises(MinisdError) as info:
            unet(latents, t, image_embeds)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_movq_refuses_bad_inputs_in_one_line():
    movq = MoVQ(MOVQ_TINY).eval()
    for call, fragment in [
        (lambda: movq.encode(torch.zeros(1, 3, 13, 16)), "multiples of 2"),
        (lambda: movq.encode(torch.zeros(1, 4, 16, 16)), "(b, 3, H, W)"),
        (lambda: movq.decode(torch.zeros(1, 3, 8, 8)), "(b, 4, h, w)"),
    ]:
        with pytest.raises(MinisdError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)
