"""Speed-ups applied after loading: the same networks, the same numbers (to fp32 rounding), less time.

    unet = make_fast(unet)      # also a VAE or a TextEncoder; in place, returns the model
    step = capture_unet_step(unet, latents, t, context)     # CUDA only: the whole UNet step as one CUDA graph

What `make_fast` changes, and why each is safe:
  - fused QKV: a self-attention's three projections of the same tokens (q = x·W_qᵀ, k = x·W_kᵀ, v = x·W_vᵀ) become
    one matmul x·[W_q; W_k; W_v]ᵀ: the input is read once and one big matmul beats three smaller ones. Every
    output element is the same dot product as before. The `to_q/to_k/to_v` (CLIP: `q_proj/k_proj/v_proj`)
    Linears stay in the module tree with their keys, their weights re-pointed at rows of the fused matrix (views,
    no second copy), so `state_dict()` exports unchanged and `load_state_dict(sd)` (not `assign=True`) writes
    through into the fused matrix.
  - channels_last (UNet, VAE; on the GPU, or the CPU in 16-bit): 4-D tensors stored pixel-major (b, h, w, c in
    memory). cuDNN's fp16/bf16 tensor-core convolutions and oneDNN work natively in that layout, so no per-conv
    reorder of inputs and outputs, and the SpatialTransformer's "b c h w -> b (h w) c" becomes a free view.
  - prepacked convolutions (UNet, VAE; fp32 on the CPU): PyTorch's eager conv reorders the weight into oneDNN's
    blocked layout on EVERY call. At the UNet's 8×8 and 16×16 levels that reorder costs more than the
    convolution itself (a 1280→1280 3×3 conv at 8×8, batch 2: 208 ms eager, 75 ms prepacked on 2 cores). Each
    Conv2d becomes a PrepackedConv2d holding the weight reordered for the input shape it last saw (the same
    numbers, one more copy of the conv weights in memory); its outputs come out channels_last, so the activations
    flow channels_last as above. What torch.compile's CPU "freezing" does, in eager mode.
Apply it last: after `.to(device, dtype)` (a later `.to` would copy the fused matrix and the three Linears apart,
and cannot move a prepacked weight).
Model files hold no switch for any of this (STYLE.md: speed-ups live here, applied after loading).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd import clip, unet, vae
from minisd.attention import attention
from minisd.errors import MinisdError


def fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Stack Linears that read the same input into one weight (sum of out_features, in_features) and bias;
    re-point each Linear's parameters at its rows of them (views: one copy of the numbers, keys unchanged)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    assert all(has_bias) or not any(has_bias), "fuse Linears that all have a bias, or none"
    bias = torch.cat([linear.bias.detach() for linear in linears]) if all(has_bias) else None
    row = 0
    for linear in linears:
        rows = slice(row, row + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[rows], requires_grad=linear.bias.requires_grad)
        row += linear.out_features
    return weight, bias


class FusedSelfAttention(nn.Module):
    """The UNet's self-attention (`attn1`, a CrossAttention called without context) with one QKV matmul.

    x: (b, s, d). Returns (b, s, d). Keys as before: to_q, to_k, to_v, to_out.0.
    """

    def __init__(self, attn: unet.CrossAttention):
        super().__init__()
        self.heads = attn.heads
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        weight, _ = fuse_linears([self.to_q, self.to_k, self.to_v])  # SD v1's to_q/k/v have no bias
        self.register_buffer("qkv_weight", weight, persistent=False)  # not a key: the rows are to_q/k/v's

    def forward(self, x: Tensor, context: None = None) -> Tensor:
        assert context is None, "self-attention only: attn2 (cross-attention) is not fused"
        qkv = F.linear(x, self.qkv_weight)  # (b, s, 3d): [q | k | v]
        q, k, v = rearrange(qkv, "b s (three nh hd) -> three b nh s hd", three=3, nh=self.heads)
        out = attention(q, k, v)
        return self.to_out(rearrange(out, "b nh s hd -> b s (nh hd)"))


class FusedVAESelfAttention(nn.Module):
    """The VAE mid-block's single-head attention (minisd.vae.SelfAttention) with one QKV matmul.

    x: (b, c, h, w). Returns (b, c, h, w). Keys as before: group_norm, to_q, to_k, to_v, to_out.0.
    """

    def __init__(self, attn: vae.SelfAttention):
        super().__init__()
        self.group_norm, self.to_out = attn.group_norm, attn.to_out
        self.to_q, self.to_k, self.to_v = attn.to_q, attn.to_k, attn.to_v
        weight, bias = fuse_linears([self.to_q, self.to_k, self.to_v])
        self.register_buffer("qkv_weight", weight, persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        residual = x
        x = self.group_norm(rearrange(x, "b c h w -> b c (h w)"))  # the eager module's statistics, same rounding
        qkv = F.linear(rearrange(x, "b c s -> b 1 s c"), self.qkv_weight, self.qkv_bias)  # (b, 1, s, 3c)
        q, k, v = qkv.chunk(3, dim=-1)
        x = self.to_out[0](attention(q, k, v))
        x = rearrange(x, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + residual


class FusedCausalSelfAttention(nn.Module):
    """CLIP's causal self-attention (minisd.clip.CausalSelfAttention) with one QKV matmul.

    x: (b, s, d). Returns (b, s, d). Keys as before: q_proj, k_proj, v_proj, out_proj.
    """

    def __init__(self, attn: clip.CausalSelfAttention):
        super().__init__()
        self.num_heads, self.causal = attn.num_heads, attn.causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        weight, bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        self.register_buffer("qkv_weight", weight, persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # (b, s, 3d)
        q, k, v = rearrange(qkv, "b s (three nh hd) -> three b nh s hd", three=3, nh=self.num_heads)
        out = attention(q, k, v, causal=self.causal)
        return self.out_proj(rearrange(out, "b nh s hd -> b s (nh hd)"))


class PrepackedConv2d(nn.Module):
    """An nn.Conv2d whose weight is reordered into oneDNN's blocked layout once per input shape, not on every call
    (fp32, CPU).

    x: (b, c_in, h, w) in any memory format. Returns (b, c_out, h', w'), channels_last. Keys as the Conv2d's
    (`weight`, `bias`: the dense parameters stay, for state_dict). oneDNN picks the blocked layout for one input
    shape, and a weight packed for another shape runs ~10× slower than eager (measured: a 1280→1280 conv at 4×4
    packed for 64×64 inputs took 1.4 s instead of 0.12 s), so the packed weight is redone when the input shape
    changes (at most once per resolution of a run: the cost of one eager call) and after load_state_dict.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        assert conv.padding_mode == "zeros" and isinstance(conv.padding, tuple), "SD v1 pads with zeros, by numbers"
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("packed_weight", None, persistent=False)
        self.packed_for: tuple[int, ...] = ()  # the input shape packed_weight was laid out for
        self.register_load_state_dict_post_hook(PrepackedConv2d._forget_packing)

    def _forget_packing(self, _incompatible_keys) -> None:
        self.packed_weight, self.packed_for = None, ()

    def forward(self, x: Tensor) -> Tensor:
        if self.packed_for != tuple(x.shape):
            self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(x.shape),
            )  # fmt: skip
            self.packed_for = tuple(x.shape)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "",
        )  # fmt: skip


def make_fast(model: nn.Module) -> nn.Module:
    """Apply the speed-ups above to a loaded minisd UNet, VAE or TextEncoder, in place; returns it.

    Idempotent. Outputs equal the eager model's to fp32 rounding (tests/test_fast.py states the bound).
    """
    if not isinstance(model, (unet.UNet, vae.VAE, clip.TextEncoder)):
        raise MinisdError(f"model must be a minisd UNet, VAE or TextEncoder, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise MinisdError("model still has parameters on the meta device: load its weights before make_fast")
    for module in list(model.modules()):
        if isinstance(module, unet.TransformerBlock) and isinstance(module.attn1, unet.CrossAttention):
            module.attn1 = FusedSelfAttention(module.attn1)
        elif isinstance(module, vae.MidBlock):
            module.attentions = nn.ModuleList(
                [FusedVAESelfAttention(a) if isinstance(a, vae.SelfAttention) else a for a in module.attentions]
            )
        elif isinstance(module, clip.EncoderLayer) and isinstance(module.self_attn, clip.CausalSelfAttention):
            module.self_attn = FusedCausalSelfAttention(module.self_attn)
    if isinstance(model, (unet.UNet, vae.VAE)):
        weight = next(model.parameters())
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            _prepack_convs(model)
        else:
            _to_channels_last(model)
    return model


def _prepack_convs(model: nn.Module) -> None:
    """Replace every nn.Conv2d below `model` by a PrepackedConv2d (same keys)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                setattr(parent, name, PrepackedConv2d(child))


def _to_channels_last(model: nn.Module) -> None:
    """Store every 4-D parameter channels_last, in place (param.data, so the 2-D fused-QKV views keep sharing)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)


def capture_unet_step(
    model: unet.UNet, latents: Tensor, t: Tensor, context: Tensor, warmup: int = 2
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Record one whole UNet call as a CUDA graph; return `step(latents, t, context) -> eps` that replays it.

    latents, t, context: example inputs on the GPU with the shapes and dtypes every later call will have
    (t: a number, a 0-d or a (b,) tensor, at each call). Replaying skips the Python and the ~1,000 kernel
    launches of a step: the inputs are copied into the graph's own buffers, the recorded kernels run, and the
    returned eps is the graph's output buffer (overwritten by the next call: clone it to keep it). The caller
    runs this under torch.no_grad() or torch.inference_mode().
    """
    if latents.device.type != "cuda":
        raise MinisdError(f"capture_unet_step needs CUDA tensors, got latents on {latents.device}")
    # float32 timesteps: fractional ones (Euler, LMS) fit too; the UNet embeds t.float() either way
    t = torch.as_tensor(t).to(latents.device, torch.float32).expand(latents.shape[0]).clone()
    static = {"latents": latents.clone(), "t": t, "context": context.clone()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream: cuDNN/cuBLAS pick and cache their kernels
        for _ in range(warmup):
            model(static["latents"], static["t"], static["context"])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_eps = model(static["latents"], static["t"], static["context"])

    def step(latents: Tensor, t: Tensor, context: Tensor) -> Tensor:
        static["latents"].copy_(latents)
        static["t"].copy_(torch.as_tensor(t).expand(latents.shape[0]))  # copy_ converts device and dtype
        static["context"].copy_(context)
        graph.replay()
        return static_eps

    return step
