"""The SD denoiser: a UNet that predicts the noise ε in the latents, steered by the timestep and the prompt.

    ε_θ(x_t, t, c)      (Rombach et al. 2022, arXiv:2112.10752, §3.3 and appendix; Ho et al. 2020, arXiv:2006.11239)

    latents (b, 4, h, w) → conv_in                                          (pushes a skip)
    down_blocks.0-2: [ResNet → SpatialTransformer] × 2 → Downsample         (each arrow's output pushes a skip)
    down_blocks.3:   [ResNet] × 2                                           (at h/8 × w/8; pushes 2 skips)
    mid_block:       ResNet → SpatialTransformer → ResNet
    up_blocks.0:     [concat popped skip → ResNet] × 3 → Upsample
    up_blocks.1-3:   [concat popped skip → ResNet → SpatialTransformer] × 3 → Upsample (none after up_blocks.3)
    conv_norm_out → SiLU → conv_out → eps (b, 4, h, w)

Every ResNet also adds the timestep embedding; every SpatialTransformer lets the pixels look at each other
(self-attention) and at the prompt's 77 token embeddings `context` (cross-attention). Module paths equal
diffusers' `UNet2DConditionModel`, so its state dict loads unchanged.

SD 2.x is this network with four differences, each a UNetConfig field (Stability-AI/stablediffusion
v2-inference.yaml: num_head_channels 64, use_linear_in_transformer, context_dim 1024):
  - attention_head_dim (5, 10, 20, 20): a head count per level, so every head is hd = 64 wide (SD v1: 8 heads
    everywhere, 40 / 80 / 160 wide);
  - use_linear_projection: proj_in / proj_out of each SpatialTransformer are Linear layers on the tokens
    instead of 1×1 convs on the feature map (the same map, other weight shapes);
  - cross_attention_dim 1024: OpenCLIP ViT-H's token width;
  - upcast_attention: attention computed in float32 inside float16 / bfloat16 runs (SD 2.1 overflows otherwise).
And what it predicts: ε for the 512 models, v for the 768 ones (a sampler setting, minisd/samplers/base.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd.attention import attention, attention_in_float32
from minisd.errors import MinisdError


@dataclass
class UNetConfig:
    """SD v1's sizes; field names are diffusers' config.json keys. `in_channels=9` is the inpainting UNet
    (4 noisy latents + 4 masked-image latents + 1 mask). SD 2.x: see the module docstring."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # Misnamed in SD's diffusers configs: this is the NUMBER of heads, one for all levels (SD v1: 8, so hd =
    # channels // 8 = 40, 80, 160) or one per level (SD 2: (5, 10, 20, 20), hd = 64); diffusers reads it as
    # `num_attention_heads` when that key is absent.
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # width d of the text embeddings in `context`: 768 CLIP (SD v1), 1024 OpenCLIP
    norm_num_groups: int = 32
    use_linear_projection: bool = False  # SD 2: Linear proj_in / proj_out on the tokens, not 1×1 convs
    upcast_attention: bool = False  # SD 2.1: attention in float32 when the UNet runs in float16 / bfloat16

    def heads(self) -> tuple[int, ...]:
        """The head count of each level, down_blocks.0 first (the mid block uses the last level's).

        >>> UNetConfig().heads(), UNetConfig(attention_head_dim=(5, 10, 20, 20)).heads()
        ((8, 8, 8, 8), (5, 10, 20, 20))
        """
        levels = len(self.block_out_channels)
        if isinstance(self.attention_head_dim, int):
            return (self.attention_head_dim,) * levels
        if len(self.attention_head_dim) != levels:
            raise MinisdError(
                f"attention_head_dim must be one head count or one per level ({levels}), got {self.attention_head_dim}"
            )
        return tuple(self.attention_head_dim)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the timesteps, [cos(t·f_i), sin(t·f_i)] with f_i = 10000^(−i / (dim/2)).

    t: (b,) timesteps, integer or fractional. Returns (b, dim) float32. Transformer position encoding
    (Vaswani et al. 2017, §3.5) applied to t as in DDPM; cos first (diffusers flip_sin_to_cos=True) and
    downscale_freq_shift=0, as SD v1.

    >>> timestep_embedding(torch.tensor([0, 1]), 4)
    tensor([[1.0000, 1.0000, 0.0000, 0.0000],
            [0.5403, 0.9999, 0.8415, 0.0100]])
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (b, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoidal features into the embedding every ResNet reads: (b, c0) -> (b, 4·c0)."""

    def __init__(self, in_dim: int, emb_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Two 3×3 convs with the timestep added in between, plus a residual (He et al. 2016; DDPM's Wide ResNet).

    x: (b, c_in, h, w); emb: (b, emb_dim). Returns (b, c_out, h, w).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-5)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1×1 conv matches the residual's channels when they change (no parameters, no key, when they don't).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # one shift per channel: "which step is this"
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in SD v1: omitted)
        return self.conv_shortcut(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x to tokens `context` (to x itself when context is None).

    x: (b, s, d); context: (b, s_kv, d_ctx) or None; mask: None or bool (b, 1, s, s_kv), True = may attend.
    Returns (b, s, d). bias: q, k, v projections with biases (Kandinsky's prior; SD has none). upcast: compute the
    attention itself in float32 when x is float16 / bfloat16 (SD 2.1's upcast_attention).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, bias: bool = False, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        # Index 0: diffusers' to_out is [Linear, Dropout]; the Dropout (p=0) is left out, the index stays.
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b s (nh hd) -> b nh s hd", nh=self.heads)
        k = rearrange(self.to_k(context), "b s (nh hd) -> b nh s hd", nh=self.heads)
        v = rearrange(self.to_v(context), "b s (nh hd) -> b nh s hd", nh=self.heads)
        out = attention_in_float32(q, k, v, mask=mask) if self.upcast else attention(q, k, v, mask=mask)
        return self.to_out(rearrange(out, "b nh s hd -> b s (nh hd)"))


class GEGLU(nn.Module):
    """A GELU-gated linear unit (Shazeer 2020, arXiv:2002.05202): x·W ⊙ GELU(x·V), W and V in one Linear."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's per-token MLP: d -> 4d (GEGLU) -> d."""

    def __init__(self, dim: int):
        super().__init__()
        # net.1 was the original's Dropout (p=0 in SD v1), kept as a parameter-free slot so the output Linear
        # keeps the key `ff.net.2` of the CompVis and diffusers checkpoints.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with a cross-attention layer. x: (b, s, d); context: (b, 77, d_ctx)."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, context_dim=dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # self-attention: pixels look at each other
        x = x + self.attn2(self.norm2(x), context)  # cross-attention: pixels query the prompt
        x = x + self.ff(self.norm3(x))  # GEGLU feed-forward
        return x


class SpatialTransformer(nn.Module):
    """A transformer over the pixels of a feature map (diffusers' Transformer2DModel).

    x: (b, c, h, w); context: (b, 77, d_ctx). Returns (b, c, h, w).
    """

    def __init__(self, channels: int, heads: int, cfg: "UNetConfig"):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        # proj_in / proj_out: 1×1 convs on the feature map in SD v1; Linear layers on the tokens in SD 2
        # (use_linear_projection). Per pixel the same map c -> c; the weights are [c, c, 1, 1] or [c, c].
        self.linear_projection = cfg.use_linear_projection
        self.proj_in = nn.Linear(channels, channels) if self.linear_projection else nn.Conv2d(channels, channels, 1)
        block = TransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.upcast_attention)
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = nn.Linear(channels, channels) if self.linear_projection else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)  # SD v1: 1×1 conv on the map
        x = rearrange(x, "b c h w -> b (h w) c")  # every latent pixel becomes a token
        if self.linear_projection:
            x = self.proj_in(x)  # SD 2: Linear on the tokens
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear_projection:
            x = self.proj_out(x)
        else:  # the rearranged view is channels-last in memory; the convs that follow want the usual layout
            x = x.contiguous()
        return x + residual


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3×3 conv (padding 1 on every side: diffusers downsample_padding=1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour 2× then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x: (b, c, h, w) -> (b, c, *size). `size` is the next skip's (h, w): 2h × 2w, or one less where the
        stride-2 conv on the way down rounded an odd size up (latents not a multiple of 8: diffusers'
        `forward_upsample_size`)."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One level of the encoder: ResNets (each followed by a SpatialTransformer where `with_attention`), then a
    Downsample where `with_downsample`. Returns the output and the skips it pushes: one per ResNet, one after
    the Downsample. diffusers: CrossAttnDownBlock2D, or DownBlock2D without attention."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        cfg: UNetConfig,
        emb_dim: int,
        heads: int,
        with_attention: bool,
        with_downsample: bool,
    ):
        super().__init__()
        groups = cfg.norm_num_groups
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, emb_dim, groups) for i in range(n)]
        )
        n_attn = n if with_attention else 0  # an empty list has no keys, as DownBlock2D has no `attentions`
        self.attentions = nn.ModuleList([SpatialTransformer(out_ch, heads, cfg) for _ in range(n_attn)])
        # `downsamplers.0`: diffusers keeps a list of (at most) one.
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if with_downsample else [])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottom of the U: ResNet -> SpatialTransformer -> ResNet (diffusers: UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, emb_dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, cfg.heads()[-1], cfg)])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One level of the decoder: per skip, concatenate it on the channels and run a ResNet (and a
    SpatialTransformer where `with_attention`); then an Upsample where `with_upsample`.
    diffusers: CrossAttnUpBlock2D, or UpBlock2D without attention."""

    def __init__(
        self,
        in_channels: list[int],
        out_ch: int,
        cfg: UNetConfig,
        emb_dim: int,
        heads: int,
        with_attention: bool,
        with_upsample: bool,
    ):
        super().__init__()
        groups = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, emb_dim, groups) for c in in_channels])
        n_attn = len(in_channels) if with_attention else 0
        self.attentions = nn.ModuleList([SpatialTransformer(out_ch, heads, cfg) for _ in range(n_attn)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if with_upsample else [])

    def forward(
        self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor, upsample_size: tuple[int, int] | None
    ) -> Tensor:
        """upsample_size: the (h, w) of the skip the next level will eat; None at the last level."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            x = torch.cat([x, skip], dim=1)  # (b, c + c_skip, h, w): the U's horizontal arrow
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsample in self.upsamplers:
            x = upsample(x, upsample_size)
        return x


class UNet(nn.Module):
    """ε_θ(x_t, t, c): SD's noise-prediction UNet (diffusers' UNet2DConditionModel with SD v1's or SD 2's config).

    Cross-attention at every level but the deepest; 8 heads everywhere (SD 2: 64-wide heads); one transformer
    block per attention. (A v-prediction model has the same network; only what its output means differs.)
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        channels = cfg.block_out_channels
        heads = cfg.heads()  # one head count per level
        levels = len(channels)
        emb_dim = 4 * channels[0]  # 1280 for SD v1
        self.time_embedding = TimestepEmbedding(channels[0], emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)

        # The down path pushes one skip per ResNet and per Downsample; record their widths to size the up path.
        skip_channels = [channels[0]]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(channels):
            deepest = i == levels - 1
            in_ch = channels[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(in_ch, out_ch, cfg, emb_dim, heads[i], not deepest, not deepest))
            skip_channels += [out_ch] * (cfg.layers_per_block + (0 if deepest else 1))

        self.mid_block = MidBlock(channels[-1], cfg, emb_dim)

        # The up path mirrors it: each ResNet eats x plus the skip popped from the top of the stack.
        self.up_blocks = nn.ModuleList()
        x_ch = channels[-1]
        for i, out_ch in enumerate(reversed(channels)):
            in_channels = []
            for _ in range(cfg.layers_per_block + 1):
                in_channels.append(x_ch + skip_channels.pop())
                x_ch = out_ch
            deepest, shallowest = i == 0, i == levels - 1
            level_heads = heads[levels - 1 - i]  # the up path mirrors the down path
            self.up_blocks.append(UpBlock(in_channels, out_ch, cfg, emb_dim, level_heads, not deepest, not shallowest))
        assert not skip_channels, "every skip must be consumed"

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, latents: Tensor, t: Tensor | float, context: Tensor) -> Tensor:
        """Predict the noise in `latents`.

        latents: (b, in_channels, h, w), any h, w >= 1 (pixels / 8); t: a number or a 0-d or (b,) tensor of
        timesteps in [0, 999] (fractional allowed); context: (b, s, cross_attention_dim) prompt embeddings
        (s = 77 for one CLIP window). Returns eps: (b, out_channels, h, w).
        """
        t = self._check_inputs(latents, t, context)
        b = latents.shape[0]
        t = t.to(latents.device).expand(b)  # one timestep per sample
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(latents.dtype))

        x = self.conv_in(latents)
        skips = [x]  # the U's skip connections, pushed on the way down...
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips

        x = self.mid_block(x, emb, context)

        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]  # ...and popped on the way up: last in, first out
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None  # where the next level's skip is
            x = block(x, block_skips, emb, context, upsample_size)

        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _check_inputs(self, latents: Tensor, t: Tensor | float, context: Tensor) -> Tensor:
        """Raise MinisdError on bad shapes; return t as a tensor."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise MinisdError(f"latents must be (b, {cfg.in_channels}, h, w), got {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        if h == 0 or w == 0:
            raise MinisdError(f"latents height and width must be positive, got {h}x{w}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.cross_attention_dim:
            raise MinisdError(
                f"context must be ({b}, s, {cfg.cross_attention_dim}) to match latents, got {tuple(context.shape)}"
            )
        t = torch.as_tensor(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise MinisdError(f"t must be a number or a ({b},) tensor of timesteps, got shape {tuple(t.shape)}")
        return t
