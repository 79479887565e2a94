"""SD 2.x on a CUDA GPU, beside tests/test_gpu.py's SD v1 checks: the full SD 2.1 UNet and 23-layer OpenCLIP text
encoder equal diffusers/transformers in fp32, fp16 and bf16; the attention upcast keeps a float16 UNet within float16
rounding of diffusers' classic upcast path; one seed gives the CPU's picture on CUDA with v-prediction and zero-SNR.
Every test carries @pytest.mark.gpu and skips without CUDA (tests/conftest.py).

    python -m pytest -m gpu tests/test_gpu_sd2.py -v
"""

import copy
import types

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from benchmarks import speed
from minisd.pipelines.img2img import img2img
from minisd.pipelines.txt2img import txt2img
from minisd.samplers.ddim import DDIMSampler
from tests.parity import assert_parity
from tests.test_gpu import DTYPES, REL_TOL
from tests.test_pipelines import SIZE, check_pixels, make_image
from tests.test_pipelines_sd2 import twins as tiny_twins  # noqa: F401 (a fixture, used by name)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(scope="module")
def twins():
    """diffusers/transformers' SD 2.1 networks (full size, random weights) and minisd's, sharing their fp32 CPU
    tensors; each test moves copies to the GPU in its dtype."""
    return speed.build_twins("sd-v2", seed=0)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _copy_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(DEVICE, dtype).eval()


def unet_inputs(dtype: torch.dtype, size: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (2, 4, 96, 96): a 768-pixel image, t (2,), context (2, 77, 1024)), drawn on the CPU in fp32."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=g).to(DEVICE, dtype)
    context = torch.randn(2, 77, 1024, generator=g).to(DEVICE, dtype)
    return latents, torch.tensor([999, 37], device=DEVICE), context


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_sd2_unet_parity_on_cuda(twins, dtype_name):
    """The bars of tests/test_gpu.py. diffusers' default SDPA processor ignores upcast_attention (the fused kernels
    accumulate q·kᵀ in float32); minisd computes the attention in float32 for float16/bfloat16: within the bar."""
    ours, ref = (_copy_to(models["unet"], DTYPES[dtype_name]) for models in twins)
    latents, t, context = unet_inputs(DTYPES[dtype_name])

    def run_ours():
        return ours(latents, t, context)

    def run_ref():
        return ref(latents, t, encoder_hidden_states=context).sample

    with torch.inference_mode():
        out, out_ref = run_ours(), run_ref()
    assert out.dtype == DTYPES[dtype_name]
    assert_parity(
        "test_sd2_unet_parity_on_cuda", f"SD 2 UNet cuda {dtype_name} 96x96", out, out_ref, REL_TOL[dtype_name],
        models=(ours, ref, run_ours, run_ref),
    )  # fmt: skip


def test_sd2_unet_upcast_matches_diffusers_classic_upcast_fp16(twins):
    """float16: minisd's upcast attention against diffusers' classic AttnProcessor, which honours upcast_attention
    (q·kᵀ and the softmax in float32); both within the fp16 bar of the float32 network."""
    ours, ref = (_copy_to(models["unet"], torch.float16) for models in twins)
    ref.set_attn_processor(AttnProcessor())
    fp32 = _copy_to(twins[0]["unet"], torch.float32)
    latents, t, context = unet_inputs(torch.float16, size=64)
    with torch.inference_mode():
        want = fp32(latents.float(), t, context.float())
        got, got_ref = ours(latents, t, context), ref(latents, t, encoder_hidden_states=context).sample
    test = "test_sd2_unet_upcast_fp16"
    assert_parity(test, "SD 2 UNet fp16 upcast vs diffusers AttnProcessor", got, got_ref, REL_TOL["fp16"])
    assert_parity(test, "SD 2 UNet fp16 upcast vs fp32", got.float(), want, REL_TOL["fp16"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_sd2_text_encoder_parity_on_cuda(twins, dtype_name):
    ours, ref = (_copy_to(models["text_encoder"], DTYPES[dtype_name]) for models in twins)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run_ours():
        return ours(ids).last_hidden_state

    def run_ref():
        return ref(ids).last_hidden_state

    with torch.inference_mode():
        hidden, hidden_ref = run_ours(), run_ref()
    assert_parity(
        "test_sd2_text_encoder_parity_on_cuda", f"SD 2 TextEncoder cuda {dtype_name}", hidden, hidden_ref,
        REL_TOL[dtype_name], models=(ours, ref, run_ours, run_ref),
    )  # fmt: skip


@pytest.mark.parametrize("case", ["euler_a_v", "ddim_zero_snr_trailing", "img2img_dpm_v"])
def test_sd2_seed_gives_the_same_image_on_cuda(tiny_twins, case):  # noqa: F811
    """As tests/test_pipelines.py's CUDA check, with SD 2's v-prediction: every draw on the CPU, then moved."""

    def on_cuda(components):
        moved = {k: copy.deepcopy(getattr(components, k)).to(DEVICE) for k in ("text_encoder", "vae", "unet")}
        return types.SimpleNamespace(**{**vars(components), **moved})

    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=4, output_type="np", seed=5)
    zero_snr = DDIMSampler(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    runs = {
        "euler_a_v": lambda c: txt2img(c, **kwargs, height=SIZE, width=SIZE, sampler="Euler a"),
        "ddim_zero_snr_trailing": lambda c: txt2img(
            c, **kwargs, height=SIZE, width=SIZE, guidance_rescale=0.7, rescale_betas_zero_snr=True,
            sampler=zero_snr,
        ),
        "img2img_dpm_v": lambda c: img2img(c, **kwargs, image=make_image(), strength=0.75, sampler="DPM++ 2M Karras"),
    }  # fmt: skip
    got = runs[case](on_cuda(tiny_twins.ours))
    want = runs[case](tiny_twins.ours)
    check_pixels("test_sd2_seed_on_cuda", f"SD 2 {case} CUDA vs CPU, same seed", got, want)
