"""The steps the three pipelines share: the prompt → context step, noise, the image's latents, guidance rescale,
decoding.

The denoising loops themselves live in txt2img.py, img2img.py and inpaint.py, one whole loop per file; the checks
they make before any compute live in checks.py. Each step here reads the same in every pipeline.

Randomness, device and dtype belong to the caller:
  - every random draw a pipeline makes before its loop (the starting noise, the VAE posterior sample) is one
    minisd.noise.randn call in float32 ON THE CPU from the caller's CPU generator (`seed` makes one), then moved to
    the UNet's device and dtype. So one seed gives the same starting point on CPU and on CUDA; what a GPU changes is
    only the arithmetic of the networks. For a bit-exact comparison between devices pass the same `latents`.
  - the samplers draw their per-step noise (Euler a, DDIM with eta > 0) from the same generator, on the CPU.
  - the device and dtype are the UNet's: move the modules (`.to("cuda", torch.float16)`) and the pipeline follows.
  - nothing seeds torch's global generator; generator=None and seed=None draw from it as torch.randn does.
"""

import copy
import warnings

import torch
from torch import Generator, Tensor
from tqdm import tqdm

from minisd.errors import MinisdError
from minisd.images import image_to_pil, image_to_unit
from minisd.noise import randn
from minisd.pipelines.checks import Networks, prompt_list
from minisd.pipelines.prompts import encode_prompt
from minisd.samplers import Sampler
from minisd.tiling import tiled_decode, tiled_encode
from minisd.tokenizer import MAX_LENGTH
from minisd.unet import UNet
from minisd.vae import LATENT_SCALE, VAE

INPAINT_CHANNELS = 9  # the inpainting UNet: 4 noisy latents + 1 mask + 4 masked-image latents


# ---------------------------------------------------------------------------------------------------------------
# Steps every pipeline takes


def device_dtype(unet: UNet) -> tuple[torch.device, torch.dtype]:
    """Where the run happens: the UNet's device and dtype."""
    weight = unet.conv_in.weight
    return weight.device, weight.dtype


def encode_prompts(
    components: Networks,
    prompt: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    prompt_embeds: Tensor | None,
    negative_prompt_embeds: Tensor | None,
    num_images_per_prompt: int,
    do_guidance: bool,
    clip_skip: int | None,
) -> Tensor:
    """The UNet's context: (b·n, s, d) prompt embeddings, or (2·b·n, s, d) [negative; positive] with guidance.

    Each prompt's embedding is repeated n = num_images_per_prompt times in place (p0 p0 p1 p1), as diffusers does.
    The negative prompt defaults to "" (the unconditional prompt SD v1 was trained to drop to). Prompts go through
    prompts.encode_prompt (A1111 emphasis, long prompts); negative and positive in one call, so they get the same
    number of 77-token chunks. Given prompt_embeds without negative_prompt_embeds, the negative is the encoded
    negative_prompt (or "", repeated to the same number of chunks).
    """
    device, dtype = device_dtype(components.unet)
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    if prompt_embeds is None:
        prompts = prompt_list("prompt", prompt)
        negatives = prompt_list("negative_prompt", negative_prompt or "", len(prompts)) if do_guidance else []
        embeds = encode_prompt(tokenizer, text_encoder, negatives + prompts, clip_skip=clip_skip)
        negative_prompt_embeds, prompt_embeds = embeds[: len(negatives)], embeds[len(negatives) :]
    elif do_guidance and negative_prompt_embeds is None:
        b, s = prompt_embeds.shape[:2]
        negatives = prompt_list("negative_prompt", negative_prompt or "", b)
        negative_prompt_embeds = encode_prompt(tokenizer, text_encoder, negatives, clip_skip=clip_skip)
        if negative_prompt is None and s % MAX_LENGTH == 0:  # "" padded to prompt_embeds' chunks, as A1111 pads
            negative_prompt_embeds = negative_prompt_embeds.repeat(1, s // MAX_LENGTH, 1)
        if negative_prompt_embeds.shape[1] != s:
            raise MinisdError(
                f"negative_prompt encodes to {negative_prompt_embeds.shape[1]} tokens but prompt_embeds has {s}: "
                "give negative_prompt_embeds of prompt_embeds' shape"
            )
    context = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_guidance else prompt_embeds
    context = context.to(device=device, dtype=dtype)
    # (2·b, s, d) -> (2·b·n, s, d): each row repeated n times in place
    return context.repeat_interleave(num_images_per_prompt, dim=0)


def encode_image(
    vae: VAE, image: Tensor, generator: Generator | None, dtype: torch.dtype, tiling: bool = False
) -> Tensor:
    """image (b, 3, H, W) in [-1, 1] -> UNet latents (b, 4, H/8, W/8) = LATENT_SCALE · z, z ~ q(z | image) sampled
    with ε drawn as the starting noise is (float32 on the CPU, then moved: minisd.noise).
    tiling: encode in overlapping 512-pixel tiles (minisd.tiling.tiled_encode); images of 512×512 or less whole."""
    vae_device, vae_dtype = vae.post_quant_conv.weight.device, vae.post_quant_conv.weight.dtype
    image = image.to(device=vae_device, dtype=vae_dtype)
    posterior = tiled_encode(vae, image) if tiling else vae.encode(image)
    # diffusers' retrieve_latents(vae.encode(image), generator) with a CPU generator in float32: the same ε
    eps = randn(posterior.mean.shape, generator, torch.float32, "cpu").to(device=vae_device, dtype=vae_dtype)
    vae_latents = posterior.sample(noise=eps)  # z = μ + σ·ε
    return (LATENT_SCALE * vae_latents).to(dtype)  # latents = scale · vae_latents (vae.LATENT_SCALE)


def rescale_guidance(noise_pred: Tensor, noise_pred_text: Tensor, guidance_rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, arXiv:2305.08891, §3.4): bring the guided ε back to the standard deviation
    of the text-conditioned ε (eq. 15), then mix by φ = guidance_rescale (eq. 16); std per sample over (c, h, w).

    >>> eps_text, eps_cfg = torch.tensor([[1.0, -1.0]]), torch.tensor([[4.0, -4.0]])
    >>> rescale_guidance(eps_cfg, eps_text, 0.5).tolist()  # rescaled to [1, −1], then halfway back
    [[2.5, -2.5]]
    """
    dims = list(range(1, noise_pred.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_pred.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_pred * (std_text / std_cfg)  # eq. 15
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_pred  # eq. 16


def progress(sampler: Sampler, enabled: bool) -> tqdm:
    """A tqdm bar of the run's steps on stderr (disabled: nothing shown), counted as diffusers counts them: 10 PLMS
    steps show 10/10 though they make 11 model calls, and Heun's n steps n/n for 2n − 1 calls. The loop moves it
    on to sampler.steps_done after each call."""
    return tqdm(total=sampler.num_steps, disable=not enabled)


def keep_going(callback, step: int, timestep: Tensor, latents: Tensor) -> bool:
    """Call the caller's per-step callback; False stops the run (any other return value continues)."""
    return callback is None or callback(step, timestep, latents) is not False


def decode(vae: VAE, latents: Tensor, tiling: bool = False) -> Tensor:
    """UNet latents (b, 4, h, w) -> image (b, 3, 8h, 8w), roughly [-1, 1], in the VAE's dtype.

    tiling: decode in overlapping 512-pixel tiles (minisd.tiling.tiled_decode with diffusers' default tile
    settings): the decoder's memory stops growing with the image; latents of 64×64 or less are decoded whole.

    fp16 fallback: SD's VAE decoder can overflow float16's range (max 65504) in its last, widest layers, which
    shows as NaN/inf pixels (black or broken images). When a float16 or bfloat16 VAE returns a non-finite value
    from finite latents, the latents are decoded again by a float32 copy of the VAE, with a warning, and that
    result is returned (cast to the VAE's dtype: the pixels are in [-1, 1], where that loses nothing visible).
    The copy (335 MB for SD v1's VAE) is made for this call and freed when it returns: nothing is cached, so a
    run that always falls back pays one copy per decode; keep the VAE in float32 (vae.float()) to avoid that.
    Non-finite latents (the UNet overflowed) are not the VAE's fault: they get a warning and no second decode.
    """
    weight = vae.post_quant_conv.weight
    vae_latents = latents / LATENT_SCALE  # unscale: the VAE works on vae_latents = latents / LATENT_SCALE
    image = decode_vae_latents(vae, vae_latents.to(device=weight.device, dtype=weight.dtype), tiling)
    if weight.dtype not in (torch.float16, torch.bfloat16) or torch.isfinite(image).all():
        return image
    if not torch.isfinite(latents).all():
        warnings.warn("the latents hold NaN/inf before decoding: the UNet overflowed, not the VAE", stacklevel=2)
        return image
    warnings.warn(
        f"the {weight.dtype} VAE decoded to NaN/inf; decoding again with a float32 copy of the VAE "
        "(keep the VAE in float32 to skip the first try)",
        stacklevel=2,
    )
    vae_fp32 = copy.deepcopy(vae).to(torch.float32)  # temporary: freed on return
    image = decode_vae_latents(vae_fp32, vae_latents.to(device=weight.device, dtype=torch.float32), tiling)
    return image.to(weight.dtype)


def decode_vae_latents(vae: VAE, vae_latents: Tensor, tiling: bool) -> Tensor:
    """vae.decode, or its tiled form (minisd.tiling) when tiling is True. vae_latents: (b, 4, h, w), unscaled."""
    return tiled_decode(vae, vae_latents) if tiling else vae.decode(vae_latents)


def to_output(image: Tensor, output_type: str):
    """image (b, 3, H, W) in [-1, 1] -> what output_type asks for, as diffusers' VaeImageProcessor.postprocess:
    "pil": b PIL images; "np": float32 numpy (b, H, W, 3) in [0, 1]; "pt": tensor (b, 3, H, W) in [0, 1]."""
    if output_type == "pil":
        return image_to_pil(image)
    image = image_to_unit(image)  # [-1, 1] -> [0, 1]
    if output_type == "np":
        return image.cpu().permute(0, 2, 3, 1).float().numpy()
    return image
