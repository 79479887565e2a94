"""Kandinsky 2.2's pipelines, live against diffusers' at tiny sizes with random weights: the prior alone
(KandinskyV22PriorPipeline), the decoder alone from image embeddings (KandinskyV22Pipeline), and prompt -> image
for all three tasks (KandinskyV22{,Img2Img,Inpaint}CombinedPipeline), with one generator driving both sides."""

import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22InpaintCombinedPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    UnCLIPScheduler,
)
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask
from PIL import Image
from transformers import CLIPImageProcessor

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.kandinsky.image_encoder import ImageEncoder, ImageEncoderConfig
from minisd.kandinsky.movq import MoVQ
from minisd.kandinsky.pipelines.common import grow_repaint_area
from minisd.kandinsky.pipelines.img2img import img2img
from minisd.kandinsky.pipelines.inpaint import inpaint
from minisd.kandinsky.pipelines.prior import interpolate, prior
from minisd.kandinsky.pipelines.txt2img import txt2img
from minisd.kandinsky.prior import Prior, PriorConfig
from minisd.kandinsky.unet import DecoderUNet
from minisd.tokenizer import Tokenizer
from tests.kandinsky_reference import (
    DECODER_SCHEDULER,
    IMAGE_PROCESSOR,
    PRIOR_SCHEDULER,
    PRIOR_TINY,
    TEXT,
    VISION,
    D,
    diffusers_config,
    tiny_reference,
)
from tests.parity import assert_parity
from tests.reference import write_reference_tokenizer_folder
from tests.test_kandinsky_models import MOVQ_TINY, UNET_TINY
from tests.test_kandinsky_prior import without_prefix

SIZE = 32  # pixels: 16×16 tiny-MoVQ latents, a multiple of the tiny UNet's 4

# Both sides run the same fp32 networks (bit-equal module by module, see test_kandinsky_models/prior) and the same
# draws; what differs is the schedules' arithmetic: minisd's ᾱ in float64, diffusers' in float32. The prior's last
# step carries most of it: diffusers' x0 weight there is 0.99947 instead of 1 (float32 1 − ᾱ_0, see
# test_unclip_sampler_follows_diffusers_step_by_step), so its image embeddings are 5e-4 off, and the decoder passes
# a fraction of that on. Measured on the images ([0, 1]): 5e-5 (txt2img) to 2.1e-4 (inpaint); the bar 1e-3 keeps
# margin and fails on any real slip (a swapped guidance half, a mask not grown, no blending: 1e-2 to O(1)).
PIPELINE_TOL = 1e-3
EMBEDS_TOL = 2e-3  # the prior's own outputs: measured 5.3e-4 (that float32 weight alone)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """diffusers' parts and minisd's modules holding the same tiny random weights."""
    tokenizer_dir = write_reference_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))
    ref = tiny_reference(tokenizer_dir)

    def load(module, state_dict):
        module.load_state_dict(state_dict, strict=True)
        return module.eval()

    text_fields = {k: v for k, v in TEXT.items() if k in TextEncoderConfig.__dataclass_fields__}
    vision_fields = {k: v for k, v in VISION.items() if k in ImageEncoderConfig.__dataclass_fields__}
    ours = types.SimpleNamespace(
        unet=load(DecoderUNet(UNET_TINY), ref.unet.state_dict()),
        movq=load(MoVQ(MOVQ_TINY), ref.movq.state_dict()),
        prior=load(Prior(PriorConfig(**PRIOR_TINY)), ref.prior.state_dict()),
        text_encoder=load(
            TextEncoder(TextEncoderConfig(**text_fields, with_projection=True)),
            without_prefix(ref.text_encoder.state_dict(), "text_model."),
        ),
        image_encoder=load(
            ImageEncoder(ImageEncoderConfig(**vision_fields)),
            without_prefix(ref.image_encoder.state_dict(), "vision_model."),
        ),
        tokenizer=Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"),
    )
    ours_inpaint = types.SimpleNamespace(**{**vars(ours), "unet": load(DecoderUNet(
        type(UNET_TINY)(**{**vars(UNET_TINY), "in_channels": 9})), ref.inpaint_unet.state_dict())})  # fmt: skip
    return ref, ours, ours_inpaint


def combined(pipeline_class, ref, unet):
    return pipeline_class(
        unet=unet, scheduler=DDPMScheduler.from_config(DECODER_SCHEDULER), movq=ref.movq, prior_prior=ref.prior,
        prior_image_encoder=ref.image_encoder, prior_text_encoder=ref.text_encoder, prior_tokenizer=ref.tokenizer,
        prior_scheduler=UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER)), prior_image_processor=ref.image_processor,
    )  # fmt: skip


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB test picture of the given size (noise, so resampling shows)."""
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.mark.parametrize(
    ("prompt", "negative_prompt", "n", "guidance"),
    [("a red fox", None, 2, 4.0), (["a fox", "two cats on a mat"], ["blurry", ""], 1, 3.0), ("a fox", None, 1, 1.0)],
)
def test_prior_equals_diffusers(twins, prompt, negative_prompt, n, guidance):
    ref, ours, _ = twins
    pipe = KandinskyV22PriorPipeline(
        prior=ref.prior, image_encoder=ref.image_encoder, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
        scheduler=UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER)), image_processor=ref.image_processor,
    )  # fmt: skip
    want = pipe(prompt, negative_prompt, num_images_per_prompt=n, num_inference_steps=4, guidance_scale=guidance,
                generator=generator())  # fmt: skip
    got = prior(ours, prompt, negative_prompt, num_images_per_prompt=n, num_inference_steps=4,
                guidance_scale=guidance, generator=generator())  # fmt: skip
    test = f"test_prior_equals_diffusers[{negative_prompt is not None}-{n}-{guidance}]"
    assert_parity(test, "prior image_embeds", got.image_embeds, want.image_embeds, EMBEDS_TOL)
    assert_parity(
        test, "prior negative_image_embeds", got.negative_image_embeds, want.negative_image_embeds, EMBEDS_TOL
    )


def test_interpolate_equals_diffusers(twins):
    """A mix of two prompts and a picture (CLIP's preprocessing of a 60×40 image: resize, centre crop)."""
    ref, ours, _ = twins
    pipe = KandinskyV22PriorPipeline(
        prior=ref.prior, image_encoder=ref.image_encoder, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
        scheduler=UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER)), image_processor=ref.image_processor,
    )  # fmt: skip
    pipe.image_processor = CLIPImageProcessor(**{**IMAGE_PROCESSOR, "size": 28, "crop_size": 28})  # the tiny tower
    items = ["a red fox", picture(60, 40, seed=8), "snow"]
    want = pipe.interpolate(items, [0.5, 0.3, 0.2], num_images_per_prompt=2, num_inference_steps=3,
                            generator=generator(4))  # fmt: skip
    got = interpolate(ours, items, [0.5, 0.3, 0.2], num_images_per_prompt=2, num_inference_steps=3,
                      generator=generator(4))  # fmt: skip
    assert_parity("test_interpolate_equals_diffusers", "interpolate image_embeds", got.image_embeds,
                  want.image_embeds, EMBEDS_TOL)  # fmt: skip
    assert_parity("test_interpolate_equals_diffusers", "interpolate negative", got.negative_image_embeds,
                  want.negative_image_embeds, EMBEDS_TOL)  # fmt: skip


def test_decoder_from_image_embeds_equals_diffusers(twins):
    ref, ours, _ = twins
    pipe = KandinskyV22Pipeline(unet=ref.unet, scheduler=DDPMScheduler.from_config(DECODER_SCHEDULER), movq=ref.movq)
    g = generator(3)
    image_embeds, negative_image_embeds = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 5, "guidance_scale": 4.0}
    want = pipe(image_embeds, negative_image_embeds, num_images_per_prompt=2, generator=generator(), output_type="np",
                **kwargs).images  # fmt: skip
    got = txt2img(ours, image_embeds=image_embeds, negative_image_embeds=negative_image_embeds,
                  num_images_per_prompt=2, generator=generator(), output_type="np", **kwargs)  # fmt: skip
    # No prior here: the whole difference is the DDPM table's float32 rounding, measured 1.5e-6.
    assert_parity(
        "test_decoder_from_image_embeds_equals_diffusers",
        "decoder images",
        torch.from_numpy(got),
        torch.from_numpy(want),
        1e-4,
    )


@pytest.mark.parametrize(("negative_prompt", "n"), [(None, 1), ("ugly, blurry", 2)])
def test_txt2img_equals_diffusers(twins, negative_prompt, n):
    ref, ours, _ = twins
    pipe = combined(KandinskyV22CombinedPipeline, ref, ref.unet)
    kwargs = {"negative_prompt": negative_prompt, "num_inference_steps": 4, "prior_num_inference_steps": 3,
              "num_images_per_prompt": n, "height": SIZE, "width": SIZE}  # fmt: skip
    want = pipe("a watercolour fox", generator=generator(1), output_type="np", **kwargs).images
    got = txt2img(ours, "a watercolour fox", generator=generator(1), output_type="np", **kwargs)
    assert_parity(f"test_txt2img_equals_diffusers[{n}]", "txt2img images", torch.from_numpy(got),
                  torch.from_numpy(want), PIPELINE_TOL)  # fmt: skip


def test_img2img_equals_diffusers(twins):
    ref, ours, _ = twins
    pipe = combined(KandinskyV22Img2ImgCombinedPipeline, ref, ref.unet)
    image = picture(45, 27, seed=4)  # not the output size: both resize it (PIL bicubic, reducing_gap=1)
    kwargs = {"strength": 0.5, "num_inference_steps": 8, "prior_num_inference_steps": 3, "height": SIZE,
              "width": SIZE, "negative_prompt": "dark"}  # fmt: skip
    want = pipe("a cat wizard", image=image, generator=generator(2), output_type="np", **kwargs).images
    got = img2img(ours, "a cat wizard", image=image, generator=generator(2), output_type="np", **kwargs)
    assert_parity("test_img2img_equals_diffusers", "img2img images", torch.from_numpy(got), torch.from_numpy(want),
                  PIPELINE_TOL)  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["pil", "numpy"])
def test_inpaint_equals_diffusers(twins, mask_kind):
    ref, _, ours = twins
    pipe = combined(KandinskyV22InpaintCombinedPipeline, ref, ref.inpaint_unet)
    image = picture(40, 48, seed=5)
    if mask_kind == "pil":  # white = repaint; a size of its own, resized with Lanczos by both
        mask = Image.new("L", (20, 24), 0)
        mask.paste(255, (5, 3, 14, 12))
    else:  # an array at the output size, taken as it is
        mask = np.zeros((SIZE, SIZE), dtype=np.float32)
        mask[4:15, 10:27] = 1
    kwargs = {"num_inference_steps": 4, "prior_num_inference_steps": 3, "height": SIZE, "width": SIZE,
              "negative_prompt": "bad anatomy"}  # fmt: skip
    want = pipe("a black cat", image=image, mask_image=mask, generator=generator(3), output_type="np", **kwargs).images
    got = inpaint(ours, "a black cat", image=image, mask_image=mask, generator=generator(3), output_type="np", **kwargs)
    assert_parity(f"test_inpaint_equals_diffusers[{mask_kind}]", "inpaint images", torch.from_numpy(got),
                  torch.from_numpy(want), PIPELINE_TOL)  # fmt: skip


def test_grown_repaint_area_equals_diffusers_prepare_mask():
    repaint = (torch.rand(3, 1, 9, 11, generator=generator(6)) < 0.15).float()
    keep = prepare_mask(1 - repaint.clone())  # diffusers works on the keep mask, loop by loop
    torch.testing.assert_close(1 - grow_repaint_area(repaint), keep, rtol=0, atol=0)


def test_bad_arguments_are_one_line(twins):
    _, ours, ours_inpaint = twins
    cases = [
        (lambda: txt2img(ours, "a", height=33, width=SIZE), "height must be a multiple of 8"),
        (lambda: txt2img(ours), "give prompt or image_embeds"),
        (lambda: txt2img(ours, "a", sampler="Euler"), "sampler must be one of DDPM, DDIM"),
        (lambda: txt2img(ours, image_embeds=torch.zeros(1, 7)), "image_embeds must be a floating (b, 40)"),
        (lambda: img2img(ours, "a", image=picture(8, 8, 0), strength=0.0, height=SIZE, width=SIZE), "strength"),
        (lambda: img2img(ours, "a", image=torch.zeros(1, 3, 8, 8), height=SIZE, width=SIZE), "tensor must be 32x32"),
        (lambda: inpaint(ours, "a", image=picture(8, 8, 0), mask_image=picture(8, 8, 0), height=SIZE, width=SIZE),
         "in_channels 9"),
        (lambda: inpaint(ours_inpaint, "a", image=picture(8, 8, 0), mask_image=np.zeros((3, 3)), height=SIZE,
                         width=SIZE), "mask_image must be 32x32"),
        (lambda: txt2img(ours_inpaint, "a"), "in_channels 4"),
    ]  # fmt: skip
    for call, fragment in cases:
        with pytest.raises(MinisdError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
