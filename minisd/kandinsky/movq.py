"""MoVQ, Kandinsky 2.2's autoencoder: SD's VAE (minisd/vae.py) with a codebook and a decoder that reads it back.

    image (b, 3, H, W) in [-1, 1]
      → encoder → quant_conv → latents z (b, 4, H/8, W/8)            a point, not a distribution (no μ, σ)
      [→ quantize: each pixel's z replaced by its nearest code e_k]    the "VQ" (van den Oord et al. 2017)
      → post_quant_conv → decoder, every norm a SpatialNorm of z_q   → image (b, 3, H, W)

Zheng et al. 2022, "MoVQ: Modulating Quantized Vectors for High-Fidelity Image Generation", arXiv:2209.09002. Its
one idea, §3.2 eq. 4: the decoder's normalisation is modulated by the quantised latents themselves,

    SpatialNorm(f, z_q) = GroupNorm(f) · conv_y(z_q) + conv_b(z_q)        z_q resized (nearest) to f's h × w

so every decoder layer sees the latent code at its own position (SD's decoder sees it only through conv_in).

Differences from minisd.vae (each named where it is made):
  - encoder: self-attention after every ResNet of the last level (diffusers AttnDownEncoderBlock2D), and one
    latent tensor out, not (mean, log-variance) (double_z=False);
  - decoder: every GroupNorm → SpatialNorm(·, z_q), and self-attention after every ResNet of the first level;
  - a codebook `quantize.embedding` (16384 codes of width 4). Kandinsky's pipelines never use it: they decode
    the denoised latents as they are (diffusers `decode(..., force_not_quantize=True)`);
  - no latent scaling: Kandinsky's UNet works on the raw z (the config's scaling_factor 0.18215 is never applied).

Module paths equal diffusers' `VQModel` with Kandinsky 2.2's movq/config.json, so its state dict loads unchanged.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd import vae
from minisd.attention import attention
from minisd.errors import MinisdError

SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm hard-codes 32 groups (whatever norm_num_groups says), eps 1e-6


@dataclass
class MoVQConfig(vae.VAEConfig):
    """Kandinsky 2.2's movq/config.json (diffusers VQModel keys). The VAEConfig fields mean what they mean there."""

    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    num_vq_embeddings: int = 16384  # codebook size K
    vq_embed_dim: int = 4  # code width (= latent_channels for Kandinsky: quant_conv keeps the width)


class SpatialNorm(nn.Module):
    """MoVQ eq. 4: GroupNorm(f) · conv_y(z_q) + conv_b(z_q), a scale and a shift per pixel read off the code.

    f: (b, c, h, w) features; z_q: (b, c_z, h', w') latents, resized to h × w by nearest neighbour (each latent
    pixel covers a square of feature pixels). Returns (b, c, h, w).
    """

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(SPATIAL_NORM_GROUPS, channels, eps=vae.NORM_EPS)
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, f: Tensor, zq: Tensor) -> Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class SpatialNormResnetBlock(vae.ResnetBlock):
    """vae.ResnetBlock with both GroupNorms replaced by SpatialNorms of z_q (diffusers ResnetBlockCondNorm2D).

    x: (b, c_in, h, w); zq: (b, c_z, h', w'). Returns (b, c_out, h, w).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, zq_channels: int):
        super().__init__(in_channels, out_channels, norm_num_groups)
        self.norm1 = SpatialNorm(in_channels, zq_channels)  # the difference: the code modulates the norm
        self.norm2 = SpatialNorm(out_channels, zq_channels)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x, zq)))
        x = self.conv2(F.silu(self.norm2(x, zq)))
        return residual + x


class SpatialNormSelfAttention(vae.SelfAttention):
    """vae.SelfAttention whose input norm is a SpatialNorm of z_q instead of a GroupNorm (no `group_norm` key).

    x: (b, c, h, w); zq: (b, c_z, h', w'). Returns (b, c, h, w).
    """

    def __init__(self, channels: int, norm_num_groups: int, zq_channels: int):
        super().__init__(channels, norm_num_groups)
        del self.group_norm  # the difference: diffusers' Attention(spatial_norm_dim=...) has no group_norm
        self.spatial_norm = SpatialNorm(channels, zq_channels)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        residual = x
        x = rearrange(self.spatial_norm(x, zq), "b c h w -> b 1 (h w) c")  # every pixel a token; one head
        x = self.to_out[0](attention(self.to_q(x), self.to_k(x), self.to_v(x)))
        return rearrange(x, "b 1 (h w) c -> b c h w", h=h, w=w) + residual


class AttnDownEncoderBlock(vae.DownEncoderBlock):
    """vae.DownEncoderBlock with a self-attention after every ResNet (diffusers AttnDownEncoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, downsample: bool):
        super().__init__(in_channels, out_channels, num_layers, norm_num_groups, downsample)
        self.attentions = nn.ModuleList([vae.SelfAttention(out_channels, norm_num_groups) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            x = attn(resnet(x))
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class Encoder(vae.Encoder):
    """vae.Encoder with attention at the last level and one latent tensor out. image (b, 3, H, W) -> (b, 4, H/8,
    W/8) before quant_conv."""

    def __init__(self, config: MoVQConfig):
        super().__init__(config)
        channels, n = config.block_out_channels, len(config.block_out_channels)
        # difference 1: the last level attends (Kandinsky's down_block_types end with AttnDownEncoderBlock2D)
        self.down_blocks[-1] = AttnDownEncoderBlock(
            channels[max(n - 2, 0)], channels[-1], config.layers_per_block, config.norm_num_groups, downsample=False
        )
        # difference 2: a point z, not (mean, log-variance) (diffusers double_z=False)
        self.conv_out = nn.Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1)


class MidBlock(nn.Module):
    """ResNet → self-attention → ResNet, every norm a SpatialNorm (diffusers UNetMidBlock2D, spatial norm)."""

    def __init__(self, channels: int, norm_num_groups: int, zq_channels: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [SpatialNormResnetBlock(channels, channels, norm_num_groups, zq_channels) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([SpatialNormSelfAttention(channels, norm_num_groups, zq_channels)])

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        x = self.resnets[0](x, zq)
        x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)


class UpDecoderBlock(nn.Module):
    """One decoder level: SpatialNorm ResNets (each followed by a self-attention where `with_attention`: diffusers
    AttnUpDecoderBlock2D, else UpDecoderBlock2D), then an upsampler (none at the last level)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, config: MoVQConfig, with_attention: bool, upsample
    ):
        super().__init__()
        groups, zq_ch = config.norm_num_groups, config.vq_embed_dim
        self.resnets = nn.ModuleList(
            [
                SpatialNormResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, zq_ch)
                for i in range(num_layers)
            ]
        )
        n_attn = num_layers if with_attention else 0  # an empty list has no keys
        self.attentions = nn.ModuleList([SpatialNormSelfAttention(out_channels, groups, zq_ch) for _ in range(n_attn)])
        self.upsamplers = nn.ModuleList([vae.Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions:
                x = self.attentions[i](x, zq)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Decoder(nn.Module):
    """(b, 4, h, w) after post_quant_conv, with z_q (b, 4, h, w) before it -> image (b, 3, 8h, 8w)."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))  # widest first: (512, 256, 256, 128)
        n = len(channels)
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], config.norm_num_groups, config.vq_embed_dim)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock(
                    channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, config, i == 0, i < n - 1
                )  # the first (deepest) level attends: Kandinsky's up_block_types start with AttnUpDecoderBlock2D
                for i in range(n)
            ]
        )
        self.conv_norm_out = SpatialNorm(channels[-1], config.vq_embed_dim)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, zq: Tensor) -> Tensor:
        x = self.conv_in(x)
        x = self.mid_block(x, zq)
        for up_block in self.up_blocks:
            x = up_block(x, zq)  # each level but the last doubles h and w
        return self.conv_out(F.silu(self.conv_norm_out(x, zq)))


class VectorQuantizer(nn.Module):
    """The codebook: each latent pixel z is replaced by its nearest code, e_k with k = argmin_j ‖z − e_j‖²
    (van den Oord et al. 2017, arXiv:1711.00937, eq. 1-2). `embedding.weight`: (K, d) codes."""

    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)

    def codes(self, z: Tensor) -> Tensor:
        """z: (b, d, h, w) -> (b, h, w) int64 indices of the nearest codes."""
        h, w = z.shape[-2:]
        pixels = rearrange(z, "b d h w -> (b h w) d")
        distances = torch.cdist(pixels, self.embedding.weight)  # (b·h·w, K) Euclidean distances
        return rearrange(distances.argmin(dim=1), "(b h w) -> b h w", h=h, w=w)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes: (b, h, w) indices -> z_q: (b, d, h, w), the codes' vectors."""
        return rearrange(self.embedding(codes), "b h w d -> b d h w")

    def forward(self, z: Tensor) -> Tensor:
        """z: (b, d, h, w) -> z_q (b, d, h, w): every pixel snapped to its nearest code."""
        return self.lookup(self.codes(z))


class MoVQ(nn.Module):
    """Kandinsky 2.2's VQModel: `encode(image) -> latents`, `decode(latents) -> image`, `quantize` the codebook."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.vq_embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, config.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(config.vq_embed_dim, config.latent_channels, kernel_size=1)
        self.decoder = Decoder(config)

    def encode(self, image: Tensor) -> Tensor:
        """image: (b, 3, H, W) in [-1, 1], H and W multiples of 8. Returns latents (b, 4, H/8, W/8), not quantised
        (what Kandinsky's UNet denoises)."""
        c, f = self.config.in_channels, self.config.downscale_factor
        if image.ndim != 4 or image.shape[1] != c:
            raise MinisdError(f"image must have shape (b, {c}, H, W), got {tuple(image.shape)}")
        if image.shape[2] % f or image.shape[3] % f:
            raise MinisdError(f"image height and width must be multiples of {f}, got {tuple(image.shape[2:])}")
        return self.quant_conv(self.encoder(image))

    def decode(self, latents: Tensor, quantize: bool = False) -> Tensor:
        """latents: (b, 4, h, w) -> image (b, 3, 8h, 8w), roughly [-1, 1] (not clamped).

        quantize: snap the latents to the codebook first (diffusers' VQModel.decode default); Kandinsky's pipelines
        decode without (force_not_quantize=True): denoised latents are already close to codes, and exact codes would
        throw away what lies between them.
        """
        c = self.config.vq_embed_dim
        if latents.ndim != 4 or latents.shape[1] != c:
            raise MinisdError(f"latents must have shape (b, {c}, h, w), got {tuple(latents.shape)}")
        zq = self.quantize(latents) if quantize else latents
        return self.decoder(self.post_quant_conv(zq), zq)  # z_q also modulates every decoder norm (eq. 4)
