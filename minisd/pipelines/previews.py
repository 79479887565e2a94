"""Per-step previews: watch the image emerge while the sampler runs.

Two previews, a cheap one and a true one:
  - latents_to_rgb(latents): a 4 → 3 linear map per latent pixel, no network. SD's latent channels are close to a
    linear colour space (luminance, two colour axes, a pattern channel), so a fixed 4×3 matrix gives a blurry,
    1/8-size RGB picture for free (microseconds).
  - x0_preview(sampler, eps, t, latents, vae): the full VAE decode of the sampler's current estimate of the clean
    latents x̂_0 (sampler.x0_pred). Sharp, but costs one VAE decode per preview.

code        paper / diffusers
eps         ε_θ(x_t, t), the UNet's noise prediction              model_output
x0_pred     x̂_0, the clean latents the current ε implies, in each sampler's own space:
              DDPM, DDIM, PLMS      x_t = √ᾱ·x_0 + √(1 − ᾱ)·ε  ->  (x_t − √(1 − ᾱ)·ε) / √ᾱ       pred_original_sample
              Euler, LMS, Heun      x = x_0 + σ·ε                ->  x − σ·ε = D(x; σ)          pred_original_sample
              DPM++                 x_t = α_t·x_0 + σ_t·ε        ->  (x_t − σ_t·ε) / α_t       model_outputs[-1]

The pipelines' callback(step, timestep, latents) receives the latents after each step but not ε, so inside a
callback only the cheap preview applies (of the noisy latents); x0_preview belongs in a loop written out as the
lessons write it, between the UNet call and sampler.step:

    frames = []
    def show(step, timestep, latents):                     # the pipelines' callback
        frames.append(latents_to_rgb(latents)[0])          # (h/8, w/8, 3) uint8, e.g. Image.fromarray(….numpy())
    txt2img(components, "a lighthouse at dusk", sampler="DDIM", callback=show)

    for i, t in enumerate(sampler.timesteps):              # your own loop (txt2img.py shows the whole of it)
        noise_pred = unet(sampler.scale_model_input(latents, t), t, context)
        if i % 5 == 0:
            frames.append(x0_preview(sampler, noise_pred, t, latents, vae)[0])  # (h, w, 3) uint8
        latents = sampler.step(noise_pred, t, latents)
"""

import torch
from torch import Tensor

from minisd.errors import MinisdError
from minisd.images import image_to_pixels
from minisd.pipelines.common import decode
from minisd.samplers.base import Sampler
from minisd.vae import VAE

# SD v1 latents (UNet space: LATENT_SCALE · z) -> RGB in about [-1, 1], one row per latent channel, one column per
# colour (R, G, B); no bias. Fitted by least squares on SD v1 VAE latents of real images by Keturn
# ("Decoding latents to RGB without upscaling", discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/
# 23204/2); the table AUTOMATIC1111's "Approx cheap" live preview uses (modules/sd_vae_approx.py,
# cheap_approximation). With fit_latent_rgb below you can fit your own from any VAE's latents of your images.
LATENT_RGB_WEIGHT = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
LATENT_RGB_BIAS = (0.0, 0.0, 0.0)


def latents_to_rgb(
    latents: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, as_image: bool = False
) -> Tensor:
    """The cheap preview: each latent pixel's 4 channels times a 4×3 matrix, plus a bias, as RGB.

    latents: (b, 4, h, w) UNet latents (any device/dtype). weight (4, 3), bias (3,): the map, by default SD v1's
    LATENT_RGB_WEIGHT and LATENT_RGB_BIAS (or your fit_latent_rgb result). Returns pixels (b, h, w, 3) uint8 on
    the CPU, 1/8 of the image's size; with as_image=True the (b, 3, h, w) float32 values, about [-1, 1].

    >>> latents_to_rgb(torch.zeros(1, 4, 2, 3)).shape
    torch.Size([1, 2, 3, 3])
    """
    if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != 4:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise MinisdError(f"latents must be a (b, 4, h, w) tensor, got {got}")
    weight = torch.tensor(LATENT_RGB_WEIGHT) if weight is None else weight.detach().float().cpu()
    bias = torch.tensor(LATENT_RGB_BIAS) if bias is None else bias.detach().float().cpu()
    if weight.shape != (4, 3) or bias.shape != (3,):
        raise MinisdError(f"weight must be (4, 3) and bias (3,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    latents = latents.detach().float().cpu()
    image = torch.einsum("bchw,cr->brhw", latents, weight) + bias.reshape(1, 3, 1, 1)  # rgb = latentsᵀ·W + bias
    return image if as_image else image_to_pixels(image)


def fit_latent_rgb(latents: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares fit of the cheap preview: the (weight (4, 3), bias (3,)) minimising
    Σ |latentsᵀ·weight + bias − rgb|² over all latent pixels, rgb being `image` averaged over each 8×8 block.

    latents: (b, 4, h, w) UNet latents of the images (LATENT_SCALE · vae.encode(image).mean for your VAE);
    image: (b, 3, f·h, f·w) in [-1, 1]. Use many varied images: the fit is only as general as they are. float64.
    """
    if latents.ndim != 4 or latents.shape[1] != 4 or image.ndim != 4 or image.shape[1] != 3:
        raise MinisdError(f"need latents (b, 4, h, w) and image (b, 3, H, W), got {latents.shape}, {image.shape}")
    h, w = latents.shape[-2:]
    if image.shape[0] != latents.shape[0] or image.shape[2] % h or image.shape[3] % w:
        raise MinisdError(f"image {tuple(image.shape)} must be the latents' batch and a multiple of their {h}x{w}")
    rgb = torch.nn.functional.avg_pool2d(image.double(), image.shape[2] // h)  # (b, 3, h, w): one colour per block
    x = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, 4)  # (b·h·w, 4): one row per latent pixel
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # a column of 1s for the bias
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)  # (b·h·w, 3)
    solution = torch.linalg.lstsq(x.cpu(), y.cpu()).solution  # (5, 3)
    return solution[:4], solution[4]


def x0_preview(
    sampler: Sampler, eps: Tensor, t: Tensor | float, latents: Tensor, vae: VAE, tiling: bool = False
) -> Tensor:
    """The true preview: the full VAE decode of sampler.x0_pred(eps, t, latents), the clean latents x̂_0 that the
    sampler's own maths gives for this model call (each sampler family states its x̂_0: samplers/base.py,
    sigmas.py, dpm_solver.py).

    eps: the (guided) UNet output at timestep t; latents: what the sampler gave that call (before
    scale_model_input and before sampler.step, which moves the sampler on). Returns pixels (b, 8h, 8w, 3) uint8 on
    the CPU: what the image would be if the sampler jumped to the end now. Costs one VAE decode (common.decode:
    the fp16 NaN fallback and tiling apply).
    """
    if not isinstance(sampler, Sampler):
        raise MinisdError(f"sampler must be a minisd Sampler (from get_sampler), got {type(sampler).__name__}")
    return image_to_pixels(decode(vae, sampler.x0_pred(eps, t, latents), tiling))
