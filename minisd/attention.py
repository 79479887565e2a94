"""The one attention every minisd network calls, and the written-out math it stands for.

    Attention(Q, K, V) = softmax(Q Kᵀ / √hd) V        (Vaswani et al. 2017, arXiv:1706.03762, eq. 1)

`attention` runs PyTorch's fused `scaled_dot_product_attention` (flash / memory-efficient / cuDNN kernels where
the device has them); `attention_reference` spells the same formula out in three lines for the reader, and
tests/test_attention.py proves the two agree.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √hd) v over the last two dims, on the fused kernel.

    q: (b, nh, s, hd); k, v: (b, nh, s_kv, hd). Returns (b, nh, s, hd). `causal=True` lets token i look only at
    tokens j <= i (CLIP's text encoder). `mask`: a bool tensor broadcasting to (b, nh, s, s_kv), True where query i
    may look at key j (Kandinsky's prior: causal and not at the prompt's padding); every row needs one True.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def attention_in_float32(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """attention(q, k, v, mask=mask) computed in float32 and cast back: SD 2.1's upcast_attention (Stability's
    ATTN_PRECISION="fp32"), because q·kᵀ can pass float16's largest value (65504) before the softmax.
    Shapes as attention(); a no-op for float32 inputs."""
    return attention(q.float(), k.float(), v.float(), mask=mask).to(q.dtype)


def attention_weights(q: Tensor, k: Tensor, causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √hd): (b, nh, s, s_kv), row i = how query i spreads its attention over the keys (rows sum
    to 1). What the fused kernel never materialises; notebooks/03 draws these as cross-attention maps."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (b, nh, s, s_kv): how much each query likes each key
    if causal:
        s, s_kv = scores.shape[-2:]
        future = torch.ones(s, s_kv, dtype=torch.bool, device=q.device).triu(1)  # j > i
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # e^−∞ = 0: no weight on a masked key
    return scores.softmax(dim=-1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, mask: Tensor | None = None) -> Tensor:
    """The same function as `attention`, written out. Shapes as in `attention`."""
    return attention_weights(q, k, causal, mask) @ v
