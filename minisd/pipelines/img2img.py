"""Image to image (SDEdit, Meng et al. 2021, arXiv:2108.01073): encode the image, noise its latents part of the way
up the chain, and denoise from there with the prompt. Equal to diffusers' StableDiffusionImg2ImgPipeline.

strength s ∈ (0, 1] picks the starting point: of the n scheduled steps only the last ⌊n · s⌋ run
(samplers.base.img2img_start), starting from the image's latents noised to the first of them. s = 1 starts at the
top of the schedule (almost pure noise, a little of the image left); small s changes little.

code                  lesson / paper                                diffusers
image_latents         x_0 = LATENT_SCALE · z, z ~ q(z | image)       init_latents (before add_noise)
latents               x_t: x_0 noised to t_start, then denoised      latents
latent_model_input    x_t twice (unconditional, conditional)        latent_model_input
noise_pred_uncond     ε_θ(x_t, t, ∅)                                noise_pred_uncond
noise_pred_text       ε_θ(x_t, t, c)                                noise_pred_text
guidance_scale        w: ε = ε_∅ + w · (ε_c − ε_∅)                  guidance_scale
"""

import torch
from PIL import Image
from torch import Generator, Tensor

from minisd.noise import randn
from minisd.pipelines import checks, common
from minisd.pipelines.checks import Networks
from minisd.samplers import Sampler


@torch.no_grad()
def img2img(
    components: Networks,
    prompt: str | list[str] | None = None,
    image: Image.Image | list[Image.Image] | Tensor | None = None,
    strength: float = 0.8,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    num_images_per_prompt: int = 1,
    generator: Generator | None = None,
    seed: int | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    eta: float | None = None,
    clip_skip: int | None = None,
    sampler: str | Sampler = "PLMS",
    prediction_type: str | None = None,
    rescale_betas_zero_snr: bool | None = None,
    callback=None,
    output_type: str = "pil",
    vae_tiling: bool = False,
    progress_bar: bool = False,
):
    """Redraw `image` following the prompt; num_images_per_prompt results per prompt, at the image's size.

    image: a PIL image, a list of them, or a (k, 3, h, w) tensor in [-1, 1]; h and w multiples of 8
    (no resizing is done). k is 1 (every prompt starts from it) or one image per prompt. strength: s in (0, 1],
    with at least one step left (n · s >= 1). The other arguments are txt2img's (see txt2img.txt2img).
    Random draws, in order, each in float32 on the CPU from the generator: the VAE posterior sample of the image
    (k, 4, h/8, w/8), the noise (b·n, 4, h/8, w/8), then the sampler's per-step noise: diffusers' order, so one
    generator gives diffusers' numbers. Where diffusers differs: given one image per prompt it pairs image i with
    batch entry i modulo b (images tiled, prompts repeated in place); here image i goes with prompt i. With
    strength < 1, PLMS starts the shortened run with its own warm-up step and LMS raises its order from 1, where
    diffusers' pipeline mislabels one PLMS step and starts LMS at order 4 (see samplers/pndm.py and lms.py).
    vae_tiling: decode (and encode) with the VAE in overlapping 512-pixel tiles (minisd.tiling), so images
    larger than 512×512 decode in bounded memory; smaller ones are unchanged. A float16 VAE that decodes to NaN
    falls back to float32 by itself (common.decode).
    progress_bar: show a tqdm bar of the steps on stderr (minisd.StableDiffusion shows one by default).
    """
    unet, vae = components.unet, components.vae
    # --- every check before any compute
    checks.check_bool("vae_tiling", vae_tiling)
    checks.check_bool("progress_bar", progress_bar)
    checks.check_unet_channels(unet, (4,), "img2img")
    checks.check_common(
        components, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, clip_skip,
        output_type, callback,
    )  # fmt: skip
    checks.check_strength(strength, num_inference_steps)
    b = checks.check_prompts(unet, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    image = checks.to_image("image", image, checks.size_multiple(components))
    checks.check_size(components, image.shape[-2], image.shape[-1], what="image ")
    checks.check_image_count(image.shape[0], b)
    prediction_type, zero_snr = checks.model_prediction(components, prediction_type, rescale_betas_zero_snr)
    sampler = checks.make_sampler(sampler, eta, prediction_type, zero_snr)
    generator = checks.make_generator(generator, seed)
    device, dtype = common.device_dtype(unet)

    # --- the prompt -> context: (b·n, s, d), or (2·b·n, s, d) [negative; positive] with guidance
    do_guidance = guidance_scale > 1.0
    context = common.encode_prompts(
        components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
        do_guidance, clip_skip,
    )  # fmt: skip

    # --- the image's latents, noised to the first timestep that runs
    sampler.set_timesteps(num_inference_steps, strength=strength)  # keeps the last ⌊n · strength⌋ steps
    image_latents = common.encode_image(vae, image, generator, dtype, vae_tiling)  # (k, 4, h/8, w/8)
    image_latents = image_latents.repeat_interleave(b * num_images_per_prompt // image.shape[0], dim=0)
    noise = randn(image_latents.shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)  # as txt2img
    latents = sampler.add_noise(image_latents, noise, sampler.timesteps[:1])  # x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε

    # --- the denoising loop, over the remaining timesteps
    bar = common.progress(sampler, progress_bar)  # counts steps: PLMS's warm-up call and Heun's 2nd calls add none
    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        latent_model_input = sampler.scale_model_input(latent_model_input, t)
        noise_pred = unet(latent_model_input, t, context)
        if do_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            if guidance_rescale > 0:
                noise_pred = common.rescale_guidance(noise_pred, noise_pred_text, guidance_rescale)
        latents = sampler.step(noise_pred, t, latents, generator=generator)
        bar.update(sampler.steps_done - bar.n)
        if not common.keep_going(callback, i, t, latents):
            break
    bar.close()

    if output_type == "latent":
        return latents
    return common.to_output(common.decode(vae, latents, vae_tiling), output_type)
