"""CLIP's vision transformer with its projection (ViT-bigG/14 in Kandinsky 2.2): an image in, CLIP's image
embedding out — the space the prior's outputs live in.

    pixel_values (b, 3, 224, 224), CLIP-normalised
      ──patch_embedding (14×14 conv, stride 14)──▶ 256 patch tokens (b, 256, d)      d = 1664 for ViT-bigG
      [class_embedding; patches] + position_embedding ──▶ (b, 257, d) ──pre_layrnorm──▶
      48 × clip.EncoderLayer (not causal: patches have no order) ──▶ last_hidden_state (b, 257, d)
      post_layernorm(class token) ──visual_projection──▶ image_embeds (b, 1280)

Dosovitskiy et al. 2020 (ViT, arXiv:2010.11929, eq. 1-4); Radford et al. 2021 (CLIP, §2.4). The transformer layers
are minisd.clip's, with causal=False; module paths equal transformers' CLIPVisionModelWithProjection without the
`vision_model.` level (the loader's job), so its state dict loads strictly after that prefix is dropped.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from minisd.clip import Encoder, TextEncoderConfig
from minisd.errors import MinisdError

# OpenAI CLIP's preprocessing (Kandinsky 2.2's image_processor/preprocessor_config.json): bicubic resize of the
# short side to 224, centre crop 224 × 224, then per-channel (x − mean) / std of [0, 1] pixels.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageEncoderConfig(TextEncoderConfig):
    """CLIP ViT-bigG/14's vision tower (Kandinsky 2.2's image_encoder/config.json). The transformer fields mean
    what they mean for the text tower (vocab_size and max_position_embeddings are unused here)."""

    hidden_size: int = 1664
    intermediate_size: int = 8192
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    projection_dim: int = 1280
    with_projection: bool = True
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3


class VisionEmbeddings(nn.Module):
    """Patches as tokens, a learned class token in front, learned positions. pixel_values (b, 3, H, W) -> (b, 1 +
    (H/p)·(W/p), d)."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2 + 1, d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = rearrange(self.patch_embedding(pixel_values), "b d h w -> b (h w) d")  # one token per patch
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)  # (b, 1, d)
        x = torch.cat([class_token.to(patches.dtype), patches], dim=1)
        positions = torch.arange(x.shape[1], device=x.device)
        return x + self.position_embedding(positions)


class ImageEncoder(nn.Module):
    """CLIP's vision transformer with projection: pixel_values (b, 3, 224, 224) -> image_embeds (b, 1280)."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: transformers' name
        self.encoder = Encoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values: (b, 3, image_size, image_size), CLIP-normalised (see `preprocess`). Returns (b, 1280)."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, s, s):
            raise MinisdError(f"pixel_values must be (b, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.visual_projection.weight.dtype)))
        last_hidden_state = self.encoder(x)[-1]
        pooled = self.post_layernorm(last_hidden_state[:, 0])  # the class token summarises the image
        return self.visual_projection(pooled)

    def preprocess(self, pil: Image.Image) -> Tensor:
        """A PIL image -> (1, 3, 224, 224) float32 pixel_values, as transformers' CLIPImageProcessor makes them:
        RGB, the short side resized to 224 (PIL bicubic), centre-cropped, (x / 255 − mean) / std."""
        if not isinstance(pil, Image.Image):
            raise MinisdError(f"image must be a PIL image, got {type(pil).__name__}")
        s = self.config.image_size
        w, h = pil.size
        short = min(w, h)
        new_w, new_h = (s, int(s * h / w)) if w == short else (int(s * w / h), s)  # transformers' rounding: floor
        pil = pil.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - s) // 2, (new_h - s) // 2
        pil = pil.crop((left, top, left + s, top + s))
        pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
        x = rearrange(pixels, "(b h w c) -> b c h w", b=1, h=s, w=s, c=3).float() / 255
        mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
        return ((x - mean) / std).contiguous()
