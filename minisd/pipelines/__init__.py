"""Pipelines: prompt text (and images) in, images out. Each pipeline file shows its whole denoising loop.

prompts.py turns prompts into the UNet's `context` the AUTOMATIC1111 way: (emphasis:1.2), [de-emphasis], BREAK,
and prompts longer than 75 tokens.
"""

from minisd.pipelines.img2img import img2img
from minisd.pipelines.inpaint import inpaint
from minisd.pipelines.txt2img import txt2img

__all__ = ["img2img", "inpaint", "txt2img"]
