"""Kandinsky 2.2 inpainting: repaint the white part of a mask, keep the rest, with the 9-channel inpainting decoder.
Equal to diffusers' KandinskyV22InpaintCombinedPipeline (= the prior, then KandinskyV22InpaintPipeline).

Where SD's inpainting UNet sees [latents | mask | masked-image latents] with mask 1 = repaint, Kandinsky's sees

    latent_model_input = [latents (4) | masked_image_latents (4) | keep (1)]         (b, 9, h/8, w/8)

with keep = 1 where the image stays, and masks the image in LATENT space (MoVQ encodes the whole image once). Two
more steps of its own: the repaint area grows by one latent pixel (common.grow_repaint_area), and after every step
the kept part is overwritten with the image's latents noised to the next step's level (latent blending, as SD
does for ordinary UNets) — and with the clean latents at the end, so the kept part decodes as MoVQ reconstructs it.

code                  meaning                                                   diffusers
mask                  (k, 1, H, W) 1 = repaint, 0 = keep (minisd's and SD's)   1 − mask_image (diffusers flips)
keep                  1 − the grown repaint mask at latent size (b, 1, h, w)    mask_image (after prepare_mask)
image_latents         MoVQ's latents of the whole image                          image
masked_image_latents  image_latents · keep                                       masked_image
noise                 the starting noise, reused for every blend                 noise
"""

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Generator, Tensor

from minisd.kandinsky.pipelines import common
from minisd.kandinsky.pipelines.txt2img import image_embeds_for
from minisd.noise import randn
from minisd.pipelines import checks
from minisd.pipelines import common as sd_common
from minisd.samplers import Sampler


@torch.no_grad()
def inpaint(
    components,
    prompt: str | list[str] | None = None,
    image: Image.Image | list[Image.Image] | Tensor | None = None,
    mask_image=None,
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
    latents: Tensor | None = None,
    prior_latents: Tensor | None = None,
    image_embeds: Tensor | None = None,
    negative_image_embeds: Tensor | None = None,
    sampler: str | Sampler = "DDPM",
    callback=None,
    output_type: str = "pil",
):
    """Repaint the masked part of `image` following the prompt, at height × width.

    image: as img2img's (PIL resized bicubic to height × width; k = 1 or one per prompt). mask_image: a PIL image
    (resized with Lanczos, grey >= 128 repaints), a list of k, an (height, width) numpy array or a (k, 1, height,
    width) tensor in [0, 1] (>= 0.5 repaints). No strength: the run starts from pure noise (as diffusers). The other
    arguments are txt2img's. Draws, in order: the prior's, the noise (b·n, 4, h/8, w/8), the sampler's per-step
    noise. Where diffusers differs: it blends every batch entry with the FIRST image and mask; here each with its own
    (the same result for one image and one mask).
    """
    # --- every check before any compute
    common.check_decoder(components, num_inference_steps, guidance_scale, num_images_per_prompt, output_type, callback)
    common.check_unet_channels(components.unet, common.INPAINT_CHANNELS, "inpaint")
    common.check_size(components, height, width)
    image = common.to_images("image", image, height, width)  # (k, 3, H, W) in [-1, 1]
    mask = common.to_masks(mask_image, height, width)  # (k', 1, H, W): 1 = repaint
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
    f = movq.config.downscale_factor
    shape = (batch, movq.config.latent_channels, height // f, width // f)
    if latents is not None:
        checks.check_latents(latents, shape, device, dtype)

    # --- the image's latents, and the mask at latent size: grown by one pixel, then flipped to "keep"
    weight = movq.quant_conv.weight
    image_latents = movq.encode(image.to(device=weight.device, dtype=weight.dtype)).to(device=device, dtype=dtype)
    image_latents = common.per_prompt(image_latents, batch, "image")
    repaint = F.interpolate(mask, size=shape[-2:], mode="nearest")  # (k', 1, h, w)
    keep = 1 - common.grow_repaint_area(repaint)
    keep = common.per_prompt(keep, batch, "mask_image").to(device=device, dtype=dtype)
    masked_image_latents = image_latents * keep  # the hole set to 0 in latent space

    # --- pure noise, and the decoder's extra input channels (the same for both halves of the guidance batch)
    do_guidance = guidance_scale > 1.0
    embeds = common.guidance_embeds(image_embeds, negative_image_embeds, unet, do_guidance)
    sampler.set_timesteps(num_inference_steps)
    if latents is None:
        latents = randn(shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)
    latents = latents * sampler.init_noise_sigma
    noise = latents.clone()
    masked_image_model_input = torch.cat([masked_image_latents] * 2) if do_guidance else masked_image_latents
    keep_model_input = torch.cat([keep] * 2) if do_guidance else keep

    # --- stage 2, the decoder
    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        latent_model_input = sampler.scale_model_input(latent_model_input, t)
        latent_model_input = torch.cat([latent_model_input, masked_image_model_input, keep_model_input], dim=1)
        noise_pred, _variance = unet(latent_model_input, t, embeds).split(latents.shape[1], dim=1)  # ε, unused var.
        if do_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = sampler.step(noise_pred, t, latents, generator=generator)
        init_latents_proper = image_latents  # blending: the kept part follows the image's own noisy path
        if i < len(sampler.timesteps) - 1:
            init_latents_proper = sampler.add_noise(image_latents, noise, sampler.timesteps[i + 1 : i + 2])
        latents = keep * init_latents_proper + (1 - keep) * latents
        if not sd_common.keep_going(callback, i, t, latents):
            break
    latents = keep * image_latents + (1 - keep) * latents  # the kept part exactly the image's latents

    if output_type == "latent":
        return latents
    return sd_common.to_output(common.decode(movq, latents), output_type)
