"""SD v1's KL autoencoder: images ⇄ latents, 8× smaller in each direction (Rombach et al. 2022, arXiv:2112.10752).

    image (b, 3, H, W) in [-1, 1]
      → encoder → quant_conv → moments (b, 8, H/8, W/8) = [mean, logvar]  → DiagonalGaussian posterior q(z | x)
      → vae_latents z = mean + std · ε (or z = mean)                      (b, 4, H/8, W/8)
      → post_quant_conv → decoder → image (b, 3, H, W)

The VAE works in unscaled `vae_latents`; the UNet works in `latents = LATENT_SCALE * vae_latents`, and the
pipelines do that multiplication (and the division before decoding), never this file.

Module paths equal diffusers' `AutoencoderKL` in-memory paths (`encoder.down_blocks.0.resnets.0.conv1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...), so its state dict loads with strict=True. The original
is CompVis `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock, Downsample,
Upsample) and `ldm/modules/distributions/distributions.py` (DiagonalGaussianDistribution); diffusers'
`models/autoencoders/vae.py` and `autoencoder_kl.py` hold the same network under the names used here.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd.attention import attention
from minisd.errors import MinisdError
from minisd.noise import randn

LATENT_SCALE = 0.18215
"""latents = LATENT_SCALE · vae_latents (v1-inference.yaml `scale_factor`; diffusers `scaling_factor`).

Chosen by LDM so the UNet's latents have roughly unit variance. The pipelines multiply after `encode` and divide
before `decode`; the VAE itself works in unscaled space."""

NORM_EPS = 1e-6  # every GroupNorm in the VAE (CompVis `Normalize`: eps=1e-6; diffusers `resnet_eps=1e-6`)


@dataclass
class VAEConfig:
    """Sizes of the autoencoder; defaults are SD v1's. Field names equal diffusers' AutoencoderKL config keys.

    SD v1's choices are hard-coded, not fields: act_fn="silu", every down block a DownEncoderBlock2D and every up
    block an UpDecoderBlock2D, mid_block_add_attention=True, use_quant_conv=use_post_quant_conv=True, GroupNorm
    everywhere (norm_type="group"). `scaling_factor` is LATENT_SCALE above.
    """

    in_channels: int = 3  # image channels in (RGB)
    out_channels: int = 3  # image channels out
    latent_channels: int = 4  # channels of vae_latents (v1-inference.yaml `embed_dim: 4`)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # channels per resolution level (ch · ch_mult)
    layers_per_block: int = 2  # ResNets per encoder level; the decoder has one more
    norm_num_groups: int = 32  # GroupNorm groups

    @property
    def downscale_factor(self) -> int:
        """How many image pixels one latent pixel covers along each side: 2 per downsampler, 8 for SD v1."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(std²)) the encoder predicts for each latent pixel (LDM appendix G).

    moments: (b, 2·latent_channels, h, w), the first half the mean, the second half log σ². logvar is clamped to
    [-30, 20] as in CompVis `DiagonalGaussianDistribution` (keeps exp() finite). mean, logvar, std: (b, c, h, w).
    """

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)  # σ = exp(½ log σ²)

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """z = mean + std · ε, the reparameterisation trick. Returns (b, c, h, w).

        ε is `noise` when given (the mean's shape, device and dtype: the pipelines draw it their way), else drawn
        from the caller's generator like diffusers' DiagonalGaussianDistribution.sample: minisd.noise.randn in the
        mean's dtype, so one seed gives the same sample.
        """
        if noise is None:
            noise = randn(self.mean.shape, generator, self.mean.dtype, self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely z: the mean. Returns (b, c, h, w)."""
        return self.mean


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, twice, plus a skip (1×1 conv where the channel count changes).

    No time embedding in the VAE (diffusers temb_channels=None) and no dropout (SD v1 trains with 0.0).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # CompVis `nin_shortcut`: only where the width changes, so the residual can be added.
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c_in, h, w). Returns (b, c_out, h, w)."""
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return residual + x


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of the lowest-resolution feature map, with a residual.

    One head whose width is the channel count (diffusers `attention_head_dim=block_out_channels[-1]`, so heads=1).
    CompVis `AttnBlock` wrote q/k/v as 1×1 convs; diffusers (and this file) as Linears on pixel tokens.
    """

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list for the key `to_out.0`: diffusers' Attention keeps [Linear, Dropout] here; SD v1's dropout is 0,
        # so only the Linear remains, at index 0.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c, h, w). Returns (b, c, h, w)."""
        h, w = x.shape[-2:]
        residual = x
        # Normalise over (b, c, h·w) like diffusers: the same statistics, and the same rounding in every layout.
        x = self.group_norm(rearrange(x, "b c h w -> b c (h w)"))
        x = rearrange(x, "b c s -> b 1 s c")  # every pixel a token; one head (nh=1, hd=c)
        x = attention(self.to_q(x), self.to_k(x), self.to_v(x))
        x = self.to_out[0](x)
        x = rearrange(x, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + residual  # x first: the sum keeps x's memory layout, as diffusers' does (bit-equal rounding)


class MidBlock(nn.Module):
    """ResNet → self-attention → ResNet at the lowest resolution (diffusers UNetMidBlock2D)."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, norm_num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, norm_num_groups)])

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c, h, w). Returns (b, c, h, w)."""
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Halve h and w: pad one zero row at the bottom and one column at the right, then a stride-2 conv3×3.

    The pad is asymmetric, (left 0, right 1, top 0, bottom 1), as in CompVis `Downsample` (diffusers
    Downsample2D with padding=0). Output pixel (i, j) then sees input pixels 2i..2i+2, 2j..2j+2, centred on
    (2i+1, 2j+1). A symmetric pad of 1 gives the same shapes but centres on (2i, 2j), shifting every feature by
    one input pixel per level — 8 image pixels at the latents — and no longer matches the trained weights.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c, h, w). Returns (b, c, ceil(h/2), ceil(w/2))."""
        x = F.pad(x, (0, 1, 0, 1))  # (w_left, w_right, h_top, h_bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour 2× (each pixel becomes a 2×2 square), then a conv3×3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c, h, w). Returns (b, c, 2h, 2w)."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class DownEncoderBlock(nn.Module):
    """One encoder level: ResNets at one resolution, then a downsampler (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
                for i in range(num_layers)
            ]
        )
        # A list for the key `downsamplers.0` (diffusers' layout); empty at the last level.
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c_in, h, w). Returns (b, c_out, h/2, w/2), or (b, c_out, h, w) at the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
        return x


class UpDecoderBlock(nn.Module):
    """One decoder level: ResNets at one resolution, then an upsampler (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
                for i in range(num_layers)
            ]
        )
        # A list for the key `upsamplers.0` (diffusers' layout); empty at the last level.
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, c_in, h, w). Returns (b, c_out, 2h, 2w), or (b, c_out, h, w) at the last level."""
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Encoder(nn.Module):
    """image (b, 3, H, W) → moments (b, 2·latent_channels, H/8, W/8) before quant_conv."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block,
                    groups,
                    downsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        # Mean and log-variance for each latent channel (diffusers double_z=True).
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        """image: (b, 3, H, W). Returns (b, 2·latent_channels, H/8, W/8)."""
        x = self.conv_in(image)
        for down_block in self.down_blocks:
            x = down_block(x)  # each level but the last halves h and w
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """vae_latents (b, latent_channels, h, w) after post_quant_conv → image (b, 3, 8h, 8w)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))  # widest first: (512, 512, 256, 128)
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block + 1,
                    groups,
                    upsample=i < len(channels) - 1,
                )
                for i in range(len(channels))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z: (b, latent_channels, h, w). Returns (b, 3, 8h, 8w)."""
        x = self.conv_in(z)
        x = self.mid_block(x)
        for up_block in self.up_blocks:
            x = up_block(x)  # each level but the last doubles h and w
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """SD v1's AutoencoderKL: `encode(image) -> DiagonalGaussian`, `decode(vae_latents) -> image`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1×1 convs between the networks and the latent space (LDM's `quant_conv` / `post_quant_conv`, left over
        # from the VQ variant; diffusers use_quant_conv=use_post_quant_conv=True).
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, kernel_size=1)

    def encode(self, image: Tensor) -> DiagonalGaussian:
        """image: (b, 3, H, W) in [-1, 1], H and W multiples of 8. Returns q(z | x) over (b, 4, H/8, W/8)."""
        c, f = self.config.in_channels, self.config.downscale_factor
        if image.ndim != 4 or image.shape[1] != c:
            raise MinisdError(f"image must have shape (b, {c}, H, W), got {tuple(image.shape)}")
        if image.shape[2] % f or image.shape[3] % f:
            raise MinisdError(f"image height and width must be multiples of {f}, got {tuple(image.shape[2:])}")
        moments = self.quant_conv(self.encoder(image))  # (b, 8, H/8, W/8)
        return DiagonalGaussian(moments)

    def decode(self, vae_latents: Tensor) -> Tensor:
        """vae_latents: (b, 4, h, w), unscaled (divide UNet latents by LATENT_SCALE first). Returns (b, 3, 8h, 8w),
        roughly in [-1, 1] (not clamped)."""
        c = self.config.latent_channels
        if vae_latents.ndim != 4 or vae_latents.shape[1] != c:
            raise MinisdError(f"vae_latents must have shape (b, {c}, h, w), got {tuple(vae_latents.shape)}")
        return self.decoder(self.post_quant_conv(vae_latents))
