"""Kandinsky 2.2 text to image, in two named stages: the prior turns the prompt into a CLIP image embedding
(prior.py), the decoder UNet denoises MoVQ latents steered by it, with classifier-free guidance between the prompt's
embedding and the negative one (Ho & Salimans 2022). Equal to diffusers' KandinskyV22CombinedPipeline
(= KandinskyV22PriorPipeline, then KandinskyV22Pipeline).

code                  lesson / paper                                   diffusers
image_embeds          the prior's CLIP image embedding c (b·n, 1280)   image_embeds
negative_image_embeds the embedding guidance steers from               negative_image_embeds
embeds                [negative; positive] for the guidance batch       image_embeds (after the cat)
latents               x_t, MoVQ latents (b·n, 4, h/8, w/8), unscaled    latents
noise_pred_uncond     ε_θ(x_t, t, c_neg)                                noise_pred_uncond
noise_pred_text       ε_θ(x_t, t, c)                                    noise_pred_text
guidance_scale        w: ε = ε_neg + w · (ε_c − ε_neg)                  guidance_scale
"""

import torch
from torch import Generator, Tensor

from minisd.errors import MinisdError
from minisd.kandinsky.pipelines import common
from minisd.kandinsky.pipelines.prior import prior, zero_image_embeds
from minisd.noise import randn
from minisd.pipelines import checks
from minisd.pipelines import common as sd_common
from minisd.samplers import Sampler


def image_embeds_for(
    components, prompt, negative_prompt, image_embeds, negative_image_embeds, n: int, prior_steps: int,
    prior_guidance_scale: float, generator: Generator | None, prior_latents: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Stage 1, shared by the three pipelines: (image_embeds, negative_image_embeds), (b·n, d) each — from the
    prior when a prompt is given, else the caller's (b, d) embeddings repeated n times in place."""
    d = components.unet.config.encoder_hid_dim
    if (prompt is None) == (image_embeds is None):
        raise MinisdError("give prompt or image_embeds, exactly one of them")
    if prompt is not None:
        if negative_image_embeds is not None:
            raise MinisdError("negative_image_embeds needs image_embeds; with a prompt use negative_prompt")
        return prior(components, prompt, negative_prompt, n, prior_steps, prior_guidance_scale, generator,
                     latents=prior_latents)  # fmt: skip
    if negative_prompt is not None or prior_latents is not None:
        raise MinisdError("negative_prompt and prior_latents need a prompt; with image_embeds the prior is not run")
    image_embeds = common.check_embeds("image_embeds", image_embeds, d)
    b = image_embeds.shape[0]
    if negative_image_embeds is None:  # a zero image's embedding, as the prior gives without a negative prompt
        if getattr(components, "image_encoder", None) is None:
            raise MinisdError("negative_image_embeds is needed (or components.image_encoder, to embed a zero image)")
        negative_image_embeds = zero_image_embeds(components.image_encoder, b)
    negative_image_embeds = common.check_embeds("negative_image_embeds", negative_image_embeds, d, b)
    return image_embeds.repeat_interleave(n, dim=0), negative_image_embeds.repeat_interleave(n, dim=0)


@torch.no_grad()
def txt2img(
    components,
    prompt: str | list[str] | None = None,
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
    """Generate num_images_per_prompt images for each prompt (diffusers' defaults: 512×512, 100 decoder steps, 25
    prior steps, guidance 4 for both).

    components: .unet .movq, and for a prompt .tokenizer .text_encoder .image_encoder .prior (minisd.kandinsky.
    loading.load_kandinsky gives them); the decoder runs on the UNet's device and dtype. prompt: a str or b of
    them; or image_embeds (b, 1280) instead, with negative_image_embeds (b, 1280) (None: a zero image's embedding).
    height, width: pixels, multiples of 64. guidance_scale / prior_guidance_scale: w >= 0 of the decoder / prior
    (w <= 1: no guidance). sampler: "DDPM" (Kandinsky's), "DDIM" or a Sampler object. generator / seed: a CPU
    torch.Generator or a seed; draws, in order: the prior's (see prior.prior), the decoder's starting noise
    (b·n, 4, h/8, w/8) in float32 on the CPU, then the sampler's per-step noise: diffusers' order, so one
    generator gives diffusers' images. latents / prior_latents: your own starting noise for the decoder / prior
    (diffusers' combined pipeline passes its `latents` to the prior). callback(step, timestep, latents): after
    every decoder step; False stops there. output_type: "pil", "np", "pt" or "latent" (as minisd's txt2img).
    """
    # --- every check before any compute
    common.check_decoder(components, num_inference_steps, guidance_scale, num_images_per_prompt, output_type, callback)
    common.check_unet_channels(components.unet, 4, "txt2img")
    common.check_size(components, height, width)
    sampler = common.decoder_sampler(sampler)
    generator = checks.make_generator(generator, seed)

    # --- stage 1, the prior: the prompt -> CLIP image embeddings (b·n, d), and the negatives
    image_embeds, negative_image_embeds = image_embeds_for(
        components, prompt, negative_prompt, image_embeds, negative_image_embeds, num_images_per_prompt,
        prior_num_inference_steps, prior_guidance_scale, generator, prior_latents,
    )  # fmt: skip
    unet, movq = components.unet, components.movq
    device, dtype = common.device_dtype(unet)
    f = movq.config.downscale_factor
    shape = (image_embeds.shape[0], movq.config.latent_channels, height // f, width // f)
    if latents is not None:
        checks.check_latents(latents, shape, device, dtype)

    # --- stage 2, the decoder: pure noise, denoised steered by the image embedding
    do_guidance = guidance_scale > 1.0
    embeds = common.guidance_embeds(image_embeds, negative_image_embeds, unet, do_guidance)  # (2·b·n, d)
    sampler.set_timesteps(num_inference_steps)
    if latents is None:
        latents = randn(shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)
    latents = latents * sampler.init_noise_sigma

    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        latent_model_input = sampler.scale_model_input(latent_model_input, t)
        # the UNet's 8 channels: ε and the learned variance, which DDPM's fixed variance leaves unused
        noise_pred, _variance = unet(latent_model_input, t, embeds).split(latents.shape[1], dim=1)
        if do_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = sampler.step(noise_pred, t, latents, generator=generator)
        if not sd_common.keep_going(callback, i, t, latents):
            break

    if output_type == "latent":
        return latents
    return sd_common.to_output(common.decode(movq, latents), output_type)
