"""minisd's pipelines produce diffusers' images: txt2img, img2img and inpainting (the 9-channel UNet and latent
blending with a 4-channel one) against StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline built from twin networks with the same weights, the same tokenizer vocabulary and
schedulers configured as SD v1.5's scheduler_config.json, given the same prompts, starting latents and generators.

Tolerance: max |minisd − diffusers| <= 1e-3 on output_type "np" pixels in [0, 1]. Both sides run the same fp32 CPU
networks on the same inputs (each network is bit-equal to its twin, see test_unet/test_vae/test_clip); what
differs is the sampler arithmetic (minisd computes schedule coefficients in float64, diffusers in float32: ~1e-7
relative per step) and the order of a few element-wise operations. Over a handful of steps and the decoder that
stays near 1e-6 (the measured values are printed in the parity summary); 1e-3 is a quarter of one 8-bit level
(1/255 = 3.9e-3), so the saved PNGs are the same, while a wrong guidance formula, a missing init_noise_sigma, a
swapped negative/positive half, a wrong strength start or a wrong mask blend moves pixels by 1e-2 and more.
"""

import types
from dataclasses import asdict

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.images import pil_to_image
from minisd.pipelines.img2img import img2img
from minisd.pipelines.inpaint import inpaint
from minisd.pipelines.txt2img import txt2img
from minisd.tokenizer import Tokenizer
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from tests.parity import REPORT
from tests.reference import SD15_SCHEDULER_CONFIG, write_reference_tokenizer_folder

PIXEL_TOL = 1e-3  # on [0, 1] pixels; see the module docstring
SIZE = 64  # pixels: 8×8 latents
# SD v1 with small numbers. The UNet has 2 levels (cross-attention, then plain), so diffusers needs the block types
# spelled out; the VAE keeps SD v1's 4 levels, so its factor is 8 as in SD v1.
TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32)
UNET_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
TINY_VAE = VAEConfig(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
TINY_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


class RunOrderLMS(LMSDiscreteScheduler):
    """diffusers' LMS taking its order from the steps of THIS run (1, 2, 3, 4, 4, …), as k-diffusion and minisd do.
    Stock LMSDiscreteScheduler takes it from the absolute step index, so an img2img run that starts mid-schedule
    pairs order-4 coefficients with one stored slope (see minisd/samplers/lms.py); for a run from the top (txt2img,
    strength 1) this class changes nothing."""

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        steps_done = 0 if self.step_index is None else self.step_index - (self.begin_index or 0)
        return super().step(model_output, timestep, sample, order=min(steps_done + 1, order), return_dict=return_dict)


class FreshWarmupPNDM(PNDMScheduler):
    """diffusers' PLMS whose img2img run starts with its own warm-up step (see minisd/samplers/pndm.py): the slice
    the pipeline takes, timesteps[t_start:], is made to be the warm-up schedule of the last k steps. Stock PNDM's
    slice of the full run's warm-up schedule mislabels one step. For strength 1 this class changes nothing."""

    strength = 1.0

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        k = min(int(num_inference_steps * self.strength), num_inference_steps)
        t_start = num_inference_steps - k
        if t_start:
            last = torch.from_numpy(self._timesteps[:k].astype("int64"))  # the k smallest, increasing
            fresh = torch.cat([last[:-1], last[-2:-1], last[-1:]]).flip(0)  # PNDM's warm-up pattern for k steps
            self.timesteps = torch.cat([self.timesteps[:t_start], fresh])


SCHEDULERS = {  # minisd sampler name -> diffusers twin from SD v1.5's config
    "DDIM": lambda: DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
    "PLMS": lambda: FreshWarmupPNDM.from_config(SD15_SCHEDULER_CONFIG),
    "LMS": lambda: RunOrderLMS.from_config(SD15_SCHEDULER_CONFIG),
    "Euler a": lambda: EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
    "DPM++ 2M Karras": lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, use_karras_sigmas=True),
    "DPM++ 2M SDE": lambda: DPMSolverMultistepScheduler.from_config(
        SD15_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++"
    ),
}
SAMPLERS = list(SCHEDULERS)


# ---------------------------------------------------------------------------------------------------------------
# Twin networks


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight matters: norms away from (1, 0), conv/linear weights N(0, 1/fan_in), biases N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / module.weight[0].numel() ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))


def twin(ours: torch.nn.Module, ref: torch.nn.Module, seed: int) -> torch.nn.Module:
    randomize(ref.eval(), seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """ours: minisd components (4-channel UNet); ours9: with the 9-channel UNet; ref: the diffusers/transformers
    twins (ref.unet, ref.unet9, ref.vae, ref.text_encoder, ref.tokenizer)."""
    torch.manual_seed(0)  # diffusers/transformers initialise from the global generator; every weight is redrawn below
    ref_unet = UNet2DConditionModel(**asdict(TINY_UNET), **UNET_BLOCKS, sample_size=SIZE // 8)
    ref_unet9 = UNet2DConditionModel(**{**asdict(TINY_UNET), "in_channels": 9}, **UNET_BLOCKS, sample_size=SIZE // 8)
    n = len(TINY_VAE.block_out_channels)
    ref_vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **{k: v for k, v in asdict(TINY_VAE).items()},
    )
    ref_text_encoder = CLIPTextModel(CLIPTextConfig(**asdict(TINY_TEXT)))
    unet = twin(UNet(TINY_UNET), ref_unet, seed=1)
    unet9 = twin(UNet(UNetConfig(**{**asdict(TINY_UNET), "in_channels": 9})), ref_unet9, seed=2)
    vae = twin(VAE(TINY_VAE), ref_vae, seed=3)
    text_encoder = twin(TextEncoder(TINY_TEXT), ref_text_encoder, seed=4)
    # diffusers 0.42.1 reads `text_encoder.text_model.final_layer_norm` for clip_skip, a path transformers 5.x's
    # CLIPTextModel no longer has (it holds final_layer_norm itself): give it that path to the same module.
    ref_text_encoder.text_model = types.SimpleNamespace(final_layer_norm=ref_text_encoder.final_layer_norm)
    folder = tmp_path_factory.mktemp("sd") / "tokenizer"
    write_reference_tokenizer_folder(folder)
    ref_tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer = Tokenizer.from_default()
    ours = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)
    ours9 = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet9)
    ref = types.SimpleNamespace(
        unet=ref_unet, unet9=ref_unet9, vae=ref_vae, text_encoder=ref_text_encoder, tokenizer=ref_tokenizer
    )
    return types.SimpleNamespace(ours=ours, ours9=ours9, ref=ref)


def reference_pipeline(pipeline_class, ref, sampler: str, unet=None, strength: float = 1.0):
    scheduler = SCHEDULERS[sampler]()
    scheduler.strength = strength  # read by FreshWarmupPNDM only
    pipe = pipeline_class(
        vae=ref.vae,
        text_encoder=ref.text_encoder,
        tokenizer=ref.tokenizer,
        unet=unet or ref.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pixels(test: str, case: str, ours, want) -> float:
    """max |ours − want| on [0, 1] pixels, recorded for the parity summary."""
    assert ours.shape == want.shape, f"{case}: shape {ours.shape} != {want.shape}"
    ours, want = torch.from_numpy(ours).double(), torch.from_numpy(want).double()
    err = (ours - want).abs().max().item()
    REPORT.append((test, f"pipeline {case} (abs, [0, 1] pixels)", err, PIXEL_TOL))
    assert err <= PIXEL_TOL, f"{case}: max |minisd − diffusers| = {err:.3g} > {PIXEL_TOL}"
    # The comparison means something only if the images are not flat or clipped everywhere.
    assert want.std() > 0.02 and ((want > 0.001) & (want < 0.999)).float().mean() > 0.5, f"{case}: degenerate"
    return err


def make_image(seed: int = 5) -> Image.Image:
    """A smooth random RGB picture, SIZE × SIZE."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 8, 8, generator=g)
    pixels = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    pixels = (pixels[0] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (SIZE, SIZE), bytes(pixels.flatten().tolist()))


def reference_image() -> torch.Tensor:
    """make_image() as the (1, 3, h, w) tensor in [-1, 1] diffusers' preprocessing makes of it, but contiguous:
    diffusers' own conversion leaves PIL's channels-last strides, on which the VAE's CPU convolutions run ~50×
    slower (minisd makes its input contiguous). diffusers takes a tensor with values < 0 as already normalised."""
    return pil_to_image(make_image()).contiguous()


def make_mask() -> Image.Image:
    """White (repaint) rectangle on black (keep), not aligned to the 8-pixel latent grid on every side."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (12, 16, 44, 52))
    return mask


def start_latents(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# txt2img

TXT2IMG_CASES = {
    # guidance off: one prompt, one UNet batch
    "no_guidance": dict(prompt="a photo of a cat", guidance_scale=1.0, num_images_per_prompt=1),
    # guidance on: 2 prompts × 2 images, with negative prompts
    "guidance_batch": dict(
        prompt=["a photo of a cat", "a red fox in the snow"],
        negative_prompt=["blurry", "low quality, watermark"],
        guidance_scale=7.5,
        num_images_per_prompt=2,
    ),
}


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_matches_diffusers(twins, sampler, case):
    kwargs = TXT2IMG_CASES[case]
    batch = len(kwargs["prompt"]) * kwargs["num_images_per_prompt"] if isinstance(kwargs["prompt"], list) else 1
    latents = start_latents(batch, seed=10)
    common = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np", **kwargs)
    ours = txt2img(
        twins.ours, **common, latents=latents.clone(), generator=torch.Generator().manual_seed(7), sampler=sampler
    )
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, sampler)
    want = pipe(**common, latents=latents.clone(), generator=torch.Generator().manual_seed(7)).images
    check_pixels(f"test_txt2img[{sampler}-{case}]", f"txt2img {sampler} {case}", ours, want)


@pytest.mark.parametrize(
    "case",
    [
        dict(sampler="Euler a", seed_only=True),  # no latents: the starting noise is drawn from the generator too
        dict(sampler="DDIM", eta=1.0),  # DDIM's per-step noise from the generator
        dict(sampler="DPM++ 2M Karras", guidance_rescale=0.7),  # Lin et al. 2023's rescale
        dict(sampler="LMS", clip_skip=1, guidance_scale=1.0),  # diffusers skips layers for the positive prompt only
        dict(sampler="DDIM", seed_only=True, height=72, width=40),  # 9x5 latents: odd sizes through the UNet
    ],
    ids=["generator_noise", "ddim_eta", "guidance_rescale", "clip_skip", "odd_size"],
)
def test_txt2img_options_match_diffusers(twins, case):
    case = dict(case)
    sampler, seed_only = case.pop("sampler"), case.pop("seed_only", False)
    eta = case.pop("eta", None)  # None: the sampler's own (Euler a: η = 1, diffusers' only one)
    kwargs = dict(
        prompt=["a cat", "a dog"], negative_prompt=["ugly", "dull"], guidance_scale=5.0, height=SIZE, width=SIZE
    )
    kwargs.update(num_inference_steps=3, output_type="np", **case)
    if kwargs["guidance_scale"] <= 1:
        del kwargs["negative_prompt"]
    latents = None if seed_only else start_latents(2, seed=11)
    ours = txt2img(twins.ours, **kwargs, latents=latents, seed=3, sampler=sampler, eta=eta)
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, sampler)
    want = pipe(**kwargs, latents=latents, eta=eta or 0.0, generator=torch.Generator().manual_seed(3)).images
    check_pixels("test_txt2img_options", f"txt2img {sampler} {case or 'generator noise'}", ours, want)


@pytest.mark.parametrize("negative", ["empty_prompt", "negative_embeds"])
def test_txt2img_prompt_embeds_match_diffusers(twins, negative):
    """The caller's own embeddings; without negative_prompt_embeds both sides encode "" for the negative half."""
    g = torch.Generator().manual_seed(14)
    embeds = {"prompt_embeds": torch.randn(2, 77, TINY_TEXT.hidden_size, generator=g)}
    if negative == "negative_embeds":
        embeds["negative_prompt_embeds"] = torch.randn(2, 77, TINY_TEXT.hidden_size, generator=g)
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=6.0, output_type="np")
    latents = start_latents(2, seed=15)
    ours = txt2img(twins.ours, **kwargs, **embeds, latents=latents.clone(), sampler="DDIM")
    pipe = reference_pipeline(StableDiffusionPipeline, twins.ref, "DDIM")
    want = pipe(**kwargs, **embeds, latents=latents.clone()).images
    check_pixels("test_txt2img_prompt_embeds", f"txt2img DDIM prompt_embeds {negative}", ours, want)


# ---------------------------------------------------------------------------------------------------------------
# img2img


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers(twins, sampler, strength):
    # 4 steps: strength 0.3 runs 1 step, 0.75 runs 3, 1.0 all 4
    kwargs = dict(
        prompt=["a photo of a cat", "a red fox"],
        negative_prompt=["blurry", "ugly"],
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.5,
        num_images_per_prompt=1,
        output_type="np",
    )
    ours = img2img(
        twins.ours, **kwargs, image=make_image(), generator=torch.Generator().manual_seed(8), sampler=sampler
    )
    pipe = reference_pipeline(StableDiffusionImg2ImgPipeline, twins.ref, sampler, strength=strength)
    want = pipe(**kwargs, image=reference_image(), generator=torch.Generator().manual_seed(8)).images
    check_pixels(f"test_img2img[{sampler}-{strength}]", f"img2img {sampler} strength {strength}", ours, want)


# ---------------------------------------------------------------------------------------------------------------
# inpainting


@pytest.mark.parametrize("unet", ["9ch", "4ch_blend"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpaint_matches_diffusers(twins, sampler, unet):
    ours_components = twins.ours9 if unet == "9ch" else twins.ours
    kwargs = dict(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        mask_image=make_mask(),
        num_inference_steps=3,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        output_type="np",
    )
    ours = inpaint(
        ours_components, **kwargs, image=make_image(), generator=torch.Generator().manual_seed(9), sampler=sampler
    )
    ref_unet = twins.ref.unet9 if unet == "9ch" else twins.ref.unet
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, twins.ref, sampler, unet=ref_unet)
    # diffusers encodes (and samples) the masked image even for a 4-channel UNet, which never reads it; minisd skips
    # that draw. Giving diffusers these (unused) latents skips it there too, so both draw the same per-step noise.
    extra = {"masked_image_latents": torch.zeros(1, 4, SIZE // 8, SIZE // 8)} if unet == "4ch_blend" else {}
    want = pipe(**kwargs, **extra, image=reference_image(), generator=torch.Generator().manual_seed(9)).images
    check_pixels(f"test_inpaint[{sampler}-{unet}]", f"inpaint {sampler} {unet}", ours, want)


@pytest.mark.parametrize("unet", ["9ch", "4ch_blend"])
def test_inpaint_strength_matches_diffusers(twins, unet):
    ours_components = twins.ours9 if unet == "9ch" else twins.ours
    kwargs = dict(prompt=["a cat", "a dog"], mask_image=make_mask(), strength=0.75)
    kwargs.update(num_inference_steps=4, guidance_scale=7.5, output_type="np")
    ours = inpaint(
        ours_components, **kwargs, image=make_image(), generator=torch.Generator().manual_seed(4), sampler="DDIM"
    )
    ref_unet = twins.ref.unet9 if unet == "9ch" else twins.ref.unet
    pipe = reference_pipeline(StableDiffusionInpaintPipeline, twins.ref, "DDIM", unet=ref_unet)
    extra = {"masked_image_latents": torch.zeros(1, 4, SIZE // 8, SIZE // 8)} if unet == "4ch_blend" else {}
    want = pipe(**kwargs, **extra, image=reference_image(), generator=torch.Generator().manual_seed(4)).images
    check_pixels("test_inpaint_strength", f"inpaint DDIM {unet} strength 0.75", ours, want)


# ---------------------------------------------------------------------------------------------------------------
# Outputs, callback, determinism


def test_output_types_agree(twins):
    kwargs = dict(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=2, latents=start_latents(1, seed=12))
    pixels = txt2img(twins.ours, **kwargs, output_type="np")
    assert pixels.shape == (1, SIZE, SIZE, 3) and pixels.dtype.name == "float32"
    pt = txt2img(twins.ours, **kwargs, output_type="pt")
    assert pt.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(pt.permute(0, 2, 3, 1), torch.from_numpy(pixels), rtol=0, atol=0)
    (pil,) = txt2img(twins.ours, **kwargs, output_type="pil")
    assert pil.size == (SIZE, SIZE) and pil.mode == "RGB"
    expected = (torch.from_numpy(pixels[0]) * 255).round().to(torch.uint8)
    assert pil.tobytes() == bytes(expected.flatten().tolist())
    latents = txt2img(twins.ours, **kwargs, output_type="latent")
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)


def test_callback_sees_every_step_and_can_stop(twins):
    seen = []

    def callback(step, timestep, latents):
        seen.append((step, float(timestep), latents.clone()))
        return step < 1  # False after the second step: stop

    kwargs = dict(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=4, sampler="Euler a", seed=1)
    out = txt2img(twins.ours, **kwargs, callback=callback, output_type="latent")
    assert [s for s, _, _ in seen] == [0, 1]
    assert seen[0][1] == 999.0  # Euler a's first timestep (linspace from T − 1)
    torch.testing.assert_close(out, seen[1][2], rtol=0, atol=0)  # the run stopped with those latents
    full = txt2img(twins.ours, **kwargs, callback=lambda *args: None, output_type="latent")  # None continues
    assert not torch.equal(full, out)


@pytest.mark.parametrize("pipeline", ["txt2img", "img2img", "inpaint"])
def test_same_seed_same_bytes(twins, pipeline):
    """No hidden state and no global seeding: a seed fixes the result, byte for byte, run after run."""
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, sampler="Euler a", output_type="np")
    if pipeline == "txt2img":
        run = lambda seed: txt2img(twins.ours, **kwargs, height=SIZE, width=SIZE, seed=seed)  # noqa: E731
    elif pipeline == "img2img":
        run = lambda seed: img2img(twins.ours, **kwargs, image=make_image(), strength=0.75, seed=seed)  # noqa: E731
    else:
        run = lambda seed: inpaint(twins.ours9, **kwargs, image=make_image(), mask_image=make_mask(), seed=seed)  # noqa: E731
    first = run(42)
    torch.manual_seed(0)  # the global generator's state must not matter
    assert run(42).tobytes() == first.tobytes()
    assert run(43).tobytes() != first.tobytes()


def test_paste_unmasked_keeps_the_pixels_outside_the_mask(twins):
    image, mask = make_image(), make_mask()
    kwargs = dict(prompt="a cat", image=image, mask_image=mask, num_inference_steps=2, seed=0)
    (pasted,) = inpaint(twins.ours, **kwargs, paste_unmasked=True)
    (plain,) = inpaint(twins.ours, **kwargs)
    keep = torch.tensor(list(mask.getdata())).reshape(SIZE, SIZE) < 128
    as_tensor = lambda pil: torch.tensor(list(pil.getdata())).reshape(SIZE, SIZE, 3)  # noqa: E731
    assert torch.equal(as_tensor(pasted)[keep], as_tensor(image)[keep])  # exactly the input's bytes
    assert torch.equal(as_tensor(pasted)[~keep], as_tensor(plain)[~keep])  # the repainted part untouched
    assert not torch.equal(as_tensor(plain)[keep], as_tensor(image)[keep])  # the VAE round trip alone changes them


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one-line MinisdError naming the parameter, before any network runs

GOOD = {
    "txt2img": dict(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=2),
    "img2img": dict(prompt="a cat", num_inference_steps=2),
    "inpaint": dict(prompt="a cat", num_inference_steps=2),
}
BAD_INPUTS = [  # (pipeline, changed arguments, text the message must hold)
    ("txt2img", dict(height=60), "height"),
    ("txt2img", dict(width=0), "width"),
    ("txt2img", dict(height=64.0), "height"),
    ("txt2img", dict(width=8200), "width"),  # past MAX_SIDE: an error, not hours of sampling or an OOM
    ("txt2img", dict(num_inference_steps=0), "num_inference_steps"),
    ("txt2img", dict(guidance_scale=float("nan")), "guidance_scale"),
    ("txt2img", dict(guidance_scale=-1.0), "guidance_scale"),
    ("txt2img", dict(guidance_rescale=1.5), "guidance_rescale"),
    ("txt2img", dict(prompt=[]), "prompt"),
    ("txt2img", dict(prompt=None), "prompt"),
    ("txt2img", dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
    ("txt2img", dict(sampler="Euler b"), "sampler"),
    ("txt2img", dict(sampler="Euler", eta=0.5), "eta"),
    ("txt2img", dict(sampler="Euler a", eta=1.5), "eta"),
    ("txt2img", dict(num_images_per_prompt=0), "num_images_per_prompt"),
    ("txt2img", dict(output_type="jpg"), "output_type"),
    ("txt2img", dict(clip_skip=3), "clip_skip"),
    ("txt2img", dict(callback="print"), "callback"),
    ("txt2img", dict(seed=1, generator=torch.Generator()), "seed"),
    ("txt2img", dict(generator=7), "generator"),
    ("txt2img", dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
    ("txt2img", dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64)), "latents"),
    ("txt2img", dict(latents=torch.zeros(1, 4, 8, 8, device="meta")), "latents"),
    ("txt2img", dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "latents"),
    ("txt2img", dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 31)), "prompt_embeds"),
    (
        "txt2img",
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)) | {"negative_prompt_embeds": torch.zeros(2, 77, 32)},
        "negative_prompt_embeds",
    ),
    ("txt2img", dict(prompt_embeds=torch.zeros(1, 77, 32)), "prompt"),
    ("txt2img_9ch", dict(), "in_channels"),
    ("img2img", dict(strength=0.0), "strength"),
    ("img2img", dict(strength=1.5), "strength"),
    ("img2img", dict(strength=0.2), "strength"),  # 2 steps · 0.2 < 1: no step would run
    ("img2img", dict(image=None), "image"),
    ("img2img", dict(image=Image.new("RGB", (SIZE + 4, SIZE))), "image"),  # not a multiple of 8
    ("img2img", dict(image=[make_image()] * 3, prompt=["a", "b"]), "image"),
    ("img2img_9ch", dict(), "in_channels"),
    ("inpaint", dict(mask_image=Image.new("L", (SIZE, SIZE + 64))), "mask_image"),
    ("inpaint", dict(mask_image=torch.zeros(1, 1, SIZE, SIZE // 2)), "mask_image"),
    ("inpaint", dict(mask_image=None), "mask_image"),
    ("inpaint", dict(paste_unmasked=True, output_type="latent"), "paste_unmasked"),
    ("inpaint", dict(latents=torch.zeros(2, 4, 8, 8)), "latents"),
]


@pytest.mark.parametrize(("pipeline", "changes", "names"), BAD_INPUTS, ids=[f"{p}-{n}" for p, _, n in BAD_INPUTS])
def test_bad_input_is_refused_before_any_compute(twins, pipeline, changes, names):
    components = twins.ours9 if pipeline.endswith("_9ch") else twins.ours
    pipeline = pipeline.removesuffix("_9ch")
    kwargs = dict(GOOD[pipeline])
    if pipeline != "txt2img":
        kwargs |= {"image": make_image()} | ({"mask_image": make_mask()} if pipeline == "inpaint" else {})
    kwargs |= changes
    calls = []
    networks = [components.unet, components.text_encoder, components.vae.encoder, components.vae.decoder]
    hooks = [net.register_forward_pre_hook(lambda *args: calls.append(1)) for net in networks]
    try:
        with pytest.raises(MinisdError, match=names) as error:
            {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}[pipeline](components, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert "\n" not in str(error.value)
    assert not calls, "a network ran before the arguments were checked"


# ---------------------------------------------------------------------------------------------------------------
# Full SD v1 size (random weights), one short run


def random_full_size(module: torch.nn.Module, pool: torch.Tensor, generator: torch.Generator) -> dict:
    """Random tensors for every parameter of `module` (built on meta), cheaply: windows of one uniform pool at
    random offsets, scaled so activations stay O(1) through SD v1's depth (weights std 1/√fan_in, norms near 1)."""
    state_dict = {}
    for name, p in module.state_dict().items():
        start = torch.randint(0, len(pool) - p.numel(), (1,), generator=generator).item()
        window = pool[start : start + p.numel()].reshape(p.shape)  # uniform in [−1, 1], std 1/√3
        if p.ndim >= 2:  # conv, linear, embedding weights
            state_dict[name] = window * (3 / p[0].numel()) ** 0.5
        elif "norm" in name and name.endswith("weight"):
            state_dict[name] = 1 + 0.1 * window
        else:
            state_dict[name] = 0.05 * window
    return state_dict


def test_full_size_sd_v1_txt2img_matches_diffusers(twins):
    """SD v1's real sizes (860M-parameter UNet, VAE, CLIP ViT-L/14 text encoder) with random weights, 64×64 pixels,
    2 DDIM steps (PLMS would make 3 UNet calls) with guidance. Each pair shares one set of tensors (assign=True):
    ~4.3 GB."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.rand(2**26, generator=generator) * 2 - 1  # > the largest SD v1 tensor (49408 × 768)
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**asdict(UNetConfig()))
        ref_vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
        unet, vae, text_encoder = UNet(UNetConfig()), VAE(VAEConfig()), TextEncoder(TextEncoderConfig())
    # Not on meta: CLIPTextModel computes its position_ids buffer in __init__ (not in the state dict, so it would stay
    # on meta and the forward would read garbage).
    ref_text_encoder = CLIPTextModel(CLIPTextConfig(**asdict(TextEncoderConfig())))
    for ref_module, module in ((ref_unet, unet), (ref_vae, vae), (ref_text_encoder, text_encoder)):
        ref_module.load_state_dict(random_full_size(ref_module, pool, generator), strict=True, assign=True)
        module.load_state_dict(ref_module.state_dict(), strict=True, assign=True)
        ref_module.eval(), module.eval()
    del pool
    ours = types.SimpleNamespace(tokenizer=twins.ours.tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)
    ref = types.SimpleNamespace(vae=ref_vae, text_encoder=ref_text_encoder, tokenizer=twins.ref.tokenizer)
    kwargs = dict(prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", height=SIZE)
    kwargs.update(width=SIZE, num_inference_steps=2, guidance_scale=7.5, output_type="np")
    latents = start_latents(1, seed=13)
    got = txt2img(ours, **kwargs, latents=latents.clone(), sampler="DDIM")
    pipe = reference_pipeline(StableDiffusionPipeline, ref, "DDIM", unet=ref_unet)
    want = pipe(**kwargs, latents=latents.clone()).images
    check_pixels("test_full_size_sd_v1_txt2img", "txt2img full SD v1 size DDIM", got, want)


# ---------------------------------------------------------------------------------------------------------------
# One seed, one image on CPU and CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", ["txt2img", "img2img", "inpaint"])
def test_seed_gives_the_same_image_on_cuda(twins, pipeline):
    """Every draw is made in float32 on the CPU from the seed's generator and then moved, so CUDA starts from the
    same noise; what remains is fp32 kernel rounding (TF32 convolutions off here: they round to 10 mantissa bits)."""
    import copy

    def on_cuda(components):
        moved = {k: copy.deepcopy(getattr(components, k)).cuda() for k in ("text_encoder", "vae", "unet")}
        return types.SimpleNamespace(tokenizer=components.tokenizer, **moved)

    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, sampler="Euler a", output_type="np", seed=5)
    runs = {
        "txt2img": lambda c: txt2img(c, **kwargs, height=SIZE, width=SIZE),
        "img2img": lambda c: img2img(c, **kwargs, image=make_image(), strength=0.75),
        "inpaint": lambda c: inpaint(c, **kwargs, image=make_image(), mask_image=make_mask(), paste_unmasked=True),
    }
    components = twins.ours9 if pipeline == "inpaint" else twins.ours
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        got = runs[pipeline](on_cuda(components))
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    want = runs[pipeline](components)
    check_pixels("test_seed_on_cuda", f"{pipeline} CUDA vs CPU, same seed", got, want)
