"""Kandinsky 2.2's prior: a transformer that denoises a CLIP image embedding, given the prompt's CLIP text encoding.

    The unCLIP "diffusion prior" (Ramesh et al. 2022, arXiv:2204.06125, §2.2): "a decoder-only Transformer with a
    causal attention mask on a sequence consisting of, in order: the encoded text, the CLIP text embedding, an
    embedding for the diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from
    the Transformer is used to predict the unnoised CLIP image embedding."

    tokens (b, 81, 2048) = [encoder_hidden_states_proj(text states)   77 tokens: the prompt, token by token
                            embedding_proj(text_embeds)                1: CLIP's text embedding
                            time_embedding(t)                          1: which noise level
                            proj_in(x_t)                               1: the noisy image embedding
                            prd_embedding]                             1: a learned query ("predict here")
                           + positional_embedding
    20 × [x = x + attn1(norm1(x), causal and not at padding);  x = x + ff(norm3(x))]     (GELU feed-forward)
    proj_to_clip_embeddings(norm_out(x)[:, -1]) ──▶ x0_pred (b, 1280), normalised; × clip_std + clip_mean at the end

The network predicts the clean embedding x_0 itself ("sample" prediction), in units of the training data's
per-dimension statistics (clip_mean, clip_std). Its blocks are minisd.unet's attention and feed-forward with the
differences named there (attention biases, a padding mask; plain GELU instead of GEGLU). Module paths equal diffusers'
`PriorTransformer` with Kandinsky 2.2's prior/config.json.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minisd import unet as sd_unet
from minisd.errors import MinisdError


@dataclass
class PriorConfig:
    """Kandinsky 2.2's prior/config.json (diffusers PriorTransformer keys). Hard-coded as published: added_emb_type
    "prd", encoder_hid_proj_type "linear", time_embed_act_fn "silu", norm_in_type None, no embedding_proj_norm."""

    num_attention_heads: int = 32
    attention_head_dim: int = 64  # inner width d = 32 · 64 = 2048
    num_layers: int = 20
    embedding_dim: int = 1280  # CLIP ViT-bigG's embedding width (text and image)
    num_embeddings: int = 77  # text tokens
    additional_embeddings: int = 4  # text embedding, timestep, noisy image embedding, prd token

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class GELUProjection(nn.Module):
    """Linear then GELU (diffusers' GELU module, whose Linear is `proj`). (…, d_in) -> (…, d_out)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class GELUFeedForward(sd_unet.FeedForward):
    """sd_unet.FeedForward with a plain GELU where SD v1 has GEGLU (diffusers activation_fn="gelu"): d -> 4d -> d."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.net[0] = GELUProjection(dim, 4 * dim)  # keys ff.net.0.proj, ff.net.2 as before


class PriorBlock(nn.Module):
    """Pre-norm transformer block: masked self-attention, feed-forward (diffusers BasicTransformerBlock without its
    cross-attention: the `norm2`/`attn2` slot is empty, so the feed-forward's norm keeps the name `norm3`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = sd_unet.CrossAttention(dim, heads, context_dim=dim, bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GELUFeedForward(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (b, s, d); mask: bool (b, 1, s, s), True = may attend. Returns (b, s, d)."""
        x = x + self.attn1(self.norm1(x), mask=mask)  # each token looks at the tokens before it
        x = x + self.ff(self.norm3(x))
        return x


class Prior(nn.Module):
    """x0_pred(x_t, t, text): Kandinsky 2.2's PriorTransformer (see the module docstring)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        d, d_emb = config.inner_dim, config.embedding_dim
        self.time_embedding = sd_unet.TimestepEmbedding(d, d)
        self.proj_in = nn.Linear(d_emb, d)
        self.embedding_proj = nn.Linear(d_emb, d)
        self.encoder_hidden_states_proj = nn.Linear(d_emb, d)
        self.positional_embedding = nn.Parameter(
            torch.zeros(1, config.num_embeddings + config.additional_embeddings, d)
        )
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.transformer_blocks = nn.ModuleList(
            [PriorBlock(d, config.num_attention_heads) for _ in range(config.num_layers)]
        )
        self.norm_out = nn.LayerNorm(d)
        self.proj_to_clip_embeddings = nn.Linear(d, d_emb)
        # The CLIP image embeddings' per-dimension mean and std over the training data: the network works in
        # standardised units, post_process maps back (diffusers stores them as parameters, (1, d_emb)).
        self.clip_mean = nn.Parameter(torch.zeros(1, d_emb))
        self.clip_std = nn.Parameter(torch.zeros(1, d_emb))

    def forward(
        self, x: Tensor, t: Tensor | float, text_embeds: Tensor, text_states: Tensor, text_mask: Tensor
    ) -> Tensor:
        """x: (b, d_emb) the noisy (standardised) image embedding x_t; t: a number or (b,) timesteps;
        text_embeds: (b, d_emb) CLIP's text embedding; text_states: (b, 77, d_emb) the text encoder's last hidden
        state; text_mask: (b, 77) bool, True at the prompt's real tokens (start, words, end), False at padding.
        Returns x0_pred (b, d_emb), standardised."""
        b = self._check_inputs(x, text_embeds, text_states, text_mask)
        dtype = self.proj_in.weight.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        time = self.time_embedding(sd_unet.timestep_embedding(t, self.config.inner_dim).to(dtype))
        tokens = torch.cat(
            [
                self.encoder_hidden_states_proj(text_states.to(dtype)),  # (b, 77, d)
                self.embedding_proj(text_embeds.to(dtype))[:, None],  # (b, 1, d)
                time[:, None],
                self.proj_in(x.to(dtype))[:, None],
                self.prd_embedding.to(dtype).expand(b, -1, -1),
            ],
            dim=1,
        )  # (b, 81, d)
        tokens = tokens + self.positional_embedding.to(dtype)

        s = tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()  # key j <= query i
        extra = torch.ones(b, s - text_mask.shape[1], dtype=torch.bool, device=x.device)
        keys = torch.cat([text_mask.to(device=x.device, dtype=torch.bool), extra], dim=1)  # no padding keys
        mask = (causal[None] & keys[:, None, :])[:, None]  # (b, 1, s, s)
        for block in self.transformer_blocks:
            tokens = block(tokens, mask)
        return self.proj_to_clip_embeddings(self.norm_out(tokens)[:, -1])  # the prd token's output

    def post_process(self, x0: Tensor) -> Tensor:
        """Standardised embedding -> CLIP image embedding: x0 · clip_std + clip_mean. (b, d_emb) -> (b, d_emb)."""
        return x0 * self.clip_std.to(x0.dtype) + self.clip_mean.to(x0.dtype)

    def _check_inputs(self, x: Tensor, text_embeds: Tensor, text_states: Tensor, text_mask: Tensor) -> int:
        cfg = self.config
        d, s = cfg.embedding_dim, cfg.num_embeddings
        if x.ndim != 2 or x.shape[1] != d:
            raise MinisdError(f"x must be (b, {d}), got {tuple(x.shape)}")
        b = x.shape[0]
        if tuple(text_embeds.shape) != (b, d):
            raise MinisdError(f"text_embeds must be ({b}, {d}), got {tuple(text_embeds.shape)}")
        if tuple(text_states.shape) != (b, s, d):
            raise MinisdError(f"text_states must be ({b}, {s}, {d}), got {tuple(text_states.shape)}")
        if tuple(text_mask.shape) != (b, s) or not bool(text_mask[:, 0].all()):
            raise MinisdError(f"text_mask must be ({b}, {s}), True at least at the start token, got {text_mask!r:.60}")
        return b
