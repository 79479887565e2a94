"""What the three pipelines share: argument checks, the prompt → context step, noise, guidance rescale, decoding.

The denoising loops themselves live in txt2img.py, img2img.py and inpaint.py, one whole loop per file. Everything
here is either a check made before any compute (each failure one MinisdError line naming the parameter, the
allowed range and the value) or a step that reads the same in every pipeline.

Randomness, device and dtype belong to the caller:
  - every random draw a pipeline makes before its loop (the starting noise, the VAE posterior sample) is one
    torch.randn call in float32 ON THE CPU from the caller's CPU generator (`seed` makes one), then moved to the
    UNet's device and dtype. So one seed gives the same starting point on CPU and on CUDA; what a GPU changes is
    only the arithmetic of the networks. For a bit-exact comparison between devices pass the same `latents`.
  - the samplers draw their per-step noise (Euler a, DDIM with eta > 0) from the same generator, on the CPU.
  - the device and dtype are the UNet's: move the modules (`.to("cuda", torch.float16)`) and the pipeline follows.
  - nothing seeds torch's global generator; generator=None and seed=None draw from it as torch.randn does.
"""

import copy
import math
import warnings
from typing import Protocol

import torch
from PIL import Image
from torch import Generator, Tensor

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.images import image_to_pil, mask_to_tensor, pil_to_image
from minisd.pipelines.prompts import encode_prompt
from minisd.samplers import Sampler, get_sampler
from minisd.samplers.base import img2img_start
from minisd.samplers.schedule import check_num_inference_steps
from minisd.tiling import tiled_decode, tiled_encode
from minisd.tokenizer import MAX_LENGTH, Tokenizer
from minisd.unet import UNet
from minisd.vae import LATENT_SCALE, VAE

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
INPAINT_CHANNELS = 9  # the inpainting UNet: 4 noisy latents + 1 mask + 4 masked-image latents


class Components(Protocol):
    """Any object holding the four networks: minisd.loading.Components, a SimpleNamespace, your own dataclass."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet


# ---------------------------------------------------------------------------------------------------------------
# Checks made before any compute


def check_int(name: str, value: object, low: int) -> int:
    """value as an int, or a MinisdError unless it is an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MinisdError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    """value as a float, or a MinisdError unless it is a real number in [low, high] (NaN is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        allowed = f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise MinisdError(f"{name} must be a number {allowed}, got {value!r}")
    return float(value)


def check_common(
    components: Components,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_rescale: float,
    num_images_per_prompt: int,
    clip_skip: int | None,
    output_type: str,
    callback: object,
) -> None:
    """The checks every pipeline makes on its shared arguments."""
    check_num_inference_steps(num_inference_steps)
    check_number("guidance_scale", guidance_scale, 0.0)
    check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
    check_int("num_images_per_prompt", num_images_per_prompt, 1)
    n_layers = components.text_encoder.config.num_hidden_layers
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)):
        raise MinisdError(f"clip_skip must be None or an integer in [0, {n_layers}], got {clip_skip!r}")
    if clip_skip is not None and not 0 <= clip_skip <= n_layers:
        raise MinisdError(f"clip_skip must be None or an integer in [0, {n_layers}], got {clip_skip!r}")
    if output_type not in OUTPUT_TYPES:
        raise MinisdError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if callback is not None and not callable(callback):
        raise MinisdError(f"callback must be None or callable(step, timestep, latents), got {callback!r:.60}")


def check_unet_channels(unet: UNet, allowed: tuple[int, ...], pipeline: str) -> None:
    """Refuse a UNet of the wrong kind: the 9-channel inpainting UNet outside inpaint(), anything else anywhere."""
    in_channels = unet.config.in_channels
    if in_channels not in allowed:
        hint = "; use minisd.pipelines.inpaint.inpaint for the inpainting UNet" if in_channels == 9 else ""
        raise MinisdError(f"{pipeline} needs a UNet with in_channels in {allowed}, got in_channels={in_channels}{hint}")


def size_multiple(components: Components) -> int:
    """Pixel height and width must be multiples of this: one latent pixel covers 8×8 image pixels (SD v1's VAE).
    The UNet takes any latent size (it upsamples to each skip's size)."""
    return components.vae.config.downscale_factor


MAX_SIDE = 8192  # pixels: 1024×1024 latents, a million self-attention tokens; far past what SD v1 was trained for


def check_size(components: Components, height: object, width: object) -> None:
    multiple = size_multiple(components)
    for name, value in (("height", height), ("width", width)):
        ok = isinstance(value, int) and not isinstance(value, bool) and multiple <= value <= MAX_SIDE
        if not ok or value % multiple:
            raise MinisdError(
                f"{name} must be a multiple of {multiple} pixels from {multiple} to {MAX_SIDE}, got {value!r}"
            )


def make_sampler(sampler: str | Sampler, eta: float) -> Sampler:
    """A sampler by name (minisd.samplers.get_sampler: "PLMS", "Euler a", "DPMSolverMultistepScheduler", ...) or
    the caller's own Sampler object, which is re-planned by every run."""
    if isinstance(sampler, Sampler):
        if eta != 0.0:
            raise MinisdError(f"eta applies when sampler is given by name; set it on the sampler object, got {eta!r}")
        return sampler
    return get_sampler(sampler, eta=eta)


def make_generator(generator: Generator | None, seed: int | None) -> Generator | None:
    """The caller's CPU generator, or a new one seeded with `seed`, or None (torch's global generator)."""
    if seed is not None:
        if generator is not None:
            raise MinisdError("give generator or seed, not both")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise MinisdError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        return torch.Generator("cpu").manual_seed(seed)
    if generator is not None and (not isinstance(generator, Generator) or generator.device.type != "cpu"):
        what = f"a {generator.device} generator" if isinstance(generator, Generator) else type(generator).__name__
        raise MinisdError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU), got {what}")
    return generator


def prompt_list(name: str, prompt: object, n: int | None = None) -> list[str]:
    """A str or a non-empty list of str as a list; n: the length a list must have (a single str is repeated)."""
    if isinstance(prompt, str):
        return [prompt] * (n or 1)
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise MinisdError(f"{name} must be a str or a non-empty list of str, got {prompt!r:.80}")
    if n is not None and len(prompt) != n:
        raise MinisdError(f"{name} must have one entry per prompt ({n}), got {len(prompt)}")
    return prompt


def check_prompts(
    unet: UNet,
    prompt: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    prompt_embeds: Tensor | None,
    negative_prompt_embeds: Tensor | None,
) -> int:
    """Check the prompt arguments; return the number of prompts b."""
    if (prompt is None) == (prompt_embeds is None):
        raise MinisdError("give prompt or prompt_embeds, exactly one of them")
    if prompt is not None:
        if negative_prompt_embeds is not None:
            raise MinisdError("negative_prompt_embeds needs prompt_embeds; with a text prompt use negative_prompt")
        b = len(prompt_list("prompt", prompt))
    else:
        d = unet.config.cross_attention_dim
        if not isinstance(prompt_embeds, Tensor) or prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != d:
            what = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, Tensor) else type(prompt_embeds).__name__
            raise MinisdError(f"prompt_embeds must be a (b, s, {d}) tensor, got {what}")
        if not prompt_embeds.is_floating_point() or 0 in prompt_embeds.shape:
            raise MinisdError(f"prompt_embeds must be non-empty and floating, got {prompt_embeds.dtype}")
        b = prompt_embeds.shape[0]
        if negative_prompt_embeds is not None:
            if negative_prompt is not None:
                raise MinisdError("give negative_prompt or negative_prompt_embeds, not both")
            if not isinstance(negative_prompt_embeds, Tensor) or negative_prompt_embeds.shape != prompt_embeds.shape:
                got = getattr(negative_prompt_embeds, "shape", type(negative_prompt_embeds).__name__)
                raise MinisdError(
                    f"negative_prompt_embeds must have prompt_embeds' shape {tuple(prompt_embeds.shape)}, got "
                    f"{tuple(got) if isinstance(got, torch.Size) else got}"
                )
    if negative_prompt is not None:
        prompt_list("negative_prompt", negative_prompt, b)
    return b


def check_latents(latents: Tensor, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
    """The caller's starting latents: exactly this shape, the UNet's device and dtype, finite."""
    if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise MinisdError(f"latents must have shape {shape} (batch · num_images_per_prompt, 4, h/8, w/8), got {got}")
    if latents.dtype != dtype or latents.device != device:
        raise MinisdError(
            f"latents must be {dtype} on {device} (the UNet's), got {latents.dtype} on {latents.device}: "
            "move them with latents.to(device, dtype)"
        )
    if not torch.isfinite(latents).all():
        raise MinisdError("latents must be finite, got NaN or infinite values")


def check_strength(strength: float, num_inference_steps: int) -> None:
    """strength in (0, 1], and large enough that at least one of the steps runs (samplers.base.img2img_start)."""
    img2img_start(num_inference_steps, strength)


def to_image(name: str, image: object, multiple: int) -> Tensor:
    """A PIL image, a list of them (one size) or a (b, 3, h, w) tensor in [-1, 1] -> (b, 3, h, w) float32 CPU."""
    if isinstance(image, Image.Image):
        image = pil_to_image(image)
    elif isinstance(image, list) and image and all(isinstance(p, Image.Image) for p in image):
        if len({p.size for p in image}) != 1:
            raise MinisdError(f"{name} images must all have one size, got {sorted({p.size for p in image})}")
        image = torch.cat([pil_to_image(p) for p in image])
    elif isinstance(image, Tensor):
        if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point() or image.shape[0] == 0:
            raise MinisdError(f"{name} must be a floating (b, 3, h, w) tensor in [-1, 1], got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise MinisdError(f"{name} must be finite, got NaN or infinite values")
        image = image.detach().float().cpu()
    else:
        raise MinisdError(f"{name} must be a PIL image, a list of them or a (b, 3, h, w) tensor, got {image!r:.60}")
    h, w = image.shape[-2:]
    if h % multiple or w % multiple:
        raise MinisdError(f"{name} width and height must be multiples of {multiple} pixels, got {w}x{h}")
    # PIL's pixel order makes a channels-last tensor; the VAE's convolutions run ~50× slower on it on CPU.
    return image.contiguous()


def to_mask(mask: object, image: Tensor) -> Tensor:
    """A PIL mask or a (b, 1, h, w) tensor in [0, 1] -> (b, 1, h, w) float32 CPU of 0 (keep) and 1 (repaint),
    binarised at 0.5 as diffusers does; its size must be the image's."""
    h, w = image.shape[-2:]
    if isinstance(mask, Image.Image):
        if mask.size != (w, h):
            raise MinisdError(f"mask_image must be the image's size {w}x{h}, got {mask.size[0]}x{mask.size[1]}")
        return mask_to_tensor(mask, h, w)
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or not mask.is_floating_point():
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise MinisdError(f"mask_image must be a PIL image or a floating (b, 1, h, w) tensor, got {got}")
    if tuple(mask.shape[-2:]) != (h, w):
        raise MinisdError(f"mask_image must be the image's size {w}x{h}, got {mask.shape[3]}x{mask.shape[2]}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise MinisdError(f"mask_image must hold 1 or {image.shape[0]} masks (one per image), got {mask.shape[0]}")
    if torch.isnan(mask).any():
        raise MinisdError("mask_image must not contain NaN")
    return (mask.detach().float().cpu() >= 0.5).float()


def check_image_count(n_images: int, n_prompts: int) -> None:
    if n_images not in (1, n_prompts):
        raise MinisdError(f"image must hold 1 image or one per prompt ({n_prompts}), got {n_images}")


# ---------------------------------------------------------------------------------------------------------------
# Steps every pipeline takes


def device_dtype(unet: UNet) -> tuple[torch.device, torch.dtype]:
    """Where the run happens: the UNet's device and dtype."""
    weight = unet.conv_in.weight
    return weight.device, weight.dtype


def encode_prompts(
    components: Components,
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


def draw_noise(shape: tuple[int, ...], generator: Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise: one torch.randn in float32 on the CPU from `generator`, then moved to device/dtype
    (the draw diffusers' randn_tensor makes for float32 with a CPU generator, so the same seed gives its noise)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def encode_image(
    vae: VAE, image: Tensor, generator: Generator | None, dtype: torch.dtype, tiling: bool = False
) -> Tensor:
    """image (b, 3, H, W) in [-1, 1] -> UNet latents (b, 4, H/8, W/8) = LATENT_SCALE · z, z ~ q(z | image) sampled
    with noise from draw_noise (diffusers' `retrieve_latents(vae.encode(image), generator)` draws the same).
    tiling: encode in overlapping 512-pixel tiles (minisd.tiling.tiled_encode); images of 512×512 or less whole."""
    vae_device, vae_dtype = vae.post_quant_conv.weight.device, vae.post_quant_conv.weight.dtype
    image = image.to(device=vae_device, dtype=vae_dtype)
    posterior = tiled_encode(vae, image) if tiling else vae.encode(image)
    eps = draw_noise(tuple(posterior.mean.shape), generator, vae_device, vae_dtype)
    vae_latents = posterior.mean + posterior.std * eps  # z = μ + σ·ε (LDM's DiagonalGaussianDistribution.sample)
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
    image = (image / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
    if output_type == "np":
        return image.cpu().permute(0, 2, 3, 1).float().numpy()
    return image
