"""minisd: Stable Diffusion v1 from scratch in plain PyTorch.

Data flows one way: tokenizer → clip → (pipeline: sampler ⇄ unet) → vae → images.

    pipe = minisd.StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")
    image = pipe("a watercolour fox", num_inference_steps=25, seed=1).images[0]
"""

from minisd.api import GenerationOutput, GenerationParameters, StableDiffusion, default_model
from minisd.errors import MinisdError

__all__ = ["GenerationOutput", "GenerationParameters", "MinisdError", "StableDiffusion", "default_model"]
__version__ = "0.1.0"
