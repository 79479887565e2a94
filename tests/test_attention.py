"""The fused attention kernel computes the written-out softmax(q kᵀ / √hd) v."""

import pytest
import torch

from minisd.attention import attention, attention_reference


@pytest.mark.parametrize(
    ("s", "s_kv", "causal"),
    [(77, 77, True), (77, 77, False), (64, 77, False), (256, 256, False)],  # CLIP self-attn, cross-attn, UNet self-attn
)
def test_attention_matches_reference(s, s_kv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, s, 40, generator=g, dtype=torch.float64)
    k = torch.randn(2, 8, s_kv, 40, generator=g, dtype=torch.float64)
    v = torch.randn(2, 8, s_kv, 40, generator=g, dtype=torch.float64)
    # float64 on both sides: any difference beyond rounding would be a different function.
    torch.testing.assert_close(attention(q, k, v, causal), attention_reference(q, k, v, causal), rtol=1e-12, atol=1e-12)


def test_causal_mask_hides_the_future():
    """Changing token 5 must not change what tokens 0..4 see."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 1.0
    v2[:, :, 5:] -= 3.0
    before = attention(q, k, v, causal=True)[:, :, :5]
    after = attention(q, k2, v2, causal=True)[:, :, :5]
    torch.testing.assert_close(before, after)
