"""What Kandinsky 2.2's three pipelines share: checks, the image and mask as the decoder wants them, the decoder's
samplers, the image embeddings for guidance, decoding. The loops live in txt2img.py, img2img.py, inpaint.py and
prior.py, one whole loop per file; minisd.pipelines.common supplies the checks and steps that read the same as SD's.

Randomness, device and dtype as in minisd.pipelines.common: every draw is float32 on the CPU from the caller's CPU
generator (or `seed`), then moved; the run happens on the decoder UNet's device and dtype (the prior's networks run
on their own).
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from minisd.errors import MinisdError
from minisd.images import mask_to_tensor, pil_to_image
from minisd.kandinsky.movq import MoVQ
from minisd.kandinsky.unet import DecoderUNet
from minisd.pipelines.checks import check_int, check_number
from minisd.samplers import Sampler
from minisd.samplers.ddim import DDIMSampler
from minisd.samplers.ddpm import DDPMSampler
from minisd.samplers.schedule import check_num_inference_steps, linear_betas

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
INPAINT_CHANNELS = 9  # the inpainting decoder: 4 noisy latents + 4 masked-image latents + 1 keep-mask
MAX_SIDE = 4096  # pixels: Kandinsky 2.2 was trained up to 1024; 4096 is already 64× its attention cost
MAX_PIXELS = 2048 * 2048  # height · width: 16 times its own 512×512, as SD's (pipelines/checks.MAX_AREA_FACTOR)
# The decoder's samplers, with Kandinsky 2.2's β (scheduler_config.json: DDPMScheduler, "linear", 0.00085 → 0.012,
# steps_offset 1, "leading" spacing): DDPM is the published one, DDIM the deterministic alternative.
DECODER_SAMPLERS = ("DDPM", "DDIM")


class Decoder(Protocol):
    """What the decoder loops need: minisd.kandinsky.loading.KandinskyComponents, or any object with these."""

    unet: DecoderUNet
    movq: MoVQ


def check_decoder(
    components: Decoder, num_inference_steps: int, guidance_scale: float, num_images_per_prompt: int, output_type, cb
) -> None:
    """The checks every decoder pipeline makes on its shared arguments."""
    if not isinstance(getattr(components, "unet", None), DecoderUNet) or not isinstance(
        getattr(components, "movq", None), MoVQ
    ):
        raise MinisdError("components must hold a Kandinsky 2.2 decoder: .unet (DecoderUNet) and .movq (MoVQ)")
    check_num_inference_steps(num_inference_steps)
    check_number("guidance_scale", guidance_scale, 0.0)
    check_int("num_images_per_prompt", num_images_per_prompt, 1)
    if output_type not in OUTPUT_TYPES:
        raise MinisdError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if cb is not None and not callable(cb):
        raise MinisdError(f"callback must be None or callable(step, timestep, latents), got {cb!r:.60}")


def check_unet_channels(unet: DecoderUNet, allowed: int, pipeline: str) -> None:
    if unet.config.in_channels != allowed:
        hint = (
            " (the inpainting decoder: use minisd.kandinsky.pipelines.inpaint)" if allowed != INPAINT_CHANNELS else ""
        )
        got = unet.config.in_channels
        raise MinisdError(f"{pipeline} needs a decoder UNet with in_channels {allowed}, got {got}{hint}")


def size_multiple(components: Decoder) -> int:
    """Pixel sides must be multiples of this: MoVQ's 8 times the UNet's 8 (three ResNet↓ that halve exactly): 64."""
    return components.movq.config.downscale_factor * components.unet.config.size_multiple


def check_size(components: Decoder, height: object, width: object) -> None:
    """diffusers rounds a size up to the next multiple of 64 without a word; minisd asks for one."""
    m = size_multiple(components)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or not m <= value <= MAX_SIDE or value % m:
            raise MinisdError(f"{name} must be a multiple of {m} pixels from {m} to {MAX_SIDE}, got {value!r}")
    if height * width > MAX_PIXELS:
        raise MinisdError(f"width × height must be at most {MAX_PIXELS} pixels (2048×2048), got {width}x{height}")


def decoder_sampler(sampler: str | Sampler) -> Sampler:
    """ "DDPM" (Kandinsky's own) or "DDIM" over Kandinsky's linear β, or the caller's Sampler object."""
    if isinstance(sampler, Sampler):
        return sampler
    if sampler == "DDPM":
        return DDPMSampler(betas=linear_betas())
    if sampler == "DDIM":
        return DDIMSampler(betas=linear_betas())
    raise MinisdError(f"sampler must be one of {', '.join(DECODER_SAMPLERS)} or a Sampler object, got {sampler!r}")


def device_dtype(unet: DecoderUNet) -> tuple[torch.device, torch.dtype]:
    weight = unet.conv_in.weight
    return weight.device, weight.dtype


def check_embeds(name: str, embeds: object, d: int, b: int | None = None) -> Tensor:
    """A (b, d) floating tensor of image embeddings (b given: exactly that many)."""
    ok = isinstance(embeds, Tensor) and embeds.ndim == 2 and embeds.shape[1] == d and embeds.is_floating_point()
    if not ok or embeds.shape[0] == 0 or (b is not None and embeds.shape[0] != b):
        got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise MinisdError(f"{name} must be a floating ({b if b is not None else 'b'}, {d}) tensor, got {got}")
    if not torch.isfinite(embeds).all():
        raise MinisdError(f"{name} must be finite, got NaN or infinite values")
    return embeds


def guidance_embeds(
    image_embeds: Tensor, negative_image_embeds: Tensor, unet: DecoderUNet, do_guidance: bool
) -> Tensor:
    """The decoder's conditioning: (b, d) image embeddings, or (2·b, d) [negative; positive] with guidance, on the
    UNet's device and dtype. The negative embedding is what guidance steers away from: the prior's output for the
    negative prompt, or the CLIP embedding of an all-zero image when there is none."""
    embeds = torch.cat([negative_image_embeds, image_embeds]) if do_guidance else image_embeds
    device, dtype = device_dtype(unet)
    return embeds.to(device=device, dtype=dtype)


def resize(pil: Image.Image, width: int, height: int) -> Image.Image:
    """PIL bicubic resize to (width, height) with reducing_gap=1, as Kandinsky's pipelines resize every input image
    (diffusers VaeImageProcessor(resample="bicubic", reducing_gap=1)); unchanged when the size is already right."""
    if pil.size == (width, height):
        return pil
    return pil.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=1)


def to_images(name: str, image: object, height: int, width: int) -> Tensor:
    """A PIL image, a list of them, or a (k, 3, height, width) tensor in [-1, 1] -> (k, 3, height, width) float32
    CPU in [-1, 1]. PIL images are resized to the asked size (Kandinsky's rule; SD's pipelines refuse instead)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list) and image and all(isinstance(p, Image.Image) for p in image):
        return torch.cat([pil_to_image(resize(p, width, height)) for p in image])
    if isinstance(image, Tensor):
        if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point() or image.shape[0] == 0:
            raise MinisdError(f"{name} must be a floating (k, 3, h, w) tensor in [-1, 1], got {tuple(image.shape)}")
        if tuple(image.shape[2:]) != (height, width):
            got = f"{image.shape[2]}x{image.shape[3]}"
            raise MinisdError(
                f"{name} tensor must be {height}x{width} (PIL images are resized, tensors not), got {got}"
            )
        if not torch.isfinite(image).all():
            raise MinisdError(f"{name} must be finite, got NaN or infinite values")
        return image.detach().float().cpu().contiguous()
    raise MinisdError(f"{name} must be a PIL image, a list of them or a (k, 3, h, w) tensor, got {image!r:.60}")


def to_masks(mask: object, height: int, width: int) -> Tensor:
    """The inpainting mask -> (k, 1, height, width) float32 of 1 (repaint, white) and 0 (keep), binarised at 0.5.

    PIL images (or a list) are resized with Lanczos and turned grey, as diffusers' Kandinsky pipeline does; a numpy
    (height, width) array or a (k, 1, height, width) tensor in [0, 1] is taken at that size.
    """
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, list) and mask and all(isinstance(p, Image.Image) for p in mask):
        return torch.cat([mask_to_tensor(p, height, width) for p in mask])
    if type(mask).__name__ == "ndarray":  # a numpy array (numpy is not a dependency: torch reads it)
        mask = torch.as_tensor(mask, dtype=torch.float32)[None, None] if mask.ndim == 2 else None
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or not mask.is_floating_point():
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise MinisdError(f"mask_image must be a PIL image, an (h, w) array or a (k, 1, h, w) tensor, got {got}")
    if tuple(mask.shape[2:]) != (height, width):
        raise MinisdError(f"mask_image must be {height}x{width} (height × width), got {mask.shape[2]}x{mask.shape[3]}")
    if torch.isnan(mask).any():
        raise MinisdError("mask_image must not contain NaN")
    return (mask.detach().float().cpu() >= 0.5).float()


def grow_repaint_area(repaint: Tensor) -> Tensor:
    """Kandinsky 2.2's latent mask step (diffusers `prepare_mask`): every latent pixel next to one that is repainted
    is repainted too, in a six-neighbour hexagon: up, down, left, right and the two diagonals ↖ ↘ (not ↗ ↙).

    repaint: (b, 1, h, w) of 0 and 1. Returns the grown mask, same shape.

    >>> grow_repaint_area(torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0.0]])[None, None])[0, 0].tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """
    hexagon = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=repaint.dtype, device=repaint.device)
    neighbours = F.conv2d(repaint, hexagon[None, None], padding=1)  # how many repainted pixels touch each pixel
    return (neighbours > 0).to(repaint.dtype)


def per_prompt(tensor: Tensor, batch: int, name: str) -> Tensor:
    """(k, …) images or masks for a batch of b·n: k = 1 is shared, k = b gives image i to prompt i (each repeated n
    times in place, like the embeddings)."""
    k = tensor.shape[0]
    if batch % k:
        raise MinisdError(f"{name} must hold 1 image or one per prompt, got {k} for {batch} images to make")
    return tensor.repeat_interleave(batch // k, dim=0)


def decode(movq: MoVQ, latents: Tensor) -> Tensor:
    """Denoised latents (b, 4, h, w) -> image (b, 3, 8h, 8w), roughly [-1, 1], in MoVQ's dtype. Not quantised:
    Kandinsky's pipelines decode the latents as they are (diffusers force_not_quantize=True)."""
    weight = movq.post_quant_conv.weight
    return movq.decode(latents.to(device=weight.device, dtype=weight.dtype))
