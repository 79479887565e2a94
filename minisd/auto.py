"""diffusers' AutoPipelineForText2Image / Image2Image / Inpainting, on minisd's networks: the Hugging Face course's
examples run with only their import lines changed (`from minisd import AutoPipelineForImage2Image`,
`from minisd.images import load_image, make_image_grid`).

    pipeline = AutoPipelineForImage2Image.from_pretrained("kandinsky-community/kandinsky-2-2-decoder",
                                                          torch_dtype=torch.float16, use_safetensors=True)
    pipeline.enable_model_cpu_offload()
    image = pipeline("cat wizard, gandalf, …", image=init_image).images[0]

from_pretrained picks the family from what it loads, as diffusers does: a folder or hub id whose model_index.json
names a Kandinsky 2.2 pipeline loads the decoder and the prior its README names (minisd.kandinsky.loading);
anything else loads as SD v1 (minisd.loading: single files, diffusers folders, hub ids). Calls take diffusers'
argument names and defaults (SD: 50 steps, guidance 7.5, strength 0.8; Kandinsky: 100 decoder and 25 prior steps,
guidance 4, strength 0.3, 512 × 512) and return an object with `.images`.

Where it differs from diffusers, on purpose:
  - every random number is drawn on the CPU (minisd's rule): a CUDA generator is replaced by a CPU generator of the
    same seed (its initial_seed()), so a seed gives the same image on every device — not diffusers' CUDA stream;
  - enable_model_cpu_offload moves each stage's networks to the GPU for that stage (Kandinsky: prior, then
    decoder; SD: the whole pipeline) and back, without hooks; without a GPU it does nothing;
  - enable_xformers_memory_efficient_attention does nothing: minisd's attention() already runs PyTorch's fused
    kernels (scaled_dot_product_attention: flash / memory-efficient where the GPU has them);
  - use_safetensors is accepted and ignored: minisd prefers .safetensors and reads .bin only through its safe
    unpickler (weights_convert.safe_pickle), never running code from a file.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from minisd.errors import MinisdError
from minisd.kandinsky.loading import is_kandinsky, load_kandinsky
from minisd.kandinsky.pipelines import img2img as k_img2img
from minisd.kandinsky.pipelines import inpaint as k_inpaint
from minisd.kandinsky.pipelines import txt2img as k_txt2img
from minisd.kandinsky.pipelines.prior import prior as run_prior
from minisd.loading import load_components
from minisd.pipelines import img2img, inpaint, txt2img

KANDINSKY = {"steps": 100, "guidance": 4.0, "strength": 0.3, "size": 512}  # diffusers' Kandinsky 2.2 defaults
SD = {"steps": 50, "guidance": 7.5, "strength": 0.8}  # diffusers' StableDiffusion*Pipeline defaults


def pick(value, default):
    """diffusers' None-means-default rule: `value`, or the family's default when it is None (0 stays 0)."""
    return default if value is None else value


@dataclass
class PipelineOutput:
    """What a call returns, as diffusers': `.images`, a list of PIL images (or an array / tensor for output_type
    "np" / "pt")."""

    images: list


class AutoPipeline:
    """What the three AutoPipelines share: loading, moving, offloading, the generator rule."""

    task = ""  # "txt2img", "img2img" or "inpaint"

    def __init__(self, components, kandinsky: bool):
        self.components, self.kandinsky = components, kandinsky
        self.offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        local_files_only: bool = False,
    ) -> "AutoPipeline":
        """Load SD v1 or Kandinsky 2.2 (see the module docstring), on the CPU, in torch_dtype (None: the files')."""
        if use_safetensors not in (None, True, False):
            raise MinisdError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")
        source = pretrained_model_or_path
        if is_kandinsky(source, local_files_only):
            components = load_kandinsky(source, dtype=torch_dtype, variant=variant, local_files_only=local_files_only)
            if components.prior is None or components.inpainting != (cls.task == "inpaint"):
                which = "the inpainting decoder" if components.inpainting else "the text-to-image decoder"
                raise MinisdError(f"{source} is {which}: {cls.__name__} needs "
                                  f"{'-decoder-inpaint' if cls.task == 'inpaint' else '-decoder'}")  # fmt: skip
            return cls(components, kandinsky=True)
        components = load_components(source, dtype=torch_dtype, variant=variant, local_files_only=local_files_only)
        return cls(components, kandinsky=False)

    def networks(self) -> dict[str, torch.nn.Module]:
        names = ("text_encoder", "image_encoder", "prior", "unet", "movq", "vae")
        return {n: getattr(self.components, n) for n in names if getattr(self.components, n, None) is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AutoPipeline":
        """Move every network (diffusers' .to): a device such as "cuda", and/or a dtype. Returns self."""
        try:
            device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise MinisdError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise MinisdError(f"cannot move the pipeline to {device}: CUDA is not available on this machine")
        for module in self.networks().values():
            module.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Keep the networks on the CPU and move each stage's to the GPU while it runs (see the module docstring)."""
        if not torch.cuda.is_available() and device is None:
            return  # nothing to offload to: everything stays and runs on the CPU
        self.offload_device = torch.device(device) if device is not None else torch.device("cuda", gpu_id or 0)
        self.to("cpu")

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Nothing to do: minisd's attention() is PyTorch's fused scaled_dot_product_attention."""

    @contextmanager
    def stage(self, *names: str):
        """With offloading: these networks on the GPU for the block, back on the CPU after."""
        modules = [self.networks()[n] for n in names if n in self.networks()]
        if self.offload_device is not None:
            for module in modules:
                module.to(self.offload_device)
        try:
            yield
        finally:
            if self.offload_device is not None:
                for module in modules:
                    module.to("cpu")

    @staticmethod
    def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
        """The caller's generator on the CPU: a CUDA generator becomes a CPU one of the same initial seed."""
        if generator is None or not isinstance(generator, torch.Generator) or generator.device.type == "cpu":
            return generator
        return torch.Generator("cpu").manual_seed(generator.initial_seed())

    def kandinsky_embeds(self, prompt, negative_prompt, n, prior_steps, prior_guidance, generator):
        """Stage 1 of Kandinsky: the prior, on its own (so it can be offloaded apart from the decoder)."""
        with self.stage("text_encoder", "image_encoder", "prior"):
            return run_prior(self.components, prompt, negative_prompt, n, prior_steps, prior_guidance, generator)

    def output(self, images) -> PipelineOutput:
        return PipelineOutput(images)


def sd_image(image: Image.Image, height: int | None, width: int | None) -> Image.Image:
    """An SD input image as diffusers' VaeImageProcessor sizes it: to (width, height) when given, else its own size
    rounded down to multiples of 8; Lanczos where that changes it."""
    if not isinstance(image, Image.Image):
        return image  # tensors go to the pipelines as they are (they check them)
    w = width or image.width // 8 * 8
    h = height or image.height // 8 * 8
    return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.LANCZOS)


class AutoPipelineForText2Image(AutoPipeline):
    """Text to image with SD v1 or Kandinsky 2.2 (diffusers' AutoPipelineForText2Image)."""

    task = "txt2img"

    def __call__(self, prompt, negative_prompt=None, height=None, width=None, num_inference_steps=None,
                 guidance_scale=None, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
                 prior_num_inference_steps=25, prior_guidance_scale=4.0) -> PipelineOutput:  # fmt: skip
        generator = self.cpu_generator(generator)
        if not self.kandinsky:
            with self.stage("text_encoder", "unet", "vae"):
                return self.output(txt2img(self.components, prompt, negative_prompt, height, width,
                                           pick(num_inference_steps, SD["steps"]), pick(guidance_scale, SD["guidance"]),
                                           num_images_per_prompt=num_images_per_prompt, generator=generator,
                                           latents=latents, output_type=output_type))  # fmt: skip
        embeds = self.kandinsky_embeds(prompt, negative_prompt, num_images_per_prompt, prior_num_inference_steps,
                                       prior_guidance_scale, generator)  # fmt: skip
        with self.stage("unet", "movq"):
            return self.output(k_txt2img.txt2img(
                self.components, height=pick(height, KANDINSKY["size"]), width=pick(width, KANDINSKY["size"]),
                num_inference_steps=pick(num_inference_steps, KANDINSKY["steps"]),
                guidance_scale=pick(guidance_scale, KANDINSKY["guidance"]),
                generator=generator, latents=latents, image_embeds=embeds.image_embeds,
                negative_image_embeds=embeds.negative_image_embeds, output_type=output_type,
            ))  # fmt: skip


class AutoPipelineForImage2Image(AutoPipeline):
    """Image to image with SD v1 or Kandinsky 2.2 (diffusers' AutoPipelineForImage2Image)."""

    task = "img2img"

    def __call__(self, prompt, image, strength=None, negative_prompt=None, height=None, width=None,
                 num_inference_steps=None, guidance_scale=None, num_images_per_prompt=1, generator=None,
                 output_type="pil", prior_num_inference_steps=25,
                 prior_guidance_scale=4.0) -> PipelineOutput:  # fmt: skip
        generator = self.cpu_generator(generator)
        if not self.kandinsky:
            with self.stage("text_encoder", "unet", "vae"):
                return self.output(img2img(self.components, prompt, sd_image(image, height, width),
                                           pick(strength, SD["strength"]), negative_prompt,
                                           pick(num_inference_steps, SD["steps"]), pick(guidance_scale, SD["guidance"]),
                                           num_images_per_prompt=num_images_per_prompt, generator=generator,
                                           output_type=output_type))  # fmt: skip
        embeds = self.kandinsky_embeds(prompt, negative_prompt, num_images_per_prompt, prior_num_inference_steps,
                                       prior_guidance_scale, generator)  # fmt: skip
        with self.stage("unet", "movq"):
            return self.output(k_img2img.img2img(
                self.components, image=image, strength=pick(strength, KANDINSKY["strength"]),
                height=pick(height, KANDINSKY["size"]), width=pick(width, KANDINSKY["size"]),
                num_inference_steps=pick(num_inference_steps, KANDINSKY["steps"]),
                guidance_scale=pick(guidance_scale, KANDINSKY["guidance"]),
                generator=generator, image_embeds=embeds.image_embeds,
                negative_image_embeds=embeds.negative_image_embeds, output_type=output_type,
            ))  # fmt: skip


class AutoPipelineForInpainting(AutoPipeline):
    """Inpainting with SD v1 (either UNet) or Kandinsky 2.2's inpainting decoder (diffusers'
    AutoPipelineForInpainting)."""

    task = "inpaint"

    def __call__(self, prompt, image, mask_image, negative_prompt=None, strength=1.0, height=None, width=None,
                 num_inference_steps=None, guidance_scale=None, num_images_per_prompt=1, generator=None,
                 latents=None, output_type="pil", prior_num_inference_steps=25,
                 prior_guidance_scale=4.0) -> PipelineOutput:  # fmt: skip
        generator = self.cpu_generator(generator)
        if not self.kandinsky:
            image = sd_image(image, height, width)
            if isinstance(image, Image.Image) and isinstance(mask_image, Image.Image):
                mask_image = sd_image(mask_image, image.height, image.width)
            with self.stage("text_encoder", "unet", "vae"):
                return self.output(inpaint(self.components, prompt, image, mask_image, strength, negative_prompt,
                                           pick(num_inference_steps, SD["steps"]), pick(guidance_scale, SD["guidance"]),
                                           num_images_per_prompt=num_images_per_prompt, generator=generator,
                                           latents=latents, output_type=output_type))  # fmt: skip
        embeds = self.kandinsky_embeds(prompt, negative_prompt, num_images_per_prompt, prior_num_inference_steps,
                                       prior_guidance_scale, generator)  # fmt: skip
        with self.stage("unet", "movq"):
            return self.output(k_inpaint.inpaint(
                self.components, image=image, mask_image=mask_image, height=pick(height, KANDINSKY["size"]),
                width=pick(width, KANDINSKY["size"]), num_inference_steps=pick(num_inference_steps, KANDINSKY["steps"]),
                guidance_scale=pick(guidance_scale, KANDINSKY["guidance"]),
                generator=generator, latents=latents, image_embeds=embeds.image_embeds,
                negative_image_embeds=embeds.negative_image_embeds, output_type=output_type,
            ))  # fmt: skip
