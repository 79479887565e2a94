"""Kandinsky 2.2's short Python API, as minisd.StableDiffusion's: load once, then call; each image comes with the
parameters that make it again (written into PNGs, read by `minisd regenerate`).

    pipe = Kandinsky.from_pretrained("kandinsky-community/kandinsky-2-2-decoder", dtype=torch.float16, device="cuda")
    out = pipe("a cat wizard", seed=1)          # txt2img; .img2img(prompt, image), .inpaint(prompt, image, mask)
    out.images[0], out.parameters[0].text()

Seeds, A1111's rule as in minisd.api: image i of a call uses seed + i and is made alone. The defaults are diffusers':
100 decoder steps (DDPM), guidance 4, 25 prior steps, prior guidance 4, 512 × 512, img2img strength 0.3; an empty
negative prompt means none (the decoder then steers away from a zero image's embedding, as diffusers does).

KandinskyParameters records beside GenerationParameters' fields: Prior (its hub id, or its folder's name; the
decoder is `Model`, named the same way: never a path), Prior steps and Prior CFG scale.
"""

import os
from dataclasses import dataclass, fields, replace

import torch
from PIL import Image

from minisd.api import GenerationOutput
from minisd.errors import MinisdError
from minisd.hashes import source_image
from minisd.kandinsky.loading import AUTO, KandinskyComponents, load_kandinsky
from minisd.kandinsky.pipelines.common import DECODER_SAMPLERS
from minisd.kandinsky.pipelines.img2img import img2img
from minisd.kandinsky.pipelines.inpaint import inpaint
from minisd.kandinsky.pipelines.txt2img import txt2img
from minisd.parameters import GenerationParameters, draw_seed, parse_parameters, quote_value
from minisd.pipelines.checks import check_seed, make_generator

# GenerationParameters' keys for what only SD v1's pipelines do: the σ samplers' schedule, either η (the decoder's
# DDPM and DDIM run with their fixed defaults), diffusers' spacing, guidance rescale, VAE tiling, pasting, clip skip
# and minisd.fast. Kandinsky's text never holds them; a text that does is refused rather than silently ignored.
SD_ONLY_KEYS = (
    "Schedule type", "Eta", "Eta DDIM", "Timestep spacing", "Guidance rescale", "VAE tiling", "Paste unmasked",
    "Clip skip", "Fast",
)  # fmt: skip
PRIOR_KEYS = {"prior": "Prior", "prior_steps": "Prior steps", "prior_guidance_scale": "Prior CFG scale"}


@dataclass
class KandinskyParameters(GenerationParameters):
    """GenerationParameters of a Kandinsky 2.2 image: `model_name` names the decoder, `prior` the prior."""

    prior: str | None = None
    prior_steps: int = 25
    prior_guidance_scale: float = 4.0

    def text(self) -> str:
        """GenerationParameters' text with the prior's three keys at the end of the parameters line."""
        values = {"Prior steps": self.prior_steps, "Prior CFG scale": self.prior_guidance_scale, "Prior": self.prior}
        pairs = [f"{key}: {number_or_text(value)}" for key, value in values.items() if value is not None]
        return super().text() + ", " + ", ".join(pairs)

    @classmethod
    def from_text(cls, text: str) -> "KandinskyParameters":
        """Read what text() wrote; one line for anything else."""
        base = GenerationParameters.from_text(text)
        values = parse_parameters(text)
        if "Prior steps" not in values:
            raise MinisdError("parameters lack 'Prior steps': not written for a Kandinsky 2.2 image")
        if base.sampler not in DECODER_SAMPLERS:
            raise MinisdError(f"Sampler: {base.sampler!r}; Kandinsky 2.2's decoder has {', '.join(DECODER_SAMPLERS)}")
        sd_only = [key for key in SD_ONLY_KEYS if key in values]  # never written here: they would be ignored
        if sd_only:
            what = "an SD v1 field" if len(sd_only) == 1 else "SD v1 fields"
            raise MinisdError(f"{', '.join(sd_only)}: {what}, which Kandinsky 2.2's pipelines do not take")
        try:
            prior_steps, prior_guidance = int(values["Prior steps"]), float(values.get("Prior CFG scale", 4.0))
        except ValueError as error:
            raise MinisdError(f"parameters hold a value that is not a number: {error}") from None
        base_fields = {f.name: getattr(base, f.name) for f in fields(GenerationParameters)}
        return cls(**base_fields, prior=values.get("Prior"), prior_steps=prior_steps,
                   prior_guidance_scale=prior_guidance)  # fmt: skip


def number_or_text(value: str | int | float) -> str:
    """A value as A1111's line holds it: 4.0 as 4, text quoted where needed (images.quote_value)."""
    if isinstance(value, str):
        return quote_value(value)
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def record_name(source: str | os.PathLike) -> str:
    """What a record names a decoder or prior by: a hub id as it is, a folder by its name (never its path)."""
    return os.path.basename(os.path.abspath(source)) if os.path.exists(source) else str(source)


def is_kandinsky_text(text: str) -> bool:
    """Whether a "parameters" text was written for a Kandinsky 2.2 image (it has the prior's keys)."""
    return "Prior steps" in parse_parameters(text)


class Kandinsky:
    """Kandinsky 2.2 ready to generate: `.components` (the networks), and where they came from."""

    def __init__(self, components: KandinskyComponents, weights: str, prior: str | None, model_name: str):
        self.components = components
        self.weights, self.prior, self.model_name = weights, prior, model_name

    @classmethod
    def from_pretrained(
        cls,
        decoder: str | os.PathLike,
        prior: str | os.PathLike | None = AUTO,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        variant: str | None = None,
        local_files_only: bool = False,
    ) -> "Kandinsky":
        """load_kandinsky's arguments (see minisd.kandinsky.loading), except that dtype None on the CPU means
        float32, as StableDiffusion.from_pretrained."""
        if dtype is None and str(device).startswith("cpu"):
            dtype = torch.float32
        components = load_kandinsky(decoder, prior, dtype=dtype, device=device, variant=variant,
                                    local_files_only=local_files_only)  # fmt: skip
        weights = str(os.path.abspath(decoder)) if os.path.exists(decoder) else str(decoder)
        prior = components.sources.get("prior")
        prior = str(os.path.abspath(prior)) if prior is not None and os.path.exists(prior) else prior
        return cls(components, weights, prior, record_name(decoder))

    @property
    def device(self) -> torch.device:
        return self.components.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.unet.conv_in.weight.dtype

    def __call__(self, prompt: str, negative_prompt: str = "", height: int = 512, width: int = 512,
                 num_inference_steps: int = 100, guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 prior_guidance_scale: float = 4.0, sampler: str = "DDPM", seed: int | None = None,
                 num_images_per_prompt: int = 1, callback=None) -> GenerationOutput:  # fmt: skip
        """Text to image: num_images_per_prompt images, image i from seed + i (seed drawn when None)."""
        params = self._parameters("txt2img", prompt, negative_prompt, num_inference_steps, sampler, guidance_scale,
                                  width, height, prior_num_inference_steps, prior_guidance_scale)  # fmt: skip
        return self._run(params, seed, num_images_per_prompt, callback)

    def img2img(self, prompt: str, image: Image.Image | str | os.PathLike, strength: float = 0.3,
                negative_prompt: str = "", height: int = 512, width: int = 512, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                sampler: str = "DDPM", seed: int | None = None, num_images_per_prompt: int = 1,
                callback=None) -> GenerationOutput:  # fmt: skip
        """Redraw `image` (a PIL image or a path; resized to height × width) following the prompt."""
        pil, pixels = source_image("image", image)
        params = self._parameters("img2img", prompt, negative_prompt, num_inference_steps, sampler, guidance_scale,
                                  width, height, prior_num_inference_steps, prior_guidance_scale)  # fmt: skip
        params.strength, params.image_hash = strength, pixels
        return self._run(params, seed, num_images_per_prompt, callback, pil)

    def inpaint(self, prompt: str, image: Image.Image | str | os.PathLike, mask_image: Image.Image | str | os.PathLike,
                negative_prompt: str = "", height: int = 512, width: int = 512, num_inference_steps: int = 100,
                guidance_scale: float = 4.0, prior_num_inference_steps: int = 25, prior_guidance_scale: float = 4.0,
                sampler: str = "DDPM", seed: int | None = None, num_images_per_prompt: int = 1,
                callback=None) -> GenerationOutput:  # fmt: skip
        """Repaint the white part of mask_image (both resized to height × width) following the prompt."""
        pil, pixels = source_image("image", image)
        mask, mask_pixels = source_image("mask_image", mask_image)
        params = self._parameters("inpaint", prompt, negative_prompt, num_inference_steps, sampler, guidance_scale,
                                  width, height, prior_num_inference_steps, prior_guidance_scale)  # fmt: skip
        params.image_hash, params.mask_hash = pixels, mask_pixels
        return self._run(params, seed, num_images_per_prompt, callback, pil, mask)

    def generate(
        self,
        params: KandinskyParameters,
        image: Image.Image | str | os.PathLike | None = None,
        mask_image: Image.Image | str | os.PathLike | None = None,
        callback=None,
    ) -> Image.Image:
        """One image again from its parameters (its source images given again, checked against their hashes)."""
        return self._run(params, params.seed, 1, callback, *params.source_images(image, mask_image)).images[0]

    def _parameters(self, mode, prompt, negative_prompt, steps, sampler, guidance_scale, width, height, prior_steps,
                    prior_guidance_scale) -> KandinskyParameters:  # fmt: skip
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise MinisdError(f"{name} must be a str (one prompt per call), got {type(value).__name__}")
        if sampler not in DECODER_SAMPLERS:
            raise MinisdError(
                f"sampler must be one of {', '.join(DECODER_SAMPLERS)} for Kandinsky 2.2, got {sampler!r}"
            )
        return KandinskyParameters(
            mode=mode, prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, sampler=sampler,
            guidance_scale=guidance_scale, seed=0, width=width, height=height, model_name=self.model_name,
            dtype=str(self.dtype).removeprefix("torch."), device=self.device.type,
            threads=torch.get_num_threads() if self.device.type == "cpu" else None,
            prior=None if self.prior is None else record_name(self.prior), prior_steps=prior_steps,
            prior_guidance_scale=prior_guidance_scale,
        )  # fmt: skip

    def _run(self, params: KandinskyParameters, seed, num_images, callback, image=None, mask=None):
        if self.components.prior is None:
            raise MinisdError("this Kandinsky was loaded without a prior (prior=None): use the pipelines' image_embeds")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise MinisdError(f"num_images_per_prompt must be an integer >= 1, got {num_images!r}")
        seed = check_seed(draw_seed() if seed is None else seed, num_images)
        shared = {
            "negative_prompt": params.negative_prompt or None,  # "" is none: the zero-image negative
            "height": params.height, "width": params.width, "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale, "prior_num_inference_steps": params.prior_steps,
            "prior_guidance_scale": params.prior_guidance_scale, "sampler": params.sampler, "callback": callback,
        }  # fmt: skip
        output = GenerationOutput([])
        for i in range(num_images):  # one image per call, image i from seed + i (A1111's rule)
            generator = make_generator(None, seed + i)
            if params.mode == "txt2img":
                images = txt2img(self.components, params.prompt, generator=generator, **shared)
            elif params.mode == "img2img":
                images = img2img(self.components, params.prompt, image=image, strength=params.strength,
                                 generator=generator, **shared)  # fmt: skip
            else:
                images = inpaint(self.components, params.prompt, image=image, mask_image=mask, generator=generator,
                                 **shared)  # fmt: skip
            output.images.append(images[0])
            output.parameters.append(replace(params, seed=seed + i))
        return output
