"""On a CUDA GPU: every network equals diffusers/transformers in fp32, fp16 and bf16; the samplers' noise on the
GPU equals the CPU's for one seed; the fast path (make_fast + the UNet step as one CUDA graph) equals eager; the
benchmark runs. Every test carries @pytest.mark.gpu and skips without CUDA (tests/conftest.py).

    python -m pytest -m gpu tests/test_gpu.py -v        # on a machine with CUDA (needs diffusers installed)
"""

import copy

import pytest
import torch
from torch import nn

from benchmarks import speed
from benchmarks.__main__ import main as bench_main
from minisd.fast import capture_unet_step, make_fast
from minisd.noise import randn
from minisd.samplers import DDIMSampler, DDPMSampler, EulerAncestralSampler
from tests.parity import assert_parity

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# max |minisd − reference| / max |reference|, same dtype on both sides, on the GPU:
# fp32: TF32 is switched off (fixture below), so both sides run true-fp32 cuDNN/cuBLAS kernels; they may still
#       pick different algorithms for tensors of different strides (a different summation order, ~1e-7 per op),
#       which grows to ~1e-6 through the UNet's depth. 1e-5 leaves room and still catches a wrong norm eps.
# fp16: the bar. Rounding to 10 mantissa bits (unit roundoff 4.9e-4) at each op's output, in a possibly
#       different order on the two sides, gives a few 1e-3 at the UNet's output.
# bf16: 8 mantissa bits, 8× fp16's unit roundoff (3.9e-3), so the same argument gives about 8× fp16's error;
#       3e-2 keeps the headroom fp16's bar has over its expected few 1e-3 (bf16 expected ~1e-2).
REL_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}
# The fast path against eager minisd (fused QKV, channels_last convolutions, one CUDA graph): every op computes
# the same sums in another order. fp32: on the CPU the full UNet measures up to 5.9e-6 (64×64 latents); cuDNN's
# NHWC kernels may also pick Winograd/FFT algorithms (~1e-6 relative per conv in fp32), hence 5e-5. fp16: as above.
FAST_REL_TOL = {"fp32": 5e-5, "fp16": 1e-2}


@pytest.fixture(scope="module")
def twins():
    """diffusers/transformers' SD v1 networks (full size, random weights) and minisd's, as fp32 CPU models sharing
    their tensors; each test moves copies to the GPU in its dtype."""
    return speed.build_twins("sd-v1", seed=0)


@pytest.fixture(autouse=True)
def no_tf32():
    """True fp32 on the GPU: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _copy_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a CPU model on the GPU in `dtype`; the CPU model stays as it is for the next test."""
    return copy.deepcopy(model).to("cuda", dtype).eval()


def unet_inputs(dtype: torch.dtype, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (2, 4, size, size), t (2,), context (2, 77, 768)) drawn on the CPU in fp32, then moved."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=g).to("cuda", dtype)
    context = torch.randn(2, 77, 768, generator=g).to("cuda", dtype)
    return latents, torch.tensor([999, 37], device="cuda"), context


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_unet_parity_on_cuda(twins, dtype_name):
    ours, ref = (_copy_to(models["unet"], DTYPES[dtype_name]) for models in twins)
    latents, t, context = unet_inputs(DTYPES[dtype_name])

    def run_ours():
        return ours(latents, t, context)

    def run_ref():
        return ref(latents, t, encoder_hidden_states=context).sample

    with torch.inference_mode():
        eps, eps_ref = run_ours(), run_ref()
    assert eps.dtype == DTYPES[dtype_name]
    assert_parity(
        "test_unet_parity_on_cuda", f"UNet cuda {dtype_name} 64x64", eps, eps_ref, REL_TOL[dtype_name],
        models=(ours, ref, run_ours, run_ref),
    )  # fmt: skip


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_vae_decode_parity_on_cuda(twins, dtype_name):
    ours, ref = (_copy_to(models["vae"], DTYPES[dtype_name]) for models in twins)
    vae_latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to("cuda", DTYPES[dtype_name])

    def run_ours():
        return ours.decode(vae_latents)

    def run_ref():
        return ref.decode(vae_latents).sample

    with torch.inference_mode():
        image, image_ref = run_ours(), run_ref()
    assert image.shape == (1, 3, 512, 512)
    assert_parity(
        "test_vae_decode_parity_on_cuda", f"VAE decode cuda {dtype_name} 512x512", image, image_ref,
        REL_TOL[dtype_name], models=(ours, ref, run_ours, run_ref),
    )  # fmt: skip


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_vae_encode_parity_on_cuda(twins, dtype_name):
    ours, ref = (_copy_to(models["vae"], DTYPES[dtype_name]) for models in twins)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).to("cuda", DTYPES[dtype_name])
    with torch.inference_mode():
        mean, mean_ref = ours.encode(2 * image - 1).mean, ref.encode(2 * image - 1).latent_dist.mean
    assert_parity(
        "test_vae_encode_parity_on_cuda", f"VAE encode cuda {dtype_name}", mean, mean_ref, REL_TOL[dtype_name]
    )


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_text_encoder_parity_on_cuda(twins, dtype_name):
    ours, ref = (_copy_to(models["text_encoder"], DTYPES[dtype_name]) for models in twins)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3)).to("cuda")

    def run_ours():
        return ours(ids).last_hidden_state

    def run_ref():
        return ref(ids).last_hidden_state

    with torch.inference_mode():
        hidden, hidden_ref = run_ours(), run_ref()
    assert_parity(
        "test_text_encoder_parity_on_cuda", f"TextEncoder cuda {dtype_name}", hidden, hidden_ref, REL_TOL[dtype_name],
        models=(ours, ref, run_ours, run_ref),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_randn_on_cuda_equals_cpu(dtype):
    """A CPU generator draws on the CPU whatever the target device: one seed, one noise, bit for bit."""
    shape = (2, 4, 64, 64)
    cpu = randn(shape, torch.Generator().manual_seed(7), dtype, "cpu")
    cuda = randn(shape, torch.Generator().manual_seed(7), dtype, "cuda")
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.parametrize("make_sampler", [DDPMSampler, lambda: DDIMSampler(eta=1.0), EulerAncestralSampler],
                         ids=["DDPM", "DDIM eta=1", "Euler a"])  # fmt: skip
def test_stochastic_samplers_on_cuda_follow_the_cpu(make_sampler):
    """The samplers that draw noise each step: the same seed walks the same path on the GPU as on the CPU.
    The only differences are fp32 rounding of the elementwise step math on two devices (a few ulps per step)."""
    paths = {}
    for device in ("cpu", "cuda"):
        sampler = make_sampler()
        sampler.set_timesteps(10)
        generator = torch.Generator().manual_seed(11)  # a CPU generator, as the pipelines use
        x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(12)).to(device) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            x_in = sampler.scale_model_input(x, t)
            eps = 0.3 * x_in + 0.1  # a stand-in for the UNet: deterministic, device-independent
            x = sampler.step(eps, t, x, generator=generator)
        paths[device] = x.cpu()
    # 10 steps of a few fp32 ops each, ~1e-7 relative per op on either device: 1e-5 of the scale bounds it.
    torch.testing.assert_close(paths["cuda"], paths["cpu"], rtol=0, atol=1e-5 * paths["cpu"].abs().max().item())


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16"])
def test_fast_cuda_graph_step_equals_eager(twins, dtype_name):
    """make_fast + the whole UNet step captured as one CUDA graph give eager minisd's eps, for new inputs too
    (the graph's input buffers are refilled on each call)."""
    dtype = DTYPES[dtype_name]
    eager = _copy_to(twins[0]["unet"], dtype)
    fast = make_fast(_copy_to(twins[0]["unet"], dtype))
    latents, t, context = unet_inputs(dtype)
    with torch.inference_mode():
        step = capture_unet_step(fast, latents, t, context)
        for scale, timestep in [(1.0, 999), (0.5, 400)]:  # the second call changes every input
            x, c, ts = scale * latents, scale * context, torch.full_like(t, timestep)
            want, got = eager(x, ts, c), step(x, ts, c).clone()
            assert_parity("test_fast_cuda_graph_step_equals_eager", f"fast UNet graph cuda {dtype_name} t={timestep}",
                          got, want, FAST_REL_TOL[dtype_name])  # fmt: skip


def test_bench_runs_on_cuda(capsys):
    """The benchmark command at a tiny config: `python -m benchmarks --device cuda --dtype fp16 --fast`."""
    bench_main(["--device", "cuda", "--dtype", "fp16", "--model", "tiny", "--size", "64", "--steps", "2",
                "--repeat", "2", "--fast"])  # fmt: skip
    out = capsys.readouterr().out
    assert "cuda" in out and "fp16" in out
    rows = out.strip().splitlines()[-12:]  # 4 cases × minisd, diffusers, minisd-fast (fp16: fast keeps the dtype)
    assert [row.split()[:2] for row in rows] == [
        [case, runner]
        for case in ["text_encode", "unet_step", "vae_decode", "image_2"]
        for runner in ["minisd", "diffusers", "minisd-fast"]
    ]
    for row in rows:
        assert all(float(x) >= 0 for x in row.split()[3:])
