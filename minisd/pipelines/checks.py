"""Every check a pipeline makes before any compute: the one validation boundary of minisd's generation.

Each failure is one MinisdError line naming the parameter, the allowed range and the value. The pipelines
(txt2img.py, img2img.py, inpaint.py) call these first; the Python API (api.py) adds only what is its own (one prompt
per call, seed + i for image i); the command line checks only what must fail before the weights load (files,
device, dtype) and lets these speak for every range. New arguments get their check here.

Besides refusing, some of these hand the checked value on in the form the loop uses: make_sampler (a name -> a
Sampler; model_sampler with the model's defaults), make_generator (a seed -> a CPU generator), prompt_list (a str
-> a list), to_image and to_mask (PIL images or tensors -> CPU float tensors).
"""

import math
from typing import Protocol

import torch
from PIL import Image
from torch import Generator, Tensor

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.images import mask_to_tensor, pil_to_image
from minisd.samplers import SIGMA_SAMPLERS, Sampler, get_sampler, resolve_name
from minisd.samplers.base import check_prediction_type, img2img_start
from minisd.samplers.schedule import check_num_inference_steps
from minisd.tokenizer import Tokenizer
from minisd.unet import UNet
from minisd.vae import VAE

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE = 8192  # pixels: 1024×1024 latents, a million self-attention tokens; far past what SD v1 was trained for
MAX_AREA_FACTOR = 16  # a picture has at most 16× its model's own area: 2048×2048 for SD v1, 256×256 for nano
MAX_GUIDANCE = 100.0  # A1111's slider stops at 30; past 100 the guided ε overflows to garbage (1e308 gives inf)


class Networks(Protocol):
    """What the pipelines take as `components`: any object holding the four networks (.tokenizer .text_encoder .vae
    .unet), e.g. minisd.loading.Components, a SimpleNamespace or your own dataclass."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet


def check_bool(name: str, value: object) -> bool:
    """value, or a MinisdError unless it is True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise MinisdError(f"{name} must be a bool, got {value!r}")
    return value


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
    components: Networks,
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
    check_number("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE)
    check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
    check_int("num_images_per_prompt", num_images_per_prompt, 1)
    n_layers = components.text_encoder.config.num_hidden_layers
    ok = isinstance(clip_skip, int) and not isinstance(clip_skip, bool) and 0 <= clip_skip <= n_layers
    if clip_skip is not None and not ok:
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


def size_multiple(components: Networks) -> int:
    """Pixel height and width must be multiples of this: one latent pixel covers 8×8 image pixels (SD v1's VAE).
    The UNet takes any latent size (it upsamples to each skip's size)."""
    return components.vae.config.downscale_factor


def max_pixels(components: Networks) -> int | None:
    """The most pixels (height · width) a picture of these networks may have: MAX_AREA_FACTOR times the model's own
    area when the components say it (loading.Components.sample_size), else None (only MAX_SIDE bounds a side).
    Minutes of sampling at 8192×8192 on the 64-pixel nano model would make nothing it was trained for."""
    sample_size = getattr(components, "sample_size", None)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int):
        return None
    return MAX_AREA_FACTOR * sample_size * sample_size


def check_size(components: Networks, height: object, width: object, what: str = "") -> None:
    """height and width (of the picture, or of `what`, e.g. "image ") in pixels: multiples of the VAE's 8, at most
    MAX_SIDE each and max_pixels(components) together."""
    multiple = size_multiple(components)
    for name, value in (("height", height), ("width", width)):
        ok = isinstance(value, int) and not isinstance(value, bool) and multiple <= value <= MAX_SIDE
        if not ok or value % multiple:
            raise MinisdError(
                f"{what}{name} must be a multiple of {multiple} pixels from {multiple} to {MAX_SIDE}, got {value!r}"
            )
    limit = max_pixels(components)
    if limit is not None and height * width > limit:
        side = components.sample_size
        raise MinisdError(
            f"{what}width × height must be at most {limit} pixels ({MAX_AREA_FACTOR} times this model's own "
            f"{side}×{side}), got {width}x{height}"
        )


def model_prediction(
    components: Networks, prediction_type: str | None, rescale_betas_zero_snr: bool | None
) -> tuple[str, bool]:
    """What the model predicts and whether its β are rescaled for zero terminal SNR: the caller's choice, else the
    model's own (loading.Components records both; SD v1's ε and no rescaling for any other object)."""
    if prediction_type is None:
        prediction_type = getattr(components, "prediction_type", "epsilon")
    if rescale_betas_zero_snr is None:
        rescale_betas_zero_snr = getattr(components, "rescale_betas_zero_snr", False)
    return check_prediction_type(prediction_type, rescale_betas_zero_snr), rescale_betas_zero_snr


def make_sampler(
    sampler: str | Sampler, eta: float | None, prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False
) -> Sampler:
    """A sampler by name (minisd.samplers.get_sampler: "PLMS", "Euler a", "DPMSolverMultistepScheduler", ...) set up
    for the model (model_prediction's settings), or the caller's own Sampler object (get_sampler(name,
    schedule_type=..., timestep_spacing=...) for another schedule), which is re-planned by every run and must be
    set up for the model itself."""
    if isinstance(sampler, Sampler):
        if eta is not None:
            raise MinisdError(f"eta applies when sampler is given by name; set it on the sampler object, got {eta!r}")
        ours = (sampler.prediction_type, sampler.rescale_betas_zero_snr)
        if ours != (prediction_type, rescale_betas_zero_snr):
            raise MinisdError(
                f"the sampler object has prediction_type={ours[0]!r}, rescale_betas_zero_snr={ours[1]} but the model "
                f"{prediction_type!r}, {rescale_betas_zero_snr}: build it with those (or pass the sampler's name)"
            )
        return sampler
    return get_sampler(sampler, eta=eta, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr)


def model_sampler(
    components: Networks, name: str | None, eta: float | None, schedule_type: str | None, timestep_spacing: str | None
) -> Sampler:
    """get_sampler with the model's defaults filled in (components.scheduler: a folder's scheduler_config.json,
    passed on to any sampler as diffusers' from_config does; PLMS for single files): its sampler when name is None,
    its timestep_spacing, its Karras / exponential σ for a σ sampler whose name names no schedule; and always its
    prediction type and zero terminal SNR (model_prediction)."""
    defaults = getattr(components, "scheduler", {"sampler": "PLMS"})
    try:
        display, implied = resolve_name(defaults["sampler"] if name is None else name)
    except MinisdError as error:
        if name is not None:
            raise
        raise MinisdError(f"the model's scheduler is not minisd's ({error}): name a sampler") from None
    if schedule_type is None and implied is None and display in SIGMA_SAMPLERS:
        schedule_type = defaults.get("schedule_type")
    spacing = defaults.get("timestep_spacing") if timestep_spacing is None else timestep_spacing
    prediction_type, zero_snr = model_prediction(components, None, None)
    return get_sampler(
        display if implied is None else name, eta, schedule_type, spacing, prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
    )  # fmt: skip


def check_seed(seed: object, count: int = 1) -> int:
    """seed, or a MinisdError unless it is an integer whose `count` seeds seed, seed + 1, … all lie in [0, 2**64).

    >>> check_seed(2**64 - 2, count=2)
    18446744073709551614
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - count:  # manual_seed's range
        top = "2**64 - 1" if count == 1 else f"2**64 - {count} (one seed per image)"
        raise MinisdError(f"seed must be an integer in [0, {top}], got {seed!r}")
    return seed


def make_generator(generator: Generator | None, seed: int | None) -> Generator | None:
    """The caller's CPU generator, or a new one seeded with `seed`, or None (torch's global generator)."""
    if seed is not None:
        if generator is not None:
            raise MinisdError("give generator or seed, not both")
        return torch.Generator("cpu").manual_seed(check_seed(seed))
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


def prompt_pairs(prompt: str | list[str], negative_prompt: str | list[str]) -> list[tuple[str, str]]:
    """(prompt, negative prompt) pairs: a list of prompts with one negative prompt for all, or one each."""
    prompts = prompt_list("prompt", prompt)
    return list(zip(prompts, prompt_list("negative_prompt", negative_prompt, len(prompts)), strict=True))


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
