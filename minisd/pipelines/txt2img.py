"""Text to image: start from pure noise and denoise it, steered by the prompt (Rombach et al. 2022, arXiv:2112.10752;
classifier-free guidance: Ho & Salimans 2022, arXiv:2207.12598). Equal to diffusers' StableDiffusionPipeline.

code                  lesson / paper                                diffusers
context               the prompt embeddings c (b, 77·k, 768)        prompt_embeds (negative ones first)
latents               x_t, the noisy latents (b, 4, h/8, w/8)       latents
latent_model_input    x_t twice (unconditional, conditional)        latent_model_input
noise_pred_uncond     ε_θ(x_t, t, ∅)                                noise_pred_uncond
noise_pred_text       ε_θ(x_t, t, c)                                noise_pred_text
guidance_scale        w: ε = ε_∅ + w · (ε_c − ε_∅)                  guidance_scale

A v-prediction model (SD 2's 768 models) runs the same loop: its outputs are v, guidance mixes them the same way
(v is linear in ε and x_0), and the sampler, set up with prediction_type "v_prediction", reads x̂_0 and ε off v.
"""

import torch
from torch import Generator, Tensor

from minisd.noise import randn
from minisd.pipelines import checks, common
from minisd.pipelines.checks import Networks
from minisd.samplers import Sampler


@torch.no_grad()
def txt2img(
    components: Networks,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
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
    callback=None,
    output_type: str = "pil",
    vae_tiling: bool = False,
    progress_bar: bool = False,
):
    """Generate num_images_per_prompt images for each prompt.

    components: anything with .tokenizer .text_encoder .vae .unet (minisd.loading.load_components gives one); the
    run happens on the UNet's device and dtype. prompt: a str or a list of b str (A1111 emphasis and long prompts
    work, see pipelines/prompts.py), or prompt_embeds (b, s, 768) instead. negative_prompt: one str for all, or b.
    height, width: pixels, multiples of 8 (None: components.sample_size, the model's own size). guidance_scale:
    w >= 0; w <= 1 turns guidance off (one UNet batch, no negative prompt). guidance_rescale: φ in [0, 1]
    (common.rescale_guidance). sampler: a name from minisd.samplers (A1111's "Euler a", "DPM++ 2M Karras", or
    diffusers' class names) or a Sampler object (get_sampler(name, schedule_type=..., timestep_spacing=...) for
    another schedule). prediction_type: what the UNet predicts, "epsilon" or "v_prediction" (None: the model's
    own, components.prediction_type: SD 2's 768 models predict v); rescale_betas_zero_snr: zero terminal SNR (None:
    the model's; v only, with DDIM / DDPM / Euler / Euler a / DPM++). With v, noise_pred below is v and guidance
    mixes v the same way. eta: DDIM's η or the ancestral η of Euler a and DPM++ 2M SDE (None: the sampler's
    default, minisd.samplers.get_sampler). clip_skip: as
    TextEncoder.prompt_embeds (A1111's "Clip skip: 2" is 1); like A1111 it applies to the negative prompt too
    (diffusers skips layers for the positive prompt only).
    generator / seed: a CPU torch.Generator, or a seed that makes one: the starting noise is drawn in float32 on
    the CPU and moved, so a seed gives the same image on CPU and CUDA (up to the networks' arithmetic). latents:
    your own starting noise (b·n, 4, h/8, w/8), on the UNet's device and dtype, unscaled (the sampler's
    init_noise_sigma is applied here, as diffusers does).
    callback(step, timestep, latents): called after every model call with its index (0, 1, …), its timestep (a 0-d
    tensor from sampler.timesteps) and the new latents; returning False (not None) stops the run there, and the
    latents reached so far, still noisy, are decoded and returned.
    output_type: "pil" (list of PIL images), "np" (float32 (b·n, h, w, 3) in [0, 1]), "pt" (tensor (b·n, 3, h, w)
    in [0, 1]), "latent" (the final latents (b·n, 4, h/8, w/8), not decoded). Images come prompt by prompt.
    vae_tiling: decode (and encode) with the VAE in overlapping 512-pixel tiles (minisd.tiling), so images
    larger than 512×512 decode in bounded memory; smaller ones are unchanged. A float16 VAE that decodes to NaN
    falls back to float32 by itself (common.decode).
    progress_bar: show a tqdm bar of the steps on stderr (minisd.StableDiffusion shows one by default).
    """
    unet, vae = components.unet, components.vae
    # --- every check before any compute
    checks.check_bool("vae_tiling", vae_tiling)
    checks.check_bool("progress_bar", progress_bar)
    checks.check_unet_channels(unet, (4,), "txt2img")
    checks.check_common(
        components, num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, clip_skip,
        output_type, callback,
    )  # fmt: skip
    default = getattr(components, "sample_size", 512)  # the model's own size: 512 for SD v1, 64 for the nano model
    height, width = default if height is None else height, default if width is None else width
    checks.check_size(components, height, width)
    b = checks.check_prompts(unet, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    prediction_type, zero_snr = checks.model_prediction(components, prediction_type, rescale_betas_zero_snr)
    sampler = checks.make_sampler(sampler, eta, prediction_type, zero_snr)
    generator = checks.make_generator(generator, seed)
    device, dtype = common.device_dtype(unet)
    f = components.vae.config.downscale_factor
    shape = (b * num_images_per_prompt, unet.config.in_channels, height // f, width // f)
    if latents is not None:
        checks.check_latents(latents, shape, device, dtype)

    # --- the prompt -> context: (b·n, s, d), or (2·b·n, s, d) [negative; positive] with guidance
    do_guidance = guidance_scale > 1.0
    context = common.encode_prompts(
        components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
        do_guidance, clip_skip,
    )  # fmt: skip

    # --- pure noise at the sampler's starting noise level
    sampler.set_timesteps(num_inference_steps)
    if latents is None:
        # float32 on the CPU, then moved (minisd.noise): one seed, one start on every device
        latents = randn(shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)
    latents = latents * sampler.init_noise_sigma  # σ_max for the σ samplers, 1 for the ᾱ ones

    # --- the denoising loop
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
