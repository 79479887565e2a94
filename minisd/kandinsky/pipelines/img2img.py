"""Kandinsky 2.2 image to image (SDEdit, Meng et al. 2021): the prior embeds the prompt, MoVQ encodes the image,
its latents are noised part of the way up the chain and denoised from there. Equal to diffusers'
KandinskyV22Img2ImgCombinedPipeline (= the prior, then KandinskyV22Img2ImgPipeline).

strength s ∈ (0, 1] keeps the last ⌊n · s⌋ of the n scheduled steps (samplers.base.img2img_start). Kandinsky's
default is 0.3: a light touch (SD's is 0.8).

code                  lesson / paper                                   diffusers
image_latents         x_0 = MoVQ's encoding of the image (unscaled)    latents (before add_noise)
latents               x_t: x_0 noised to t_start, then denoised        latents
noise_pred_uncond     ε_θ(x_t, t, c_neg)                                noise_pred_uncond
noise_pred_text       ε_θ(x_t, t, c)                                    noise_pred_text
guidance_scale        w: ε = ε_neg + w · (ε_c − ε_neg)                  guidance_scale
"""

import torch
from PIL import Image
from torch import Generator, Tensor

from minisd.kandinsky.pipelines import common
from minisd.kandinsky.pipelines.txt2img import image_embeds_for
from minisd.noise import randn
from minisd.pipelines import checks
from minisd.pipelines import common as sd_common
from minisd.samplers import Sampler


@torch.no_grad()
def img2img(
    components,
    prompt: str | list[str] | None = None,
    image: Image.Image | list[Image.Image] | Tensor | None = None,
    strength: float = 0.3,
    negative_prompt: str | list[str] | None = None,
    height: int = 512,
    width: int = 512,
    num_inference_steps: int = 100,
    guidance_scale: float = 4.0,
    prior_num_inference_steps: int = 25,
    prior_guidance_scale: float = 4.0,
    num_images_per_prompt: int = 1,
    generator: Generator | None = None,
    seed: int | None = None,
    prior_latents: Tensor | None = None,
    image_embeds: Tensor | None = None,
    negative_image_embeds: Tensor | None = None,
    sampler: str | Sampler = "DDPM",
    callback=None,
    output_type: str = "pil",
):
    """Redraw `image` following the prompt, at height × width (diffusers' default 512 × 512, whatever the image's
    size: PIL images are resized to it, bicubic, as diffusers does).

    image: a PIL image, a list of k, or a (k, 3, height, width) tensor in [-1, 1]; k = 1 (shared) or one per prompt
    (image i goes with prompt i; diffusers tiles the images over prompt-major embeddings instead, which pairs them
    differently when k > 1 and n > 1). strength: s in (0, 1] with n · s >= 1. The other arguments are txt2img's
    (see txt2img.txt2img). Draws, in order: the prior's, the noise (b·n, 4, h/8, w/8), the sampler's per-step noise
    (MoVQ's encoding draws nothing: it is a point, not a distribution).
    """
    # --- every check before any compute
    common.check_decoder(components, num_inference_steps, guidance_scale, num_images_per_prompt, output_type, callback)
    common.check_unet_channels(components.unet, 4, "img2img")
    common.check_size(components, height, width)
    checks.check_strength(strength, num_inference_steps)
    image = common.to_images("image", image, height, width)  # (k, 3, H, W) in [-1, 1]
    sampler = common.decoder_sampler(sampler)
    generator = checks.make_generator(generator, seed)

    # --- stage 1, the prior: the prompt -> CLIP image embeddings (b·n, d), and the negatives
    image_embeds, negative_image_embeds = image_embeds_for(
        components, prompt, negative_prompt, image_embeds, negative_image_embeds, num_images_per_prompt,
        prior_num_inference_steps, prior_guidance_scale, generator, prior_latents,
    )  # fmt: skip
    unet, movq = components.unet, components.movq
    device, dtype = common.device_dtype(unet)
    batch = image_embeds.shape[0]
    image = common.per_prompt(image, batch, "image")

    # --- the image's latents, noised to the first timestep that runs
    do_guidance = guidance_scale > 1.0
    embeds = common.guidance_embeds(image_embeds, negative_image_embeds, unet, do_guidance)
    sampler.set_timesteps(num_inference_steps, strength=strength)  # keeps the last ⌊n · strength⌋ steps
    weight = movq.quant_conv.weight
    image_latents = movq.encode(image.to(device=weight.device, dtype=weight.dtype)).to(device=device, dtype=dtype)
    noise = randn(tuple(image_latents.shape), generator, torch.float32, "cpu").to(device=device, dtype=dtype)
    latents = sampler.add_noise(image_latents, noise, sampler.timesteps[:1])  # x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε

    # --- stage 2, the decoder: denoise over the remaining timesteps
    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        latent_model_input = sampler.scale_model_input(latent_model_input, t)
        noise_pred, _variance = unet(latent_model_input, t, embeds).split(latents.shape[1], dim=1)  # ε, unused var.
        if do_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = sampler.step(noise_pred, t, latents, generator=generator)
        if not sd_common.keep_going(callback, i, t, latents):
            break

    if output_type == "latent":
        return latents
    return sd_common.to_output(common.decode(movq, latents), output_type)
