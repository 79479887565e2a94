"""Kandinsky 2.2 from minisd's pieces: a prior turns the prompt into a CLIP image embedding, a UNet conditioned on
that embedding denoises MoVQ latents, MoVQ decodes them (Razzhigaev et al. 2023, arXiv:2310.03502).

    prompt ──tokenizer──▶ CLIP ViT-bigG text (clip.py, with projection) ──▶ prior.py (PriorTransformer, unCLIP
    sampler) ──▶ image_embeds (b, 1280) ──▶ unet.py (decoder UNet, DDPM) ──▶ latents ──▶ movq.py ──▶ image

Each module imports alone; nothing here is imported by minisd's SD v1 code.
"""
