"""Kandinsky 2.2 on a CUDA GPU: the full-size decoder UNet, prior and MoVQ equal diffusers' in fp32 and fp16; a
whole text-to-image run equals diffusers' combined pipeline; one seed gives (nearly) the CPU's image; the course
page's three examples run exactly as written ("cuda" and model CPU offload included). Every test carries
@pytest.mark.gpu and skips without CUDA (tests/conftest.py).

    python -m pytest -m gpu tests/test_kandinsky_gpu.py -v
"""

import copy

import pytest
import torch
from diffusers import KandinskyV22CombinedPipeline, PriorTransformer, UNet2DConditionModel, VQModel

from minisd.kandinsky.movq import MoVQ, MoVQConfig
from minisd.kandinsky.pipelines.txt2img import txt2img
from minisd.kandinsky.prior import Prior, PriorConfig
from minisd.kandinsky.unet import DecoderUNet, DecoderUNetConfig
from tests.kandinsky_reference import DECODER_UNET, MOVQ, PRIOR, diffusers_config, randomize
from tests.parity import assert_parity
from tests.test_auto import IMAGE2IMAGE, INPAINTING, TEXT2IMAGE, hub, offline, run_example  # noqa: F401 (fixtures)
from tests.test_kandinsky_pipelines import combined, generator, twins  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# As tests/test_gpu.py argues for SD's networks: fp32 with TF32 off, ~1e-6 from kernel choice, bar 1e-5 (the deeper
# prior and decoder: 3e-5); fp16 rounds each op to 10 bits (4.9e-4), a few 1e-3 after the depth: bar 1e-2.
REL_TOL = {"fp32": 3e-5, "fp16": 1e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def full_size_twins(ref_class, config: dict, ours_class, ours_config, seed: int, dtype: torch.dtype):
    """The published network, random weights, on the GPU in `dtype`: the reference and minisd's sharing tensors."""
    with torch.device("meta"):
        ref = ref_class(**diffusers_config(config))
    randomize(ref, seed).to("cuda", dtype)
    with torch.device("meta"):
        ours = ours_class(ours_config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval(), ref


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_full_size_decoder_unet_on_cuda(dtype_name):
    dtype = DTYPES[dtype_name]
    ours, ref = full_size_twins(UNet2DConditionModel, DECODER_UNET, DecoderUNet, DecoderUNetConfig(), 0, dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g).to("cuda", dtype)
    image_embeds = torch.randn(2, 1280, generator=g).to("cuda", dtype)
    t = torch.tensor([999, 37], device="cuda")
    with torch.no_grad():
        got = ours(latents, t, image_embeds)
        want = ref(latents, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds}).sample
    assert_parity(f"test_full_size_decoder_unet_on_cuda[{dtype_name}]", "decoder unet", got, want, REL_TOL[dtype_name])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_full_size_prior_and_movq_on_cuda(dtype_name):
    dtype = DTYPES[dtype_name]
    ours, ref = full_size_twins(PriorTransformer, PRIOR, Prior, PriorConfig(), 1, dtype)
    g = torch.Generator().manual_seed(1)
    x, embeds, states = (torch.randn(shape, generator=g).to("cuda", dtype) for shape in ((2, 1280), (2, 1280),
                                                                                          (2, 77, 1280)))  # fmt: skip
    mask = (torch.arange(77)[None] < torch.tensor([[5], [77]])).cuda()
    with torch.no_grad():
        got = ours(x, torch.tensor([999, 3], device="cuda"), embeds, states, mask)
        want = ref(x, torch.tensor([999, 3], device="cuda"), proj_embedding=embeds, encoder_hidden_states=states,
                   attention_mask=mask).predicted_image_embedding  # fmt: skip
    assert_parity(f"test_full_size_prior_and_movq_on_cuda[{dtype_name}]", "prior", got, want, REL_TOL[dtype_name])
    ours, ref = full_size_twins(VQModel, MOVQ, MoVQ, MoVQConfig(), 2, dtype)
    image = (torch.rand(1, 3, 256, 256, generator=g) * 2 - 1).to("cuda", dtype)
    with torch.no_grad():
        latents = ref.encode(image).latents
        assert_parity(f"test_full_size_prior_and_movq_on_cuda[{dtype_name}]", "movq encode", ours.encode(image),
                      latents, REL_TOL[dtype_name])  # fmt: skip
        assert_parity(f"test_full_size_prior_and_movq_on_cuda[{dtype_name}]", "movq decode", ours.decode(latents),
                      ref.decode(latents, force_not_quantize=True).sample, REL_TOL[dtype_name])  # fmt: skip


def on_cuda(namespace):
    """A copy of a SimpleNamespace of modules, every module moved to the GPU (the CPU twins stay for other tests)."""
    moved = copy.copy(namespace)
    for name, value in vars(namespace).items():
        if isinstance(value, torch.nn.Module):
            setattr(moved, name, copy.deepcopy(value).to("cuda"))
    return moved


def test_txt2img_on_cuda_equals_diffusers_and_the_cpu(twins):  # noqa: F811
    """diffusers draws with the generator's device; minisd always on the CPU: with a CPU generator both draw the
    same numbers, so the GPU run equals diffusers' (up to fp32 kernel differences and the prior's float32 step, as
    tests/test_kandinsky_pipelines.PIPELINE_TOL explains) and equals minisd's CPU run (kernels only)."""
    ref, ours, _ = twins
    ref_cuda, ours_cuda = on_cuda(ref), on_cuda(ours)
    pipe = combined(KandinskyV22CombinedPipeline, ref_cuda, ref_cuda.unet)
    kwargs = {"num_inference_steps": 4, "prior_num_inference_steps": 3, "height": 32, "width": 32}
    want = pipe("a fox", generator=generator(1), output_type="np", **kwargs).images
    got = txt2img(ours_cuda, "a fox", generator=generator(1), output_type="np", **kwargs)
    cpu = txt2img(ours, "a fox", generator=generator(1), output_type="np", **kwargs)
    assert_parity("test_txt2img_on_cuda", "txt2img cuda vs diffusers", torch.from_numpy(got), torch.from_numpy(want),
                  1e-3)  # fmt: skip
    assert_parity("test_txt2img_on_cuda", "txt2img cuda vs cpu", torch.from_numpy(got), torch.from_numpy(cpu), 1e-3)


@pytest.mark.parametrize("code", [TEXT2IMAGE, IMAGE2IMAGE, INPAINTING], ids=["text2image", "image2image", "inpaint"])
def test_the_course_examples_run_as_written_on_cuda(offline, code):  # noqa: F811
    assert run_example(code)["image"].mode == "RGB"
