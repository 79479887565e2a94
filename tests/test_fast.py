"""minisd.fast changes speed, not numbers: the fast UNet, VAE and TextEncoder give the eager outputs to fp32
rounding, at a tiny config and at the full SD v1 size (small inputs), and their state dicts still round-trip."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from minisd import fast as minisd_fast
from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.fast import (
    FusedCausalSelfAttention,
    FusedSelfAttention,
    FusedVAESelfAttention,
    capture_unet_step,
    make_fast,
)
from minisd.prepacked import PrepackedConv2d, PrepackedLinear
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from tests.parity import assert_parity

TINY = {
    "unet": UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32),
    "vae": VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
    "text_encoder": TextEncoderConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
}
FULL = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": TextEncoderConfig()}
CLASSES = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder}
FUSED = {"unet": FusedSelfAttention, "vae": FusedVAESelfAttention, "text_encoder": FusedCausalSelfAttention}

# The fast path computes every output element as the same sum of the same products, in another order: one
# (s, d) x (d, 3d) GEMM instead of three (s, d) x (d, d) ones is blocked differently, and oneDNN's channels_last
# convolution walks the input channels in another order than the blocked-layout one. Each reordering moves a
# result by a few fp32 ulps (~1e-7 relative); through the UNet's ~80 layers and its residual sums that grows to
# a few 1e-6 of the output's scale. 1e-5 bounds that with room, and still catches a real slip: a wrong head split
# or a q/k swap is O(1), a GroupNorm eps off by 10x is 1e-5 to 1e-4 (tests/test_unet.py).
REL_TOL = 1e-5


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every weight random, norms and biases included (default init leaves norms at 1/0, biases at 0: those
    would hide a swapped or dropped path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (nn.GroupNorm, nn.LayerNorm)):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(param.shape, generator=g))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
            elif param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=g) / fan_in**0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=g))
    return model.eval().requires_grad_(False)


def eager_and_fast(kind: str, config, seed: int) -> tuple[nn.Module, nn.Module]:
    """A random eager model and a fast twin that starts from the same tensors (assign=True: one copy of the
    weights; make_fast then makes its own channels_last copies of the 4-D ones)."""
    with torch.device("meta"):
        eager, fast = CLASSES[kind](config), CLASSES[kind](config)
    eager.to_empty(device="cpu")
    randomize(eager, seed)
    fast.load_state_dict(eager.state_dict(), strict=True, assign=True)
    return eager, make_fast(fast.eval())


def inputs(kind: str, config, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Model inputs: UNet (latents, t, context), VAE (vae_latents,), TextEncoder (input_ids,)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        latents = torch.randn(2, config.in_channels, size, size, generator=g)
        return latents, torch.tensor([999, 37]), torch.randn(2, 77, config.cross_attention_dim, generator=g)
    if kind == "vae":
        return (torch.randn(1, config.latent_channels, size, size, generator=g),)
    return (torch.randint(0, config.vocab_size, (2, 77), generator=g),)


def run(kind: str, model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if kind == "unet":
        return model(*args)
    if kind == "vae":
        return model.decode(*args)
    return model(*args).last_hidden_state


def check_fast_equals_eager(test: str, kind: str, config, size: int, seed: int) -> None:
    eager, fast = eager_and_fast(kind, config, seed)
    assert any(isinstance(m, FUSED[kind]) for m in fast.modules()), "make_fast fused no attention"
    args = inputs(kind, config, size, seed)
    with torch.no_grad():
        want, got = run(kind, eager, args), run(kind, fast, args)
    assert_parity(
        test,
        f"fast {kind} vs eager ({size}x{size})" if kind != "text_encoder" else "fast text_encoder vs eager",
        got,
        want,
        REL_TOL,
        models=(fast, eager, lambda: run(kind, fast, args), lambda: run(kind, eager, args)),
    )


@pytest.mark.parametrize("kind", ["unet", "vae", "text_encoder"])
def test_fast_equals_eager_tiny(kind):
    check_fast_equals_eager("test_fast_equals_eager_tiny", kind, TINY[kind], size=16, seed=0)


def test_fast_equals_eager_tiny_sd2():
    """SD 2's differences under make_fast: linear projections, heads per level, the upcast in the fused attn1,
    GELU in the fused text encoder."""
    sd2_unet = UNetConfig(
        block_out_channels=(32, 32, 64, 64), attention_head_dim=(1, 2, 2, 4), cross_attention_dim=32,
        use_linear_projection=True, upcast_attention=True,
    )  # fmt: skip
    check_fast_equals_eager("test_fast_equals_eager_tiny_sd2", "unet", sd2_unet, size=16, seed=6)
    sd2_text = dataclasses.replace(TINY["text_encoder"], hidden_act="gelu")
    check_fast_equals_eager("test_fast_equals_eager_tiny_sd2", "text_encoder", sd2_text, size=16, seed=6)


@pytest.mark.parametrize(("kind", "size"), [("unet", 16), ("vae", 16), ("text_encoder", 0)])
def test_fast_equals_eager_full_size(kind, size):
    """The full SD v1 networks with random weights, small inputs (16x16 latents: a 128x128 image)."""
    check_fast_equals_eager("test_fast_equals_eager_full_size", kind, FULL[kind], size=size, seed=1)


@pytest.mark.parametrize("kind", ["unet", "vae", "text_encoder"])
def test_state_dict_round_trips(kind):
    """The fast model exports the eager keys and numbers, and loading a new state dict (no assign) reaches the
    fused matrices too: its outputs then equal an eager model loaded with the same dict."""
    config = TINY[kind]
    eager, fast = eager_and_fast(kind, config, seed=2)
    exported = fast.state_dict()
    assert exported.keys() == eager.state_dict().keys()
    for name, tensor in eager.state_dict().items():
        assert torch.equal(exported[name], tensor), name

    other = randomize(CLASSES[kind](config), seed=3).state_dict()
    fast.load_state_dict(other, strict=True)
    eager.load_state_dict(other, strict=True)
    args = inputs(kind, config, size=16, seed=3)
    with torch.no_grad():
        assert_parity("test_state_dict_round_trips", f"fast {kind} after load_state_dict", run(kind, fast, args),
                      run(kind, eager, args), REL_TOL)  # fmt: skip


def test_make_fast_is_idempotent_and_keeps_one_copy_of_qkv():
    _, fast = eager_and_fast("unet", TINY["unet"], seed=4)
    n_modules = len(list(fast.modules()))
    assert make_fast(fast) is fast
    assert len(list(fast.modules())) == n_modules
    attn = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn, FusedSelfAttention)
    # to_q/k/v's weights are rows of the fused matrix, not copies
    assert attn.to_k.weight.data_ptr() == attn.to_qkv.weight[attn.to_q.weight.shape[0] :].data_ptr()
    # fp32 on the CPU: every conv and Linear prepacked for oneDNN (channels_last is the GPU's path: test_gpu.py)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in fast.modules())
    assert isinstance(fast.conv_in, PrepackedConv2d) and isinstance(attn.to_qkv, PrepackedLinear)
    # packing is lazy: the to_q/k/v kept only for their keys never get a packed copy
    with torch.no_grad():
        fast(*inputs("unet", TINY["unet"], size=8, seed=4))
    assert attn.to_qkv.packed_weight is not None and attn.to_q.packed_weight is None


def test_make_fast_rejects_what_it_cannot_speed_up():
    with pytest.raises(MinisdError, match="model must be a minisd UNet, VAE or TextEncoder"):
        make_fast(nn.Linear(2, 2))
    with torch.device("meta"):
        on_meta = UNet(TINY["unet"])
    with pytest.raises(MinisdError, match="meta device"):
        make_fast(on_meta)


def test_capture_unet_step_needs_cuda_tensors():
    unet = randomize(UNet(TINY["unet"]), seed=5)
    latents, t, context = inputs("unet", TINY["unet"], size=8, seed=5)
    with pytest.raises(MinisdError, match="needs CUDA tensors"):
        capture_unet_step(unet, latents, t, context)


# bfloat16 keeps 8 significant bits: each rounding moves a number by ≤ 2⁻⁹ ≈ 2e-3 of itself, and the networks' ~100
# rounded layers add those up. Eager minisd in bfloat16 (no make_fast) lands 1.2-1.9 % from float32 on these random
# networks (tiny and full size, measured), the fast path 1.3-1.8 %: a different summation order, the same precision.
# 4e-2 is twice that, and still far below what a real slip does (a swapped q/k or a dropped residual is O(1)).
BF16_REL_TOL = 4e-2


@pytest.mark.parametrize("kind", ["unet", "vae", "text_encoder"])
def test_fast_bfloat16_is_float32_to_bfloat16_rounding(kind):
    """make_fast on a bfloat16 network (what fast_dtype picks on CPUs with AVX-512 BF16 / AMX) gives the float32
    eager output to bfloat16's rounding."""
    eager, fast = eager_and_fast(kind, TINY[kind], seed=6)
    fast = make_fast(fast.to(torch.bfloat16))
    args = inputs(kind, TINY[kind], size=16, seed=6)
    args16 = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        want, got = run(kind, eager, args), run(kind, fast, args16)
    assert got.dtype == torch.bfloat16
    assert_parity("test_fast_bfloat16", f"fast {kind} bfloat16 vs eager float32", got, want, BF16_REL_TOL)


def test_fast_dtype_picks_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    """bfloat16 only on CPUs that multiply it in hardware (elsewhere oneDNN emulates it, slower than float32); the
    detection agrees with the kernel's CPU flags; GPUs keep the weights' dtype."""
    assert minisd_fast.fast_dtype("cuda") is None
    monkeypatch.setattr(minisd_fast, "cpu_has_native_bf16", lambda: False)
    assert minisd_fast.fast_dtype("cpu") == torch.float32
    monkeypatch.setattr(minisd_fast, "cpu_has_native_bf16", lambda: True)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # and oneDNN can use it
    assert minisd_fast.fast_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.undo()
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if flags:  # Linux: the kernel's list of what this CPU has
        assert minisd_fast.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_prepacked_weights_follow_edits_in_place():
    """A weight edited in place after packing (a merged LoRA: W ← W + ΔW, also through to_q's rows of the fused
    QKV matrix) is re-packed, not silently ignored; a forward hook on a fused-away Linear is refused."""
    eager, fast = eager_and_fast("unet", TINY["unet"], seed=7)
    args = inputs("unet", TINY["unet"], size=8, seed=7)
    with torch.no_grad():
        fast(*args)  # packs every weight
        for model in (eager, fast):
            model.conv_in.weight.mul_(1.5)
            model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(-2.0)
            model.mid_block.attentions[0].proj_in.weight.add_(0.1)
        assert_parity("test_prepacked_weights_follow_edits_in_place", "fast unet after in-place edits",
                      fast(*args), eager(*args), REL_TOL)  # fmt: skip
    attn = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.to_v.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(MinisdError, match="never run"), torch.no_grad():
        fast(*args)
