"""minisd: Stable Diffusion v1 from scratch in plain PyTorch.

Data flows one way: tokenizer → clip → (pipeline: sampler ⇄ unet) → vae → images.
"""

from minisd.errors import MinisdError

__all__ = ["MinisdError"]
__version__ = "0.1.0"
