"""Kandinsky 2.2's first stage: the prompt's CLIP text encoding -> a CLIP image embedding, by the unCLIP prior
(Ramesh et al. 2022, §2.2). Equal to diffusers' KandinskyV22PriorPipeline.

code                  lesson / paper                                      diffusers
text_states           the prompt's per-token CLIP states (b, 77, 1280)    text_encoder_hidden_states
text_embeds           CLIP's text embedding (b, 1280)                     prompt_embeds
text_mask             True at start, words and end; False at padding      text_mask
latents               z_t, the noisy (standardised) image embedding       latents
x0_pred_uncond        the prior's z_0 for the unconditional prompt ""     predicted_image_embedding_uncond
x0_pred_text          … for the prompt                                    predicted_image_embedding_text
guidance_scale        w: z_0 = z_0,∅ + w · (z_0,c − z_0,∅)  (on x_0, not ε)  guidance_scale (prior_guidance_scale)
image_embeds          z_0 · clip_std + clip_mean: a CLIP image embedding  image_embeds
negative_image_embeds what the decoder's guidance steers away from        negative_image_embeds

A negative prompt runs through the prior too, beside the prompts (diffusers' way): its own image embedding
becomes the decoder's negative. Without one, the negative is CLIP's embedding of an all-zero image.
"""

from typing import NamedTuple, Protocol

import torch
from PIL import Image
from torch import Generator, Tensor

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.kandinsky.image_encoder import ImageEncoder
from minisd.kandinsky.prior import Prior
from minisd.noise import randn
from minisd.pipelines import checks, common
from minisd.samplers.unclip import UnCLIPSampler
from minisd.tokenizer import BOS, EOS, MAX_LENGTH, Tokenizer


class PriorComponents(Protocol):
    tokenizer: Tokenizer
    text_encoder: TextEncoder  # with_projection
    image_encoder: ImageEncoder
    prior: Prior


class PriorOutput(NamedTuple):
    """image_embeds, negative_image_embeds: (b·n, 1280) each, prompt by prompt (p0 p0 p1 p1 for n = 2)."""

    image_embeds: Tensor
    negative_image_embeds: Tensor


def tokenize(tokenizer: Tokenizer, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """prompts -> (input_ids (b, 77), text_mask (b, 77) bool): the mask is True at the start token, the (at most 75)
    prompt tokens and the end token, False at the end-token padding (transformers' attention_mask)."""
    input_ids = tokenizer(prompts)
    lengths = torch.tensor([min(len(tokenizer.encode(p)), MAX_LENGTH - 2) + 2 for p in prompts])
    text_mask = torch.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    assert bool((input_ids[:, 0] == BOS).all()) and bool((input_ids.gather(1, lengths[:, None] - 1) == EOS).all())
    return input_ids, text_mask


def encode_text(components: PriorComponents, prompts: list[str], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """prompts -> (text_embeds (b·n, d), text_states (b·n, 77, d), text_mask (b·n, 77)), each prompt repeated n times
    in place, on the prior's device and dtype. The text encoder runs without the padding mask (as diffusers)."""
    text_encoder = components.text_encoder
    input_ids, text_mask = tokenize(components.tokenizer, prompts)
    text_states, text_embeds = text_encoder.text_embeds(input_ids.to(text_encoder.final_layer_norm.weight.device))
    weight = components.prior.proj_in.weight
    return tuple(
        t.to(device=weight.device, dtype=weight.dtype if t.is_floating_point() else None).repeat_interleave(n, dim=0)
        for t in (text_embeds, text_states, text_mask)
    )


@torch.no_grad()
def zero_image_embeds(image_encoder: ImageEncoder, batch: int) -> Tensor:
    """CLIP's embedding of an all-zero image (pixel_values 0, a grey image after CLIP's normalisation), repeated:
    the decoder's negative when there is no negative prompt (diffusers get_zero_embed). Returns (batch, d)."""
    weight = image_encoder.visual_projection.weight
    s = image_encoder.config.image_size
    zero = torch.zeros(1, image_encoder.config.num_channels, s, s, device=weight.device, dtype=weight.dtype)
    return image_encoder(zero).repeat(batch, 1)


@torch.no_grad()
def prior(
    components: PriorComponents,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    generator: Generator | None = None,
    seed: int | None = None,
    latents: Tensor | None = None,
    callback=None,
) -> PriorOutput:
    """The prompt(s) -> CLIP image embeddings for the decoder, and the negatives its guidance steers from.

    prompt: a str or a list of b; negative_prompt: None, one str, or b. guidance_scale: w >= 0 (w <= 1: one batch, no
    unconditional prompt). generator / seed: a CPU torch.Generator or a seed; draws, in order: the starting noise
    (b'·n, d) in float32 on the CPU (b' = 2b with a negative prompt, as diffusers), then one per step with t > 0.
    latents: your own starting noise of that shape, on the prior's device and dtype. callback(step, timestep,
    latents): after every step; False stops there (the embeddings reached so far are returned).
    """
    # --- every check before any compute
    prompts = checks.prompt_list("prompt", prompt)
    negatives = (
        None if negative_prompt is None else checks.prompt_list("negative_prompt", negative_prompt, len(prompts))
    )
    checks.check_number("guidance_scale", guidance_scale, 0.0)
    checks.check_int("num_images_per_prompt", num_images_per_prompt, 1)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise MinisdError(f"prior num_inference_steps must be an integer in [1, 1000], got {num_inference_steps!r}")
    if callback is not None and not callable(callback):
        raise MinisdError(f"callback must be None or callable(step, timestep, latents), got {callback!r:.60}")
    for name in ("tokenizer", "text_encoder", "prior") + (("image_encoder",) if negatives is None else ()):
        if getattr(components, name, None) is None:
            raise MinisdError(f"the prior stage needs components.{name}; load kandinsky-community/kandinsky-2-2-prior")
    generator = checks.make_generator(generator, seed)
    model = components.prior
    weight = model.proj_in.weight
    # diffusers' way with a negative prompt: the negatives run as prompts too, each with itself as unconditional
    conds = prompts + negatives if negatives is not None else prompts
    unconds = negatives + negatives if negatives is not None else [""] * len(prompts)
    shape = (len(conds) * num_images_per_prompt, model.config.embedding_dim)
    if latents is not None:
        checks.check_latents(latents, shape, weight.device, weight.dtype)

    # --- the text -> the prior's conditioning: (b'·n, …), or (2·b'·n, …) [unconditional; prompt] with guidance
    do_guidance = guidance_scale > 1.0
    text_embeds, text_states, text_mask = encode_text(components, conds, num_images_per_prompt)
    if do_guidance:
        uncond = encode_text(components, unconds, num_images_per_prompt)
        cond = (text_embeds, text_states, text_mask)
        text_embeds, text_states, text_mask = (torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True))

    # --- pure noise, then the denoising loop (the prior predicts z_0 itself; the sampler clips it to ±10)
    sampler = UnCLIPSampler()
    sampler.set_timesteps(num_inference_steps)
    if latents is None:
        latents = randn(shape, generator, torch.float32, "cpu").to(device=weight.device, dtype=weight.dtype)
    latents = latents * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        latent_model_input = torch.cat([latents] * 2) if do_guidance else latents
        x0_pred = model(latent_model_input, t, text_embeds, text_states, text_mask)
        if do_guidance:
            x0_pred_uncond, x0_pred_text = x0_pred.chunk(2)
            x0_pred = x0_pred_uncond + guidance_scale * (x0_pred_text - x0_pred_uncond)
        latents = sampler.step(x0_pred, t, latents, generator=generator)
        if not common.keep_going(callback, i, t, latents):
            break

    # --- back to CLIP's units; the negatives: the negative prompt's own embeddings, or a zero image's
    image_embeds = model.post_process(latents)
    if negatives is not None:
        image_embeds, negative_image_embeds = image_embeds.chunk(2)
    else:
        negative_image_embeds = zero_image_embeds(components.image_encoder, shape[0]).to(image_embeds)
    return PriorOutput(image_embeds, negative_image_embeds)


@torch.no_grad()
def interpolate(
    components: PriorComponents,
    images_and_prompts: list,
    weights: list[float],
    num_images_per_prompt: int = 1,
    num_inference_steps: int = 25,
    generator: Generator | None = None,
    seed: int | None = None,
    negative_prior_prompt: str | None = None,
    negative_prompt: str = "",
    guidance_scale: float = 4.0,
) -> PriorOutput:
    """A weighted mix of prompts and pictures in CLIP's image space: Σ w_i · embedding_i, each prompt's embedding
    from the prior, each PIL image's from the vision tower (CLIP's preprocessing: ImageEncoder.preprocess). Equal
    to diffusers' KandinskyV22PriorPipeline.interpolate, draws included (the prior runs once per prompt, in order,
    then once more for the negative: its embedding, or a zero image's when negative_prompt is "").
    Returns (mix (n, d), negative (n, d)) for the decoder."""
    if not isinstance(images_and_prompts, list) or not isinstance(weights, list) or not images_and_prompts:
        raise MinisdError("images_and_prompts and weights must be non-empty lists")
    if len(images_and_prompts) != len(weights):
        raise MinisdError(f"images_and_prompts holds {len(images_and_prompts)} items, weights {len(weights)}")
    generator = checks.make_generator(generator, seed)
    weight_of = components.prior.proj_in.weight
    mix = 0
    for item, w in zip(images_and_prompts, weights, strict=True):
        checks.check_number("weights", w, -1e6, 1e6)
        if isinstance(item, str):
            embeds = prior(components, item, negative_prior_prompt, num_images_per_prompt, num_inference_steps,
                           guidance_scale, generator).image_embeds  # fmt: skip
        elif isinstance(item, Image.Image):
            encoder = components.image_encoder
            pixels = encoder.preprocess(item).to(encoder.visual_projection.weight)
            embeds = encoder(pixels).repeat(num_images_per_prompt, 1).to(weight_of)
        else:
            raise MinisdError(f"images_and_prompts holds str prompts and PIL images, got {type(item).__name__}")
        mix = mix + w * embeds
    zero = prior(components, negative_prompt, negative_prior_prompt, num_images_per_prompt, num_inference_steps,
                 guidance_scale, generator)  # fmt: skip
    return PriorOutput(mix, zero.negative_image_embeds if negative_prompt == "" else zero.image_embeds)
