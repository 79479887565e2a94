"""Pipelines: prompt text (and images) in, images out. Each pipeline file shows its whole denoising loop.

prompts.py turns prompts into the UNet's `context` the AUTOMATIC1111 way: (emphasis:1.2), [de-emphasis], BREAK,
and prompts longer than 75 tokens.
"""
