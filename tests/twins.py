"""Fresh tiny minisd networks and their diffusers/transformers twins (same weights), as tests/test_pipelines.py builds
them, for the tests that change networks (LoRAs, added words, another VAE): each call makes new ones."""

import types
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minisd.clip import TextEncoder
from minisd.tokenizer import PAD_TOKENS, Tokenizer
from minisd.unet import UNet
from minisd.vae import VAE
from tests.reference import write_reference_tokenizer_folder
from tests.test_pipelines import SIZE, TINY_TEXT, TINY_UNET, TINY_VAE, UNET_BLOCKS, reference_pipeline, twin


def make_twins(folder: Path, seed: int = 0, sd2: bool = False):
    """ours: minisd's tokenizer, text encoder, VAE and UNet; ref: the twins; pipe: diffusers' StableDiffusionPipeline
    of the twins (DDIM). folder: where the reference tokenizer's files go. sd2: SD 2-shaped networks instead
    (tests/test_pipelines_sd2.py's: 64-wide heads, linear projections, a GELU text encoder, "!" padding; ε)."""
    unet_config, text_config = TINY_UNET, TINY_TEXT
    if sd2:
        from tests import test_pipelines_sd2 as sd2_sizes

        unet_config, text_config = sd2_sizes.TINY_UNET, sd2_sizes.TINY_TEXT
    torch.manual_seed(seed)  # diffusers/transformers initialise from the global generator; every weight is redrawn
    ref_unet = UNet2DConditionModel(**asdict(unet_config), **UNET_BLOCKS, sample_size=SIZE // 8)
    n = len(TINY_VAE.block_out_channels)
    ref_vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            **asdict(TINY_VAE))  # fmt: skip
    ref_text = CLIPTextModel(CLIPTextConfig(**asdict(text_config)))
    ours = types.SimpleNamespace(
        tokenizer=Tokenizer.from_default(PAD_TOKENS["sd2"]) if sd2 else Tokenizer.from_default(),
        text_encoder=twin(TextEncoder(text_config), ref_text, seed + 1),
        vae=twin(VAE(TINY_VAE), ref_vae, seed + 2),
        unet=twin(UNet(unet_config), ref_unet, seed + 3),
    )
    if not (folder / "vocab.json").is_file():
        write_reference_tokenizer_folder(folder, **({"pad_token": "!"} if sd2 else {}))
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ref = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=ref_text, vae=ref_vae, unet=ref_unet)
    pipe: StableDiffusionPipeline = reference_pipeline(StableDiffusionPipeline, ref, "DDIM")
    return types.SimpleNamespace(ours=ours, ref=ref, pipe=pipe)
