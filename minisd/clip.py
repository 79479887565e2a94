"""CLIP's text transformer, as Stable Diffusion uses it: token ids in, one vector per token out.

    input_ids (b, 77) ──token_embedding + position_embedding──▶ x (b, 77, 768)   = hidden_states[0]
    12 × pre-LN layer:  x = x + self_attn(layer_norm1(x))       causal: token i sees tokens 0..i
                        x = x + mlp(layer_norm2(x))             768 → 3072 → 768, quick-GELU   = hidden_states[n]
    final_layer_norm(x) ──▶ last_hidden_state (b, 77, 768): the UNet's cross-attention `context`

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", arXiv:2103.00020,
§2.4 (a GPT-2 style transformer, Radford et al. 2019); module paths equal transformers' `CLIPTextModel`, so its
state_dict loads with strict=True. SD passes no padding attention mask (diffusers' `use_attention_mask` is unset
for it): padding tokens are ordinary tokens that see the prompt before them.

Two config fields name what other models' CLIPs do differently (SD v1 uses neither):
  - hidden_act "gelu": the exact GELU of the OpenCLIP-trained towers (ViT-bigG of Kandinsky 2.2 and SDXL, ViT-H of
    SD 2), where OpenAI's CLIP used quick-GELU;
  - with_projection: CLIP's contrastive head (transformers' CLIPTextModelWithProjection): the end token's final
    hidden state, projected by `text_projection` to the joint text-image space: `text_embeds`, which Kandinsky's
    prior reads beside the per-token states.

SD 2.x uses OpenCLIP ViT-H/14's text tower: the same transformer with other numbers (width d = 1024, 16 heads, so
hd = 64 again, MLP 4096), hidden_act "gelu", and the penultimate layer: SD 2 reads the output of layer 23 of 24
(Stability-AI/stablediffusion `FrozenOpenCLIPEmbedder(layer="penultimate")`), through final_layer_norm. Built with
num_hidden_layers = 23 (as diffusers' SD 2 text_encoder/config.json), the 24th layer is simply not here and
last_hidden_state IS that penultimate output (weights_convert/keymap_openclip.py keeps the unused 24th layer, and
the text_projection SD 2 never uses, aside for export). Its tokenizer pads with id 0 ("!"; minisd.tokenizer).
"""

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd.attention import attention
from minisd.errors import MinisdError


@dataclass
class TextEncoderConfig:
    """Sizes of the text encoder; defaults are SD v1's (CLIP ViT-L/14). Names are transformers' CLIPTextConfig keys."""

    vocab_size: int = 49408  # 512 byte tokens (plain and end-of-word) + 48,894 BPE merges + start + end
    hidden_size: int = 768  # d
    intermediate_size: int = 3072  # MLP width, 4·d
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # nh; hd = d / nh = 64
    max_position_embeddings: int = 77  # s: 75 prompt tokens + start + end
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "gelu" for OpenCLIP-trained towers (see the module docstring)
    projection_dim: int = 768  # width of text_embeds, used only with_projection (SD v1's config.json says 768 too)
    with_projection: bool = False  # transformers' architectures ["CLIPTextModelWithProjection"]: a text_projection

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise MinisdError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise MinisdError(
                f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                f"got {self.hidden_size}"
            )


class TextEncoderOutput(NamedTuple):
    """last_hidden_state: (b, s, d) after final_layer_norm. hidden_states: num_hidden_layers + 1 tensors (b, s, d),
    the embeddings first and then each layer's output, before any final norm (transformers' output_hidden_states)."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...]


class TextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding. input_ids (b, s) -> (b, s, d)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids: (b, s) integer ids. Returns (b, s, d)."""
        # Positions are made here, not stored: transformers' `position_ids` buffer is not part of the state_dict.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (s, d) broadcasts over b


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token i attends only to tokens 0..i. x (b, s, d) -> (b, s, d).
    causal=False lets every token see every other (CLIP's vision transformer: image patches have no order)."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, s, d). Returns (b, s, d)."""
        q = rearrange(self.q_proj(x), "b s (nh hd) -> b nh s hd", nh=self.num_heads)  # split d into nh heads
        k = rearrange(self.k_proj(x), "b s (nh hd) -> b nh s hd", nh=self.num_heads)
        v = rearrange(self.v_proj(x), "b s (nh hd) -> b nh s hd", nh=self.num_heads)
        out = attention(q, k, v, causal=self.causal)  # CLIP's text transformer is causal, like GPT-2
        out = rearrange(out, "b nh s hd -> b s (nh hd)")  # heads side by side again
        return self.out_proj(out)


def quick_gelu(x: Tensor) -> Tensor:
    """x · σ(1.702 x), the sigmoid approximation of GELU (Hendrycks & Gimpel 2016, arXiv:1606.08415, §2) that
    OpenAI's CLIP was trained with (transformers' `hidden_act="quick_gelu"`). Any shape.

    >>> quick_gelu(torch.tensor([0.0, 1.0])).round(decimals=4)
    tensor([0.0000, 0.8458])
    """
    return x * torch.sigmoid(1.702 * x)


def gelu(x: Tensor) -> Tensor:
    """x · Φ(x), the exact GELU (Hendrycks & Gimpel 2016, §2; transformers' `hidden_act="gelu"`). Any shape.

    >>> gelu(torch.tensor([0.0, 1.0])).round(decimals=4)
    tensor([0.0000, 0.8413])
    """
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}  # config.hidden_act -> the function


class MLP(nn.Module):
    """Position-wise feed-forward: fc1 (d → 4d), quick-GELU (or GELU), fc2 (4d → d). x (b, s, d) -> (b, s, d)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, s, d). Returns (b, s, d)."""
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class EncoderLayer(nn.Module):
    """One pre-LayerNorm transformer layer. x (b, s, d) -> (b, s, d)."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CausalSelfAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (b, s, d). Returns (b, s, d)."""
        x = x + self.self_attn(self.layer_norm1(x))  # tokens look at the tokens before them
        x = x + self.mlp(self.layer_norm2(x))  # each token thinks on its own
        return x


class Encoder(nn.Module):
    """The stack of layers (the `encoder.layers.N` key paths). x (b, s, d) -> every hidden state."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config, causal) for _ in range(config.num_hidden_layers)])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: (b, s, d) embeddings. Returns num_hidden_layers + 1 tensors (b, s, d): x, then each layer's output."""
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        return tuple(hidden_states)


class TextEncoder(nn.Module):
    """CLIP's text transformer (transformers' CLIPTextModel without the pooled output).

    forward: input_ids (b, s) int64, s <= 77 (SD always passes 77: start, prompt, end, padding).
    Returns TextEncoderOutput(last_hidden_state (b, s, d), hidden_states: num_hidden_layers + 1 × (b, s, d)):
    d = 768 and 13 states for SD v1, d = 1024 and 24 states for SD 2.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.with_projection:  # CLIP's text head (no bias), into the space CLIP's image embeddings share
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: Tensor) -> TextEncoderOutput:
        """input_ids: (b, s) integer token ids, 1 <= s <= max_position_embeddings. Returns TextEncoderOutput."""
        return self.output_embeddings(self.input_embeddings(input_ids))

    def input_embeddings(self, input_ids: Tensor) -> Tensor:
        """The first half, the lesson's `input_embeddings = token_embeddings + position_embeddings`: one row of the
        token table per id plus one row of the position table per place. input_ids: (b, s). Returns (b, s, d).

        Replace or mix rows of the result by hand (a learned concept's vector, a blend of two words), then finish
        with output_embeddings, as the lesson's `get_output_embeds` does."""
        self._check_input_ids(input_ids)
        return self.embeddings(input_ids)

    def output_embeddings(self, input_embeddings: Tensor) -> TextEncoderOutput:
        """The second half: input embeddings (b, s, d) through the causal transformer layers and the final norm.
        Returns TextEncoderOutput; output_embeddings(input_embeddings(ids)) is forward(ids)."""
        max_length, d = self.config.max_position_embeddings, self.config.hidden_size
        x = input_embeddings
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != d or not 1 <= x.shape[1] <= max_length:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MinisdError(f"input_embeddings must be a (b, s <= {max_length}, {d}) tensor, got {shape}")
        hidden_states = self.encoder(x)
        return TextEncoderOutput(self.final_layer_norm(hidden_states[-1]), hidden_states)

    @torch.no_grad()
    def add_token_embeddings(self, vectors: Tensor) -> list[int]:
        """Grow the token table by n rows holding `vectors` (n, d): textual inversion's new words. Returns their ids,
        the next free ones (49408, 49409, … for SD v1), as transformers' resize_token_embeddings + a row write.

        The old rows are copied into a new table on the same device and dtype; config.vocab_size follows."""
        table = self.embeddings.token_embedding.weight
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != table.shape[1]:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise MinisdError(f"vectors must be (n, {table.shape[1]}), this text encoder's width; got {shape}")
        grown = nn.Embedding(table.shape[0] + len(vectors), table.shape[1], device=table.device, dtype=table.dtype)
        grown.weight.copy_(torch.cat([table, vectors.to(table)]))
        grown.weight.requires_grad_(table.requires_grad)
        self.embeddings.token_embedding = grown
        self.config = replace(self.config, vocab_size=grown.num_embeddings)  # a new config: others may share the old
        return list(range(table.shape[0], grown.num_embeddings))

    def prompt_embeds(self, input_ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """The (b, s, d) embeddings a pipeline hands the UNet, optionally from `clip_skip` layers before the end.

        Follows diffusers' StableDiffusionPipeline.encode_prompt: clip_skip None (or 0) is last_hidden_state;
        clip_skip = k takes hidden_states[-(k + 1)], the output of layer n − k (n = 12; 23 for SD 2), and still applies
        final_layer_norm to it (the UNet was trained on normalised features). AUTOMATIC1111's "Clip skip: 2"
        is k = 1 here.
        """
        n = self.config.num_hidden_layers
        if clip_skip is not None and (
            isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= n
        ):
            raise MinisdError(f"clip_skip must be None or an integer in [0, {n}], got {clip_skip!r}")
        output = self(input_ids)
        if not clip_skip:
            return output.last_hidden_state
        return self.final_layer_norm(output.hidden_states[-(clip_skip + 1)])

    def text_embeds(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(last_hidden_state (b, s, d), text_embeds (b, projection_dim)): the per-token states and CLIP's text
        embedding, text_projection of the end token's final state (Radford et al. 2021, §2.4: "the activations of
        the highest layer of the transformer at the [EOS] token"). Needs with_projection."""
        if not self.config.with_projection:
            raise MinisdError("text_embeds needs a text encoder with_projection (CLIPTextModelWithProjection)")
        last_hidden_state = self(input_ids).last_hidden_state
        # The end token has the largest id (49407) and argmax returns its first occurrence, before any end-token
        # padding: transformers' rule for CLIP configs with eos_token_id 2 (all the published ones).
        end = input_ids.argmax(dim=-1)
        pooled = last_hidden_state[torch.arange(input_ids.shape[0], device=end.device), end]  # (b, d)
        return last_hidden_state, self.text_projection(pooled)

    def _check_input_ids(self, input_ids: Tensor) -> None:
        """Raise MinisdError unless input_ids is a (b, s) integer tensor with s and every id in range."""
        max_length = self.config.max_position_embeddings
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise MinisdError(f"input_ids must be a (batch, sequence) tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise MinisdError(f"input_ids must hold integer token ids (torch.int64), got dtype {input_ids.dtype}")
        if not 1 <= input_ids.shape[1] <= max_length:
            raise MinisdError(f"input_ids length must be in [1, {max_length}] tokens, got {input_ids.shape[1]}")
        if input_ids.numel() and input_ids.device.type != "meta":
            low, high = input_ids.min().item(), input_ids.max().item()
            vocab_size = self.embeddings.token_embedding.num_embeddings  # with any added words
            if low < 0 or high >= vocab_size:
                raise MinisdError(
                    f"input_ids must be token ids in [0, {vocab_size - 1}], got values in [{low}, {high}]"
                )
