"""Kandinsky 2.2's pipelines: prior.py (prompt -> CLIP image embedding), then the decoder loops of txt2img.py,
img2img.py and inpaint.py, each shown whole. common.py holds what they share."""
