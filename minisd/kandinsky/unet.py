"""Kandinsky 2.2's decoder: a UNet that predicts the noise in MoVQ latents, steered by a CLIP image embedding.

    ε_θ(x_t, t, image_embeds)          (Razzhigaev et al. 2023, arXiv:2310.03502; the unCLIP decoder of Ramesh et al.
                                        2022, arXiv:2204.06125, §2.1, built on Nichol & Dhariwal's improved DDPM UNet)

    image_embeds (b, 1280) ──encoder_hid_proj──▶ context (b, 32, 768): the embedding as 32 tokens
                           ──add_embedding────▶ added to the timestep embedding every ResNet reads
    latents (b, 4, h, w) → conv_in                                           (pushes a skip)
    down_blocks.0:   [ResNet] × 3 → ResNet↓                                  (each output pushes a skip)
    down_blocks.1-2: [ResNet → attention] × 3 → ResNet↓
    down_blocks.3:   [ResNet → attention] × 3                                (at h/8 × w/8)
    mid_block:       ResNet → attention → ResNet
    up_blocks.0-2:   [concat popped skip → ResNet → attention] × 4 → ResNet↑
    up_blocks.3:     [concat popped skip → ResNet] × 4
    conv_norm_out → SiLU → conv_out → (b, 8, h, w) = [ε (4) | learned variance (4)]

minisd/unet.py is SD v1's UNet; this one reuses its timestep features, timestep MLP and ResNet, and names what differs:
  - ScaleShiftResnetBlock: the timestep embedding scales and shifts the normalised features (AdaGN, Dhariwal &
    Nichol 2021, arXiv:2105.05233, §3.1: GroupNorm(h)·(1 + y_s) + y_b) instead of being added, and the resampling
    ResNets ↓/↑ halve/double h and w inside the block (average pool / nearest) instead of a separate conv;
  - ImageAttention (diffusers "SimpleCrossAttn", AttnAddedKVProcessor): ONE attention per layer in which the pixels
    attend to the 32 image tokens and to each other together (keys = [image tokens; pixels]), where SD v1 has a
    transformer block with self- then cross-attention and a feed-forward;
  - image conditioning (encoder_hid_proj, add_embedding) in place of a text encoder's context;
  - the output has twice the channels: ε and the interpolation v of the learned variance (Nichol & Dhariwal 2021,
    arXiv:2102.09672, eq. 15); Kandinsky's sampler (DDPM, fixed_small) uses ε only.
Module paths equal diffusers' `UNet2DConditionModel` with Kandinsky 2.2's unet/config.json.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd import unet as sd_unet
from minisd.attention import attention
from minisd.errors import MinisdError

IMAGE_TOKENS = 32  # diffusers ImageProjection's num_image_text_embeds: the image embedding becomes 32 tokens


@dataclass
class DecoderUNetConfig:
    """Kandinsky 2.2 decoder's sizes; field names are diffusers' unet/config.json keys. in_channels=9 is the
    inpainting decoder (4 noisy latents + 4 masked-image latents + 1 mask).

    Hard-coded, as Kandinsky 2.2 has them: down_block_types [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D, …],
    mid_block_type UNetMidBlock2DSimpleCrossAttn, resnet_time_scale_shift "scale_shift", norm_eps 1e-5,
    encoder_hid_dim_type "image_proj", addition_embed_type "image", flip_sin_to_cos True, freq_shift 0.
    """

    in_channels: int = 4
    out_channels: int = 8  # ε and the learned variance
    block_out_channels: tuple[int, ...] = (384, 768, 1152, 1536)
    layers_per_block: int = 3
    attention_head_dim: int = 64  # the head WIDTH hd here (heads = channels / 64: 12, 18, 24), unlike SD v1's key
    cross_attention_dim: int = 768  # width of the image tokens
    encoder_hid_dim: int = 1280  # width of the CLIP image embedding (ViT-bigG's projection)
    norm_num_groups: int = 32

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this: each ResNet↓ halves them exactly."""
        return 2 ** (len(self.block_out_channels) - 1)


class ScaleShiftResnetBlock(sd_unet.ResnetBlock):
    """sd_unet.ResnetBlock where the timestep scales and shifts (AdaGN) and which may resample (diffusers
    ResnetBlock2D with time_embedding_norm="scale_shift", up=/down=).

    x: (b, c_in, h, w); emb: (b, emb_dim). Returns (b, c_out, h, w), or h/2 × w/2 ("down"), 2h × 2w ("up").
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, resample: str | None = None):
        super().__init__(in_channels, out_channels, emb_dim, groups)
        self.time_emb_proj = nn.Linear(emb_dim, 2 * out_channels)  # a scale and a shift per channel
        self.resample = resample  # None, "down" (2×2 average pool) or "up" (nearest 2×): no parameters either way

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # diffusers Downsample2D(use_conv=False)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")  # diffusers Upsample2D(use_conv=False)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)  # the skip path is resampled too
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # AdaGN: "which step is this" as a gain and a bias
        h = self.conv2(F.silu(h))
        return self.conv_shortcut(x) + h


class ImageAttention(nn.Module):
    """Pixels attend to the image tokens and to each other in one softmax (diffusers Attention with
    added_kv_proj_dim; its SimpleCrossAttn blocks).

        q = to_q(x)      k = [add_k_proj(context); to_k(x)]      v = [add_v_proj(context); to_v(x)]

    x: (b, c, h, w); context: (b, 32, d_ctx). Returns x + attention, (b, c, h, w).
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int):
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)  # the image tokens' keys and values
        self.add_v_proj = nn.Linear(context_dim, channels)
        # Index 0: diffusers' to_out is [Linear, Dropout]; the Dropout (p=0) is left out, the index stays.
        self.to_out = nn.Sequential(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        residual = x
        x = self.group_norm(rearrange(x, "b c h w -> b c (h w)"))
        x = rearrange(x, "b c s -> b s c")  # every pixel a token

        def heads(t: Tensor) -> Tensor:
            return rearrange(t, "b s (nh hd) -> b nh s hd", nh=self.heads)

        q = heads(self.to_q(x))
        k = torch.cat([heads(self.add_k_proj(context)), heads(self.to_k(x))], dim=2)  # (b, nh, 32 + h·w, hd)
        v = torch.cat([heads(self.add_v_proj(context)), heads(self.to_v(x))], dim=2)
        out = rearrange(attention(q, k, v), "b nh s hd -> b s (nh hd)")
        out = rearrange(self.to_out(out), "b (h w) c -> b c h w", h=h, w=w)
        return out + residual


class DownBlock(nn.Module):
    """One encoder level: ResNets (each followed by an ImageAttention where `with_attention`), then a ResNet↓ where
    `with_downsample`. Returns the output and its skips. diffusers: ResnetDownsampleBlock2D (no attention) or
    SimpleCrossAttnDownBlock2D."""

    def __init__(
        self, in_ch: int, out_ch: int, cfg: DecoderUNetConfig, emb_dim: int, with_attention: bool, with_downsample
    ):
        super().__init__()
        groups, n = cfg.norm_num_groups, cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ScaleShiftResnetBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim, groups) for i in range(n)]
        )
        n_attn = n if with_attention else 0  # an empty list has no keys
        self.attentions = nn.ModuleList(
            [ImageAttention(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, groups) for _ in range(n_attn)]
        )
        down = [ScaleShiftResnetBlock(out_ch, out_ch, emb_dim, groups, resample="down")] if with_downsample else []
        self.downsamplers = nn.ModuleList(down)  # `downsamplers.0`: diffusers keeps a list of (at most) one

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x, emb)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResNet → ImageAttention → ResNet at the bottom of the U (diffusers UNetMidBlock2DSimpleCrossAttn)."""

    def __init__(self, channels: int, cfg: DecoderUNetConfig, emb_dim: int):
        super().__init__()
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ScaleShiftResnetBlock(channels, channels, emb_dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [ImageAttention(channels, cfg.attention_head_dim, cfg.cross_attention_dim, groups)]
        )

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One decoder level: per skip, concatenate it and run a ResNet (and an ImageAttention where `with_attention`);
    then a ResNet↑ where `with_upsample`. diffusers: SimpleCrossAttnUpBlock2D or ResnetUpsampleBlock2D."""

    def __init__(
        self, in_channels: list[int], out_ch: int, cfg: DecoderUNetConfig, emb_dim: int, with_attention, with_upsample
    ):
        super().__init__()
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ScaleShiftResnetBlock(c, out_ch, emb_dim, groups) for c in in_channels])
        n_attn = len(in_channels) if with_attention else 0
        self.attentions = nn.ModuleList(
            [ImageAttention(out_ch, cfg.attention_head_dim, cfg.cross_attention_dim, groups) for _ in range(n_attn)]
        )
        up = [ScaleShiftResnetBlock(out_ch, out_ch, emb_dim, groups, resample="up")] if with_upsample else []
        self.upsamplers = nn.ModuleList(up)

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor) -> Tensor:
        for i, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            x = torch.cat([x, skip], dim=1)  # (b, c + c_skip, h, w): the U's horizontal arrow
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsample in self.upsamplers:
            x = upsample(x, emb)
        return x


class ImageProjection(nn.Module):
    """The image embedding as IMAGE_TOKENS tokens for the attention: one Linear to 32·d_ctx, split, LayerNorm.
    (b, d_img) -> (b, 32, d_ctx). diffusers ImageProjection."""

    def __init__(self, image_dim: int, context_dim: int):
        super().__init__()
        self.image_embeds = nn.Linear(image_dim, IMAGE_TOKENS * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        tokens = rearrange(self.image_embeds(image_embeds), "b (s d) -> b s d", s=IMAGE_TOKENS)
        return self.norm(tokens)


class ImageTimeEmbedding(nn.Module):
    """The image embedding in the timestep embedding's space: Linear, LayerNorm. (b, d_img) -> (b, emb_dim).
    diffusers ImageTimeEmbedding (addition_embed_type "image")."""

    def __init__(self, image_dim: int, emb_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, emb_dim)
        self.image_norm = nn.LayerNorm(emb_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        return self.image_norm(self.image_proj(image_embeds))


class DecoderUNet(nn.Module):
    """ε_θ(x_t, t, image_embeds) and the learned variance: Kandinsky 2.2's decoder UNet (see the module docstring)."""

    def __init__(self, config: DecoderUNetConfig):
        super().__init__()
        cfg = self.config = config
        channels = cfg.block_out_channels
        levels = len(channels)
        emb_dim = 4 * channels[0]  # 1536
        self.time_embedding = sd_unet.TimestepEmbedding(channels[0], emb_dim)
        self.add_embedding = ImageTimeEmbedding(cfg.encoder_hid_dim, emb_dim)
        self.encoder_hid_proj = ImageProjection(cfg.encoder_hid_dim, cfg.cross_attention_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)

        skip_channels = [channels[0]]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(channels):
            first, deepest = i == 0, i == levels - 1
            in_ch = channels[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(in_ch, out_ch, cfg, emb_dim, not first, not deepest))
            skip_channels += [out_ch] * (cfg.layers_per_block + (0 if deepest else 1))

        self.mid_block = MidBlock(channels[-1], cfg, emb_dim)

        self.up_blocks = nn.ModuleList()
        x_ch = channels[-1]
        for i, out_ch in enumerate(reversed(channels)):
            in_channels = []
            for _ in range(cfg.layers_per_block + 1):
                in_channels.append(x_ch + skip_channels.pop())
                x_ch = out_ch
            shallowest = i == levels - 1
            self.up_blocks.append(UpBlock(in_channels, out_ch, cfg, emb_dim, not shallowest, not shallowest))
        assert not skip_channels, "every skip must be consumed"

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, latents: Tensor, t: Tensor | float, image_embeds: Tensor) -> Tensor:
        """latents: (b, in_channels, h, w), h and w multiples of config.size_multiple; t: a number or a 0-d or (b,)
        tensor of timesteps in [0, 999]; image_embeds: (b, encoder_hid_dim). Returns (b, out_channels, h, w):
        channels [:4] are ε, [4:] the learned variance."""
        t = self._check_inputs(latents, t, image_embeds)
        b = latents.shape[0]
        t = t.to(latents.device).expand(b)
        dtype = self.conv_in.weight.dtype
        image_embeds = image_embeds.to(dtype)
        emb = self.time_embedding(sd_unet.timestep_embedding(t, self.config.block_out_channels[0]).to(dtype))
        emb = emb + self.add_embedding(image_embeds)  # the image joins the timestep in every ResNet
        context = self.encoder_hid_proj(image_embeds)  # (b, 32, d_ctx): and is the attention's extra tokens

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips

        x = self.mid_block(x, emb, context)

        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]  # last in, first out
            x = block(x, block_skips, emb, context)

        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _check_inputs(self, latents: Tensor, t: Tensor | float, image_embeds: Tensor) -> Tensor:
        """Raise MinisdError on bad shapes; return t as a tensor."""
        cfg, m = self.config, self.config.size_multiple
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise MinisdError(f"latents must be (b, {cfg.in_channels}, h, w), got {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        if h == 0 or w == 0 or h % m or w % m:
            raise MinisdError(f"latents height and width must be positive multiples of {m}, got {h}x{w}")
        if image_embeds.ndim != 2 or image_embeds.shape != (b, cfg.encoder_hid_dim):
            raise MinisdError(
                f"image_embeds must be ({b}, {cfg.encoder_hid_dim}) to match latents, got {tuple(image_embeds.shape)}"
            )
        t = torch.as_tensor(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise MinisdError(f"t must be a number or a ({b},) tensor of timesteps, got shape {tuple(t.shape)}")
        return t
