"""Inpainting: repaint the white part of a mask, keep the rest. Equal to diffusers' StableDiffusionInpaintPipeline,
both ways it works:

  - the inpainting UNet (in_channels 9, e.g. sd-v1-5-inpainting): trained to see, beside the noisy latents, the mask
    and the latents of the image with the hole blacked out, concatenated along channels:
        latent_model_input = [latents (4) | mask (1) | masked_image_latents (4)]        (b, 9, h/8, w/8)
  - any ordinary UNet (in_channels 4), by latent blending (RePaint-style, Lugmayr et al. 2022, arXiv:2201.09865,
    as diffusers does it): after every step the part to keep is overwritten with the original latents, noised
    to the level of the next step, so the model only ever invents the masked part:
        latents = (1 − mask) · add_noise(image_latents, noise, t_next) + mask · latents

code                  meaning                                                   diffusers
mask                  (b, 1, H, W) 1 = repaint, 0 = keep, binarised at 0.5      mask_condition
mask_latents          the mask at latent size (nearest), (b, 1, h/8, w/8)       mask
masked_image          image · (mask < 0.5): the hole set to 0 (grey)            masked_image
masked_image_latents  its VAE latents, the inpainting UNet's extra input        masked_image_latents
image_latents         the whole image's latents, for blending and strength < 1  image_latents / init_latents_proper
noise                 the starting noise, reused for every blend                noise
"""

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Generator, Tensor

from minisd.errors import MinisdError
from minisd.noise import randn
from minisd.pipelines import checks, common
from minisd.pipelines.checks import Networks
from minisd.pipelines.common import INPAINT_CHANNELS
from minisd.samplers import Sampler


@torch.no_grad()
def inpaint(
    components: Networks,
    prompt: str | list[str] | None = None,
    image: Image.Image | list[Image.Image] | Tensor | None = None,
    mask_image: Image.Image | Tensor | None = None,
    strength: float = 1.0,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    num_images_per_prompt: int = 1,
    generator: Generator | None = None,
    seed: int | None = None,
    latents: Tensor | None = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    eta: float | None = None,
    clip_skip: int | None = None,
    sampler: str | Sampler = "PLMS",
    prediction_type: str | None = None,
    rescale_betas_zero_snr: bool | None = None,
    paste_unmasked: bool = False,
    callback=None,
    output_type: str = "pil",
    vae_tiling: bool = False,
    progress_bar: bool = False,
):
    """Repaint the masked part of `image` following the prompt; num_images_per_prompt results per prompt.

    image: as img2img's (k images, 1 or one per prompt, sides multiples of 8, no resizing). mask_image:
    a PIL image of the image's size (white = repaint; converted to grey, >= 128 repaints) or a (1 or k, 1, h, w)
    tensor in [0, 1] (>= 0.5 repaints). strength: 1 starts from pure noise (the default); s < 1 from the image's
    latents noised to the first of the last ⌊n · s⌋ steps, as img2img. latents: your own starting noise, as
    txt2img's (also at strength < 1, where diffusers ignores strength for given latents). paste_unmasked: paste the
    image's own pixels back outside the mask after decoding, so what should be kept is kept exactly (the VAE round
    trip alone changes it slightly); not with output_type "latent". The other arguments are txt2img's.

    Random draws, in order, in float32 on the CPU: the image's posterior sample (4-channel UNet, or strength < 1),
    the noise, the masked image's posterior sample (9-channel UNet only), the sampler's per-step noise: diffusers'
    order. diffusers also encodes (and samples) the masked image for a 4-channel UNet, where it is not used; minisd
    does not, so for Euler a and DDIM with eta > 0 diffusers' per-step noise comes one draw later.
    vae_tiling: decode (and encode) with the VAE in overlapping 512-pixel tiles (minisd.tiling), so images
    larger than 512×512 decode in bounded memory; smaller ones are unchanged. A float16 VAE that decodes to NaN
    falls back to float32 by itself (common.decode).
    progress_bar: show a tqdm bar of the steps on stderr (minisd.StableDiffusion shows one by default).
    """
    unet, vae = components.unet, components.vae
    # --- every check before any compute
    checks.check_bool("vae_tiling", vae_tiling)
    checks.check_bool("progress_bar", progress_bar)
    checks.check_unet_channels(unet, (4, INPAINT_CHANNELS), "inpaint")
    checks.check_common(
        components, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, clip_skip,
        output_type, callback,
    )  # fmt: skip
    checks.check_strength(strength, num_inference_steps)
    b = checks.check_prompts(unet, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    image = checks.to_image("image", image, checks.size_multiple(components))
    checks.check_size(components, image.shape[-2], image.shape[-1], what="image ")
    checks.check_image_count(image.shape[0], b)
    mask = checks.to_mask(mask_image, image)  # (1 or k, 1, H, W) of 0 and 1
    if checks.check_bool("paste_unmasked", paste_unmasked) and output_type == "latent":
        raise MinisdError("paste_unmasked=True needs decoded output, got output_type 'latent'")
    prediction_type, zero_snr = checks.model_prediction(components, prediction_type, rescale_betas_zero_snr)
    sampler = checks.make_sampler(sampler, eta, prediction_type, zero_snr)
    generator = checks.make_generator(generator, seed)
    device, dtype = common.device_dtype(unet)
    batch = b * num_images_per_prompt
    f = vae.config.downscale_factor
    shape = (batch, vae.config.latent_channels, image.shape[2] // f, image.shape[3] // f)
    if latents is not None:
        checks.check_latents(latents, shape, device, dtype)
    inpainting_unet = unet.config.in_channels == INPAINT_CHANNELS

    # --- the prompt -> context: (b·n, s, d), or (2·b·n, s, d) [negative; positive] with guidance
    do_guidance = guidance_scale > 1.0
    context = common.encode_prompts(
        components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
        do_guidance, clip_skip,
    )  # fmt: skip

    # --- the starting latents: pure noise (strength 1) or the image's latents noised to the first step that runs
    sampler.set_timesteps(num_inference_steps, strength=strength)
    full_strength = strength == 1.0
    image_latents = None
    if not inpainting_unet or not full_strength:
        image_latents = common.encode_image(vae, image, generator, dtype, vae_tiling)  # (k, 4, h/8, w/8)
        image_latents = image_latents.repeat_interleave(batch // image.shape[0], dim=0)
    noise = latents  # the caller's starting noise, or drawn as txt2img draws it
    if noise is None:
        noise = randn(shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)
    if full_strength:
        latents = noise * sampler.init_noise_sigma
    else:
        latents = sampler.add_noise(image_latents, noise, sampler.timesteps[:1])

    # --- the mask at latent size, and for the inpainting UNet the masked image's latents
    mask_latents = F.interpolate(mask, size=shape[-2:])  # nearest: (1 or k, 1, h/8, w/8)
    mask_latents = mask_latents.to(device=device, dtype=dtype).repeat_interleave(batch // mask.shape[0], dim=0)
    if inpainting_unet:
        masked_image = image * (mask < 0.5)  # the hole set to 0, mid grey
        masked_image_latents = common.encode_image(vae, masked_image, generator, dtype, vae_tiling)
        masked_image_latents = masked_image_latents.repeat_interleave(batch // masked_image.shape[0], dim=0)
        # the same extra channels for both halves of the guidance batch
        mask_model_input = torch.cat([mask_latents] * 2) if do_guidance else mask_latents
        masked_image_model_input = torch.cat([masked_image_latents] * 2) if do_guidance else masked_image_latents

    # --- the denoising loop
    bar = common.progress(sampler, progress_bar)  # counts steps: PLMS's warm-up call and Heun's 2nd calls add none
    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        latent_model_input = sampler.scale_model_input(latent_model_input, t)
        if inpainting_unet:
            latent_model_input = torch.cat([latent_model_input, mask_model_input, masked_image_model_input], dim=1)
        noise_pred = unet(latent_model_input, t, context)
        if do_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            if guidance_rescale > 0:
                noise_pred = common.rescale_guidance(noise_pred, noise_pred_text, guidance_rescale)
        latents = sampler.step(noise_pred, t, latents, generator=generator)
        if not inpainting_unet:  # blending: keep the unmasked part on the original image's path
            init_latents_proper = image_latents  # after the last step: the clean latents themselves
            if i < len(sampler.timesteps) - 1:
                init_latents_proper = sampler.add_noise(image_latents, noise, sampler.timesteps[i + 1 : i + 2])
            latents = (1 - mask_latents) * init_latents_proper + mask_latents * latents
        bar.update(sampler.steps_done - bar.n)
        if not common.keep_going(callback, i, t, latents):
            break
    bar.close()

    if output_type == "latent":
        return latents
    decoded = common.decode(vae, latents, vae_tiling)
    if paste_unmasked:  # the original pixels outside the mask, exactly
        mask = mask.to(decoded.device, decoded.dtype).repeat_interleave(batch // mask.shape[0], dim=0)
        original = image.to(decoded.device, decoded.dtype).repeat_interleave(batch // image.shape[0], dim=0)
        decoded = (1 - mask) * original + mask * decoded
    return common.to_output(decoded, output_type)
