"""Per-token cross-attention maps: where in the picture the UNet reads each prompt token.

Every cross-attention module (`attn2`) lets the latent pixels query the 77 prompt tokens. Its probabilities
P = softmax(Q Kᵀ / √hd) (attention.attention_weights) have one row per pixel and one column per token; column j,
laid out on the module's h × w grid, is token j's map at that module. Aggregated as Prompt-to-Prompt (Hertz et al.
2022, arXiv:2208.01626, §3.2) and DAAM (Tang et al. 2023, arXiv:2210.04885, §3.1) do:

    map_j = mean over UNet calls ( mean over modules at the useful sides ( upsample( mean over heads ( P[:, j] ))))

then upsampled onto the picture. "Useful sides": maps at least a quarter of the latents' side and at least 4
pixels (min(h, 4) for latents smaller than that): 64, 32 and 16 for SD v1 at 512×512 (the coarse 8×8 maps are
left out, as DAAM and Prompt-to-Prompt show them little), 8 and 4 for the nano model's 8×8 latents.

The recorder hooks the modules from outside (PyTorch forward hooks: the model files carry no flag), recomputes P
from the module's own to_q and to_k on the inputs it was given, and runs beside any pipeline:

    with CrossAttentionMaps(components.unet, guided=True) as recorder:      # guided: the batch is [∅; c]
        image = txt2img(components, "a red circle above a blue square", guidance_scale=3, seed=0)[0]
    maps = recorder.token_maps(size=(64, 64))     # (1, 77, 64, 64): one map per token, averaged over the run
    labels = token_labels(components.tokenizer, "a red circle above a blue square")   # ["<start>", "a", "red", …]

code        paper / DAAM
probs       P = softmax(Q Kᵀ / √d_h), the attention probabilities       attention_probs
calls       one entry per UNet call (per denoising step): (b, 77, h, w)  the per-timestep maps
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd.attention import attention_weights
from minisd.errors import MinisdError
from minisd.tokenizer import MAX_LENGTH, Tokenizer


def useful_min_side(latent_side: int) -> int:
    """The smallest map side aggregated for latents of this side: max(side // 4, min(side, 4)).

    >>> useful_min_side(64), useful_min_side(8), useful_min_side(2)
    (16, 4, 2)
    """
    return max(latent_side // 4, min(latent_side, 4))


def grid_of(s: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of an attention module holding s pixel tokens, in a UNet whose latents are height × width: the
    latent grid halved (rounding up, as a stride-2 convolution with padding 1 does) until it has s pixels.

    >>> grid_of(16, 8, 8), grid_of(6, 5, 9)
    ((4, 4), (2, 3))
    """
    h, w = height, width
    while h * w > s:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != s:
        raise MinisdError(f"an attention module has {s} pixel tokens, not a halving of the {height}x{width} latents")
    return h, w


class CrossAttentionMaps:
    """Record the per-token cross-attention maps of every UNet call while a pipeline runs (a context manager).

    unet: the UNet to watch. guided: True when the pipeline batches [unconditional; conditional] (guidance_scale
    > 1 in minisd's pipelines, as in diffusers'); the maps of the conditional half are kept. min_side: the
    smallest map side to aggregate (None: useful_min_side of the latents). After the run, `calls` holds one
    (b, 77, h, w) float32 CPU tensor per UNet call (mean over heads and the chosen modules, at the finest side).
    """

    def __init__(self, unet: nn.Module, guided: bool, min_side: int | None = None):
        self.unet, self.guided, self.min_side = unet, guided, min_side
        self.modules = [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]
        if not self.modules:
            raise MinisdError("unet has no cross-attention (attn2) modules to record")
        self.calls: list[Tensor] = []
        self.handles: list = []
        self._latent_size: tuple[int, int] | None = None
        self._sum: dict[tuple[int, int], Tensor] = {}  # this call's head-mean maps, summed per module grid
        self._count: dict[tuple[int, int], int] = {}

    def __enter__(self) -> "CrossAttentionMaps":
        self.handles.append(self.unet.register_forward_pre_hook(self._unet_starts))
        self.handles.append(self.unet.register_forward_hook(self._unet_ends))
        self.handles += [module.register_forward_hook(self._attn2_ran) for _, module in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _unet_starts(self, unet: nn.Module, args: tuple) -> None:
        self._latent_size = tuple(args[0].shape[-2:])  # latents (b, c, h, w)
        self._sum, self._count = {}, {}

    def _attn2_ran(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x, context = args  # x: (b, h·w, d) pixel tokens; context: (b, 77, d_ctx) prompt embeddings
        if self.guided:
            x, context = x[x.shape[0] // 2 :], context[context.shape[0] // 2 :]  # the conditional half
        grid = grid_of(x.shape[1], *self._latent_size)
        if min(grid) < (self.min_side or useful_min_side(min(self._latent_size))):
            return  # too coarse to show where
        with torch.no_grad():
            q = rearrange(module.to_q(x), "b s (nh hd) -> b nh s hd", nh=module.heads)
            k = rearrange(module.to_k(context), "b s (nh hd) -> b nh s hd", nh=module.heads)
            probs = attention_weights(q.float(), k.float())  # (b, nh, h·w, 77), rows sum to 1
        maps = rearrange(probs.mean(dim=1), "b (h w) s -> b s h w", h=grid[0], w=grid[1])  # mean over heads
        self._sum[grid] = self._sum.get(grid, 0) + maps
        self._count[grid] = self._count.get(grid, 0) + 1

    def _unet_ends(self, unet: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._sum:
            return
        finest = max(self._sum, key=lambda g: g[0] * g[1])
        per_grid = [
            F.interpolate(total / self._count[grid], size=finest, mode="bilinear", align_corners=False)
            for grid, total in self._sum.items()
        ]  # each grid's mean over its modules, upsampled to the finest grid
        self.calls.append((sum(per_grid) / len(per_grid)).cpu())  # mean over the grids: (b, 77, h, w)

    def token_maps(self, size: tuple[int, int] | None = None, calls: slice = slice(None)) -> Tensor:
        """The maps averaged over the UNet calls `calls` (default all), upsampled bilinearly to size (h, w) (None:
        the finest module grid). Returns (b, 77, h, w) float32; each pixel's values over the 77 tokens sum to 1."""
        chosen = self.calls[calls]
        if not chosen:
            raise MinisdError("no cross-attention maps were recorded: run the pipeline inside the `with` block")
        maps = torch.stack(chosen).mean(dim=0)
        if size is not None:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps


def token_labels(tokenizer: Tokenizer, prompt: str) -> list[str]:
    """What each of the 77 context positions holds for `prompt`: "<start>", the prompt's tokens as text, "<end>",
    then "<pad>" (SD v1 pads with the end token, so the padding reads the whole prompt: CLIP is causal).

    >>> token_labels(Tokenizer.from_default(), "a red circle")[:6]
    ['<start>', 'a', 'red', 'circle', '<end>', '<pad>']
    """
    words = [tokenizer.decode([i]) for i in tokenizer.encode(prompt)[: MAX_LENGTH - 2]]  # truncated as tokenizer()
    return ["<start>", *words, "<end>"] + ["<pad>"] * (MAX_LENGTH - len(words) - 2)


def peak(maps: Tensor) -> Tensor:
    """The (row, column) of each map's largest value: maps (..., h, w) -> (..., 2) int64.

    >>> peak(torch.tensor([[0.0, 1.0], [3.0, 2.0]])).tolist()
    [1, 0]
    """
    flat = maps.flatten(-2).argmax(dim=-1)
    return torch.stack([flat // maps.shape[-1], flat % maps.shape[-1]], dim=-1)
