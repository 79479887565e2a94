"""SD 2.x through minisd's pipelines produces diffusers' images: txt2img, img2img and inpainting with v-prediction
(the 768 models) and ε (the 512 and inpainting models), zero terminal SNR with "trailing" spacing and guidance
rescale, against StableDiffusionPipeline / Img2Img / Inpaint built from SD 2-shaped twin networks (64-wide heads,
linear projections, GELU OpenCLIP-style text encoder, "!" padding) and schedulers configured as
stabilityai/stable-diffusion-2-1's scheduler_config.json; at tiny size and, for txt2img, at full SD 2 size.

Tolerance: max |minisd − diffusers| <= 1e-3 on [0, 1] pixels, tests/test_pipelines.py's bar and reasoning (the same
fp32 networks, bit-equal to their twins; sampler coefficients in float64 vs float32; a quarter of an 8-bit level).
"""

import types
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.pipelines.img2img import img2img
from minisd.pipelines.inpaint import inpaint
from minisd.pipelines.txt2img import txt2img
from minisd.samplers.ddim import DDIMSampler
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from tests.reference import SD15_SCHEDULER_CONFIG
from tests.test_pipelines import (
    SIZE,
    UNET_BLOCKS,
    FreshWarmupPNDM,
    RunOrderLMS,
    check_pixels,
    make_image,
    make_mask,
    reference_image,
    start_latents,
    twin,
)

# stabilityai/stable-diffusion-2-1's scheduler_config.json: SD v1.5's with prediction_type v_prediction.
SD21_SCHEDULER_CONFIG = {**SD15_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
# SD 2 with small numbers: two levels (cross-attention, then plain), 64-wide heads, linear projections, upcast;
# the text encoder GELU with 64-wide heads; the VAE is SD v1's (SD 2 did not change it).
TINY_UNET = UNetConfig(
    block_out_channels=(64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(1, 1),
    use_linear_projection=True, upcast_attention=True,
)  # fmt: skip
TINY_TEXT = TextEncoderConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu"
)


def scheduler_twin(sampler: str, prediction_type: str, **options):
    config = {**SD21_SCHEDULER_CONFIG, "prediction_type": prediction_type, **options}
    classes = {
        "DDIM": DDIMScheduler,
        "PLMS": FreshWarmupPNDM,
        "LMS": RunOrderLMS,
        "Euler": EulerDiscreteScheduler,
        "Euler a": EulerAncestralDiscreteScheduler,
        "DPM++ 2M Karras": DPMSolverMultistepScheduler,
        "DPM++ 2M SDE": DPMSolverMultistepScheduler,
    }
    if sampler == "DPM++ 2M Karras":
        config["use_karras_sigmas"] = True
    if sampler == "DPM++ 2M SDE":
        config["algorithm_type"] = "sde-dpmsolver++"
    return classes[sampler].from_config(config)


SAMPLERS = ["DDIM", "PLMS", "LMS", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """ours: minisd SD 2 components predicting v (tests/twins.py's SD 2 twins); ours9: the 9-channel inpainting
    UNet, predicting ε; ref: the twins, with unet9."""
    from tests.twins import make_twins

    made = make_twins(tmp_path_factory.mktemp("sd2") / "tokenizer", seed=21, sd2=True)
    assert made.ref.tokenizer.pad_token_id == 0
    ref_unet9 = UNet2DConditionModel(**{**asdict(TINY_UNET), "in_channels": 9}, **UNET_BLOCKS, sample_size=SIZE // 8)
    unet9 = twin(UNet(replace(TINY_UNET, in_channels=9)), ref_unet9, seed=25)
    shared = {name: getattr(made.ours, name) for name in ("tokenizer", "text_encoder", "vae")}
    ours = types.SimpleNamespace(
        **shared, unet=made.ours.unet, prediction_type="v_prediction", rescale_betas_zero_snr=False
    )
    ours9 = types.SimpleNamespace(**shared, unet=unet9, prediction_type="epsilon", rescale_betas_zero_snr=False)
    made.ref.unet9 = ref_unet9
    return types.SimpleNamespace(ours=ours, ours9=ours9, ref=made.ref)


def reference_pipeline(pipeline_class, ref, scheduler, unet=None):
    pipe = pipeline_class(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=unet or ref.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


TXT2IMG = dict(
    prompt=["a photo of a cat", "a red fox in the snow"],
    negative_prompt=["blurry", "low quality"],
    guidance_scale=7.5,
    height=SIZE,
    width=SIZE,
    num_inference_steps=3,
    output_type="np",
)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_v_prediction_matches_diffusers(twins, sampler):
    """The 768 models' case: every sampler reads x̂_0 and ε off the UNet's v, as diffusers' schedulers do."""
    latents = start_latents(2, seed=30)
    ours = txt2img(twins.ours, **TXT2IMG, latents=latents.clone(), seed=7, sampler=sampler)
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, scheduler_twin(sampler, "v_prediction"))
    want = pipe(**TXT2IMG, latents=latents.clone(), generator=torch.Generator().manual_seed(7)).images
    check_pixels("test_sd2_txt2img_v", f"SD 2 txt2img v_prediction {sampler}", ours, want)


def test_txt2img_epsilon_matches_diffusers(twins):
    """The 512 models' case: the same network read as ε (prediction_type given to the pipeline)."""
    latents = start_latents(2, seed=31)
    ours = txt2img(twins.ours, **TXT2IMG, latents=latents.clone(), sampler="DDIM", prediction_type="epsilon")
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, scheduler_twin("DDIM", "epsilon"))
    want = pipe(**TXT2IMG, latents=latents.clone()).images
    check_pixels("test_sd2_txt2img_epsilon", "SD 2 txt2img epsilon DDIM", ours, want)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_txt2img_zero_snr_trailing_guidance_rescale_matches_diffusers(twins, sampler):
    """Lin et al. 2023's fixes together: zero terminal SNR, "trailing" spacing (DDIM; the σ samplers' spacing is
    linspace here) and guidance rescale 0.7. The sampler object carries the schedule settings. (Euler measures
    ~2e-4: its first step from σ ≈ 4096 cancels in float32 on both sides, tests/test_samplers_v.py.)"""
    # 4 steps: T/n = 250 whole, where diffusers' DDIM steps to t − ⌊T/n⌋ = the schedule's next trailing timestep
    # (for n = 3 it steps 666 -> 333 while the schedule says 332: minisd follows the schedule, samplers/ddim.py)
    kwargs = {**TXT2IMG, "guidance_rescale": 0.7, "num_inference_steps": 4}
    options = {"rescale_betas_zero_snr": True}
    if sampler == "DDIM":
        options["timestep_spacing"] = "trailing"
        ours_sampler = DDIMSampler(
            timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True
        )
    else:
        from minisd.samplers.euler import EulerSampler

        ours_sampler = EulerSampler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    latents = start_latents(2, seed=32)
    ours = txt2img(twins.ours, **kwargs, latents=latents.clone(), sampler=ours_sampler, rescale_betas_zero_snr=True)
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, scheduler_twin(sampler, "v_prediction", **options))
    want = pipe(**kwargs, latents=latents.clone()).images
    check_pixels("test_sd2_zero_snr", f"SD 2 txt2img v zero-SNR guidance_rescale {sampler}", ours, want)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ 2M Karras"])
def test_img2img_v_prediction_matches_diffusers(twins, sampler):
    kwargs = dict(TXT2IMG, strength=0.75, num_inference_steps=4)
    del kwargs["height"], kwargs["width"]
    ours = img2img(
        twins.ours, **kwargs, image=make_image(), generator=torch.Generator().manual_seed(8), sampler=sampler
    )
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, twins.ref, scheduler_twin(sampler, "v_prediction"))
    want = pipe(**kwargs, image=reference_image(), generator=torch.Generator().manual_seed(8)).images
    check_pixels("test_sd2_img2img_v", f"SD 2 img2img v_prediction {sampler} strength 0.75", ours, want)


@pytest.mark.parametrize("unet", ["9ch_epsilon", "4ch_blend_v"])
def test_inpaint_matches_diffusers(twins, unet):
    """512-inpainting-ema's case (9 channels, ε), and latent blending with a v-prediction model."""
    ours_components, prediction = (twins.ours9, "epsilon") if unet == "9ch_epsilon" else (twins.ours, "v_prediction")
    kwargs = dict(
        prompt="a photo of a cat", negative_prompt="blurry", mask_image=make_mask(), num_inference_steps=3,
        guidance_scale=7.5, num_images_per_prompt=2, output_type="np",
    )  # fmt: skip
    ours = inpaint(
        ours_components, **kwargs, image=make_image(), generator=torch.Generator().manual_seed(9), sampler="DDIM"
    )
    ref_unet = twins.ref.unet9 if unet == "9ch_epsilon" else twins.ref.unet
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, twins.ref, scheduler_twin("DDIM", prediction), ref_unet)
    want = pipe(**kwargs, image=reference_image(), generator=torch.Generator().manual_seed(9)).images
    check_pixels("test_sd2_inpaint", f"SD 2 inpaint {unet} DDIM", ours, want)


def test_sampler_object_must_match_the_model(twins):
    with pytest.raises(MinisdError, match=r"the sampler object has prediction_type='epsilon'.* but the model") as error:
        txt2img(twins.ours, **TXT2IMG, sampler=DDIMSampler())
    assert "\n" not in str(error.value)
    with pytest.raises(MinisdError, match="the PLMS sampler cannot start from pure noise"):
        txt2img(twins.ours, **TXT2IMG, sampler="PLMS", rescale_betas_zero_snr=True)
    with pytest.raises(MinisdError, match="prediction_type must be one of epsilon, v_prediction, got 'v'"):
        txt2img(twins.ours, **TXT2IMG, prediction_type="v")


# ---------------------------------------------------------------------------------------------------------------
# Full SD 2 size


def test_full_size_sd2_txt2img_v_prediction(twins):
    """The full SD 2.1 networks with random weights (865M UNet, 340M 23-layer text encoder, 84M VAE), 64×64 pixels,
    2 DDIM steps predicting v: minisd's pipeline = diffusers' StableDiffusionPipeline."""
    from tests.test_pipelines import random_full_size

    generator = torch.Generator().manual_seed(0)
    pool = torch.rand(2**26, generator=generator) * 2 - 1  # > the largest SD 2 tensor (49408 × 1024)
    unet_config = UNetConfig(
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True
    )
    text_config = TextEncoderConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
    )
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**asdict(unet_config))
        ref_vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        )  # fmt: skip
        unet, vae, text_encoder = UNet(unet_config), VAE(VAEConfig()), TextEncoder(text_config)
    ref_text_encoder = CLIPTextModel(CLIPTextConfig(**asdict(text_config)))  # not on meta: its position_ids buffer
    for ref_module, module in ((ref_unet, unet), (ref_vae, vae), (ref_text_encoder, text_encoder)):
        ref_module.load_state_dict(random_full_size(ref_module, pool, generator), strict=True, assign=True)
        module.load_state_dict(ref_module.state_dict(), strict=True, assign=True)
        ref_module.eval(), module.eval()
    del pool
    ours = types.SimpleNamespace(
        tokenizer=twins.ours.tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, prediction_type="v_prediction"
    )
    ref = types.SimpleNamespace(vae=ref_vae, text_encoder=ref_text_encoder, tokenizer=twins.ref.tokenizer)
    kwargs = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", height=SIZE)
    kwargs.update(width=SIZE, num_inference_steps=2, guidance_scale=7.5, output_type="np")
    latents = start_latents(1, seed=33)
    got = txt2img(ours, **kwargs, latents=latents.clone(), sampler="DDIM")
    pipe = reference_pipeline(StableDiffusionPipeline, ref, scheduler_twin("DDIM", "v_prediction"), unet=ref_unet)
    want = pipe(**kwargs, latents=latents.clone()).images
    check_pixels("test_full_size_sd2_txt2img", "txt2img full SD 2 size DDIM v_prediction", got, want)
