"""A run you can step through: txt2img (or img2img) for one prompt, keeping every intermediate of every step.

The loop is txt2img's and img2img's own (tests/test_explain.py proves the final image equal to theirs, byte for
byte); at each model call it also keeps what the lessons draw: the latents x_t, both halves of the guided batch,
the guided ε, the predicted clean latents x̂_0 and the per-token cross-attention maps. minisd/explain.py shows them
on a web page; in a notebook:

    run = trace(components, "a red circle above a blue square", seed=0, sampler="DDIM", num_inference_steps=25)
    run.steps[10].x0_pred        # (1, 4, h/8, w/8): the clean latents step 10 predicts (decode with common.decode)

code                 lesson / paper                                  diffusers
latents              x_t, the sampler's latents before the step      latents
noise_pred_uncond    ε_θ(x_t, t, ∅)                                  noise_pred_uncond
noise_pred_text      ε_θ(x_t, t, c)                                  noise_pred_text
noise_pred           ε = ε_∅ + w · (ε_c − ε_∅)                       noise_pred
x0_pred              x̂_0, sampler.x0_pred (its family's formula)     pred_original_sample
attention            per-token cross-attention maps (b, 77, h, w)    (attention_probs, aggregated)
start                img2img: the scheduled steps skipped (samplers.base.img2img_start)
"""

from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from minisd.errors import MinisdError
from minisd.noise import randn
from minisd.pipelines import checks, common
from minisd.pipelines.attention_maps import CrossAttentionMaps
from minisd.pipelines.checks import Networks
from minisd.samplers.base import Sampler, img2img_start


@dataclass
class Step:
    """One model call: its timestep and the tensors above, each (1, 4, h/8, w/8) on the CPU in float32, and the
    attention maps (1, 77, h', w') (None for an unguided run's missing halves)."""

    t: int
    latents: Tensor
    noise_pred_uncond: Tensor | None
    noise_pred_text: Tensor
    noise_pred: Tensor
    x0_pred: Tensor
    attention: Tensor


@dataclass
class Trace:
    """A whole run: its settings and sampler, `scheduled` (every timestep of the full n-step plan, for strength's
    marker), `start` (how many of them img2img skipped; 0 for txt2img), one Step per model call, the final latents."""

    prompt: str
    guidance_scale: float
    sampler: Sampler
    scheduled: list[int]
    start: int
    steps: list[Step] = field(default_factory=list)
    final_latents: Tensor | None = None


def _cpu(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().float().cpu()


@torch.no_grad()
def trace(
    components: Networks,
    prompt: str,
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    sampler: str = "DDIM",
    image: Image.Image | Tensor | None = None,
    strength: float = 0.8,
) -> Trace:
    """Run txt2img (image None) or img2img (image given, strength in (0, 1]) for one prompt at the model's size (or
    the image's), keeping every step. Arguments as in txt2img / img2img; seed: an integer."""
    unet, vae = components.unet, components.vae
    checks.check_unet_channels(unet, (4,), "trace")
    checks.check_common(components, num_inference_steps, guidance_scale, 0.0, 1, None, "pt", None)
    checks.check_prompts(unet, prompt, negative_prompt, None, None)
    if not isinstance(prompt, str):
        raise MinisdError(f"prompt must be one str, got {type(prompt).__name__}")
    prediction = checks.model_prediction(components, None, None)  # the model's own
    sampler_name, sampler = sampler, checks.make_sampler(sampler, None, *prediction)
    generator = checks.make_generator(None, seed)
    device, dtype = common.device_dtype(unet)
    do_guidance = guidance_scale > 1.0
    context = common.encode_prompts(components, prompt, negative_prompt, None, None, 1, do_guidance, None)

    sampler.set_timesteps(num_inference_steps)
    scheduled = [int(t) for t in sampler.timesteps]
    if image is None:  # txt2img's start: pure noise at the sampler's starting noise level
        start = 0
        f, size = vae.config.downscale_factor, getattr(components, "sample_size", 512)
        checks.check_size(components, size, size)
        shape = (1, unet.config.in_channels, size // f, size // f)
        latents = randn(shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)  # as txt2img
        latents = latents * sampler.init_noise_sigma
    else:  # img2img's start: the image's latents, noised to the first timestep that runs
        checks.check_strength(strength, num_inference_steps)
        start = img2img_start(num_inference_steps, strength)
        image = checks.to_image("image", image, checks.size_multiple(components))
        checks.check_image_count(image.shape[0], 1)
        sampler = checks.make_sampler(sampler_name, None, *prediction)
        sampler.set_timesteps(num_inference_steps, strength=strength)  # keeps the last ⌊n · strength⌋ steps
        image_latents = common.encode_image(vae, image, generator, dtype, False)
        image_latents = image_latents.repeat_interleave(1, dim=0)  # img2img's repeat: also its memory layout
        noise = randn(image_latents.shape, generator, torch.float32, "cpu").to(device=device, dtype=dtype)
        latents = sampler.add_noise(image_latents, noise, sampler.timesteps[:1])
    run = Trace(prompt, guidance_scale, sampler, scheduled, start)

    # --- the denoising loop (txt2img.py's), keeping every intermediate
    with CrossAttentionMaps(unet, guided=do_guidance) as recorder:
        for t in sampler.timesteps:
            latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
            latent_model_input = sampler.scale_model_input(latent_model_input, t)
            noise_pred = unet(latent_model_input, t, context)
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2) if do_guidance else (None, noise_pred)
            if do_guidance:
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            x0_pred = sampler.x0_pred(noise_pred, t, latents)
            run.steps.append(
                Step(int(t), _cpu(latents), _cpu(noise_pred_uncond), _cpu(noise_pred_text), _cpu(noise_pred),
                     _cpu(x0_pred), recorder.calls[-1])
            )  # fmt: skip
            latents = sampler.step(noise_pred, t, latents, generator=generator)
    run.final_latents = latents
    return run
