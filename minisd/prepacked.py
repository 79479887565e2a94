"""Convolutions and matmuls with their weights laid out for the CPU once, not on every call (oneDNN, float32 or
bfloat16). Part of minisd.fast: applied after loading, never a flag inside a model file.

PyTorch's eager nn.Conv2d and nn.Linear hand oneDNN a plain (out, in, kh, kw) or (out, in) weight, and oneDNN
reorders it into its blocked layout (the tiles its AVX-512 / AMX kernels read) on EVERY call. At the UNet's 8×8 and
16×16 levels that reorder costs more than the convolution itself (a 1280→1280 3×3 conv at 8×8, batch 2, float32:
208 ms eager, 75 ms prepacked on 2 cores); in bfloat16, whose AMX tiles are reordered further, prepacking saves
10-40 % of a conv and up to half of a Linear (benchmarks/ measures the whole step). The same numbers come out: the
products and sums are the ones oneDNN computes anyway, in its own order (float32 or bfloat16 rounding).

These modules do that reorder once and keep the result (`packed_weight`, a second copy of the weight: the dense
`weight` and `bias` stay as the module's parameters, so state_dict and load_state_dict see the usual keys). Packing
is lazy, at the first call: a Linear kept only for its keys (the to_q / to_k / to_v a fused projection replaced,
minisd.fast) never costs a copy. A packed copy is never stale: it is redone when the weight or bias changes after
packing — load_state_dict, an in-place edit such as a merged LoRA (W ← W + ΔW, minisd.lora's fuse), or a new
Parameter — detected by the tensors' identity and PyTorch's version counter, which every in-place write bumps (views
share their base's: a write through to_q reaches the fused matrix's). Tensors made under torch.inference_mode keep no
version counter: load weights outside it (minisd's loaders do) if you mean to edit them in place later.

What torch.compile's CPU "freezing" does to a whole graph, here in eager mode, one layer at a time.
"""

import torch
from torch import Tensor, nn


def onednn_can_pack(weight: Tensor) -> bool:
    """True where these modules run: a CPU tensor in float32, or in bfloat16 on a CPU whose oneDNN computes it
    (AVX-512 or newer; minisd.fast picks bfloat16 only where the CPU has it natively)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def weights_state(*tensors: Tensor | None) -> tuple:
    """What identifies these tensors' current numbers: (storage address, version counter) each; a packed copy made
    from them is stale once this changes."""
    return tuple(
        None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors
    )  # fmt: skip


class PrepackedConv2d(nn.Module):
    """An nn.Conv2d whose weight is reordered into oneDNN's blocked layout once per input shape.

    x: (b, c_in, h, w) in any memory format. Returns (b, c_out, h', w'), channels_last. Keys as the Conv2d's
    (`weight`, `bias`). oneDNN picks the blocked layout for one input shape, and a weight packed for another shape
    runs ~10× slower than eager (measured: a 1280→1280 conv at 4×4 packed for 64×64 inputs took 1.4 s instead of
    0.12 s), so the packed weight is redone when the input shape changes (at most once per resolution of a run:
    the cost of one eager call).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert conv.padding_mode == "zeros" and isinstance(conv.padding, tuple), "SD v1 pads with zeros, by numbers"
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("packed_weight", None, persistent=False)
        self.packed_for: tuple = ()  # (input shape, weights_state(weight)) packed_weight was laid out for

    def forward(self, x: Tensor) -> Tensor:
        packed_for = (tuple(x.shape), weights_state(self.weight))
        if self.packed_for != packed_for:
            self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(x.shape),
            )  # fmt: skip
            self.packed_for = packed_for
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "",
        )  # fmt: skip


class PrepackedLinear(nn.Module):
    """y = x·Wᵀ + b with W reordered into oneDNN's blocked layout once (one layout serves every number of rows).

    x: (..., in_features). Returns (..., out_features). `linear` is an nn.Linear (its parameters stay this module's
    `weight` and `bias`: the same keys) or minisd.fast.FusedLinear (its weight and bias are not keys: they stay
    non-persistent buffers here too).
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        if isinstance(linear, nn.Linear):
            self.weight, self.bias = linear.weight, linear.bias
        else:
            self.register_buffer("weight", linear.weight, persistent=False)
            self.register_buffer("bias", linear.bias, persistent=False)
        self.register_buffer("packed_weight", None, persistent=False)
        self.packed_for: tuple = ()  # weights_state(weight) packed_weight was made from

    def forward(self, x: Tensor) -> Tensor:
        packed_for = weights_state(self.weight)
        if self.packed_for != packed_for:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self.packed_for = packed_for
        # oneDNN reads x as a dense (rows, in_features) matrix: a strided view must be made dense first (it would
        # silently read the wrong numbers)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")
