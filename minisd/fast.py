"""Speed-ups applied after loading: the same networks, the same numbers (to the rounding of their dtype), less time.

    dtype = fast_dtype("cpu")   # bfloat16 on CPUs that compute it natively, else float32 (None on GPUs: keep)
    unet = make_fast(unet)      # also a VAE or a TextEncoder; in place, returns the model
    step = capture_unet_step(unet, latents, t, context)     # CUDA only: the whole UNet step as one CUDA graph

What `make_fast` changes, and why each is safe:
  - fused QKV: a self-attention's three projections of the same tokens (q = x·W_qᵀ, k = x·W_kᵀ, v = x·W_vᵀ) become
    one matmul x·[W_q; W_k; W_v]ᵀ (FusedLinear): the input is read once and one big matmul beats three smaller
    ones. Every output element is the same dot product as before. The `to_q/to_k/to_v` (CLIP:
    `q_proj/k_proj/v_proj`) Linears stay in the module tree with their keys, their weights re-pointed at rows of
    the fused matrix (views, no second copy), so `state_dict()` exports unchanged and `load_state_dict(sd)` (not
    `assign=True`) writes through into the fused matrix.
  - prepacked convolutions and Linears (CPU, float32 or bfloat16: minisd/prepacked.py): oneDNN's weight layout
    made once instead of on every call; activations flow channels_last.
  - channels_last (UNet, VAE; elsewhere: GPUs): 4-D tensors stored pixel-major (b, h, w, c in memory). cuDNN's
    fp16/bf16 tensor-core convolutions work natively in that layout, so no per-conv reorder of inputs and outputs,
    and the SpatialTransformer's "b c h w -> b (h w) c" becomes a free view.
Apply it last: after `.to(device, dtype)` (a later `.to` would copy the fused matrix and the three Linears apart,
and cannot move a prepacked weight).

bfloat16 on the CPU (`fast_dtype`). bfloat16 keeps float32's 8 exponent bits and 7 of its 23 mantissa bits, so
nothing overflows, and each rounding is ≤ 2⁻⁹ relative. CPUs with AVX-512 BF16 or AMX multiply bfloat16 pairs
natively (accumulating in float32): a 2048² matmul ran at 140 GFLOP/s in float32 and 323 GFLOP/s in bfloat16 on
this project's 2-core machine. Where it is not native, oneDNN emulates it (converting to float32 on the fly), no
faster than float32, so fast_dtype picks float32 there ("never slower"). What runs in which dtype in a bfloat16 network:
    matmuls and convolutions   bfloat16 inputs and weights, float32 accumulation (oneDNN), bfloat16 result
    attention                  bfloat16 q, k, v; the softmax's max and sum in float32 (PyTorch's CPU flash kernel)
    GroupNorm, LayerNorm       bfloat16 in and out; mean and variance accumulated in float32 (PyTorch's CPU kernels)
    residual sums, SiLU, GELU  bfloat16
The cost: 1.3-2 % of the output's scale (max |error| / max |output|) on random networks, tiny and full size
(tests/test_fast.py), about what eager bfloat16 gives; `python -m benchmarks --fast` prints it for the full UNet.
Keeping the residual sums and norms in float32 (casting around every matmul and conv) was tried by an earlier
version and dropped: little accuracy gained, most of the speed lost.
Model files hold no switch for any of this (STYLE.md: speed-ups live here, applied after loading).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minisd import clip, unet, vae
from minisd.attention import attention, attention_in_float32
from minisd.errors import MinisdError
from minisd.prepacked import PrepackedConv2d, PrepackedLinear, onednn_can_pack


def cpu_has_native_bf16() -> bool:
    """True on CPUs that multiply bfloat16 in hardware: AVX-512 BF16 (Cooper Lake, Zen 4 and later) or AMX
    (Sapphire Rapids and later)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The dtype the fast mode computes in on `device`: bfloat16 on a CPU with native bfloat16, float32 on other
    CPUs, None (keep the weights' dtype) elsewhere."""
    if torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if cpu_has_native_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


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


def refuse_hooks(linears: list[nn.Module]) -> None:
    """A fused projection never calls the Linears it replaced: a forward hook on one of them (a LoRA applied on the
    fly, minisd.lora) would silently do nothing, so it is refused. Edits of their weights in place (a merged LoRA,
    load_state_dict) do reach the fused matrix: its rows are those weights."""
    for linear in linears:
        if linear._forward_hooks or linear._forward_pre_hooks:
            raise MinisdError(
                "a forward hook (a LoRA applied on the fly?) on a projection minisd.fast fused into one matmul would "
                "never run: use the eager networks (no --fast), or merge the LoRA into the weights"
            )


class FusedLinear(nn.Module):
    """Linears that read the same input, as one matmul: x·[W_1; W_2; …]ᵀ + [b_1; b_2; …].

    x: (..., in_features). Returns (..., Σ out_features). Its weight and bias are not keys (non-persistent
    buffers): the Linears keep theirs, re-pointed at rows of these (fuse_linears).
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weight, bias = fuse_linears(linears)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class FusedSelfAttention(nn.Module):
    """The UNet's self-attention (`attn1`, a CrossAttention called without context) with one QKV matmul.

    x: (b, s, d). Returns (b, s, d). Keys as before: to_q, to_k, to_v, to_out.0.
    """

    def __init__(self, attn: unet.CrossAttention):
        super().__init__()
        self.heads, self.upcast = attn.heads, attn.upcast
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self.to_qkv = FusedLinear([self.to_q, self.to_k, self.to_v])  # SD v1's to_q/k/v have no bias

    def forward(self, x: Tensor, context: None = None) -> Tensor:
        assert context is None, "self-attention only: attn2 (cross-attention) is not fused"
        refuse_hooks([self.to_q, self.to_k, self.to_v])
        qkv = self.to_qkv(x)  # (b, s, 3d): [q | k | v]
        q, k, v = rearrange(qkv, "b s (three nh hd) -> three b nh s hd", three=3, nh=self.heads)
        out = attention_in_float32(q, k, v) if self.upcast else attention(q, k, v)  # SD 2.1: upcast_attention
        return self.to_out(rearrange(out, "b nh s hd -> b s (nh hd)"))


class FusedVAESelfAttention(nn.Module):
    """The VAE mid-block's single-head attention (minisd.vae.SelfAttention) with one QKV matmul.

    x: (b, c, h, w). Returns (b, c, h, w). Keys as before: group_norm, to_q, to_k, to_v, to_out.0.
    """

    def __init__(self, attn: vae.SelfAttention):
        super().__init__()
        self.group_norm, self.to_out = attn.group_norm, attn.to_out
        self.to_q, self.to_k, self.to_v = attn.to_q, attn.to_k, attn.to_v
        self.to_qkv = FusedLinear([self.to_q, self.to_k, self.to_v])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        residual = x
        refuse_hooks([self.to_q, self.to_k, self.to_v])
        x = self.group_norm(rearrange(x, "b c h w -> b c (h w)"))  # the eager module's statistics, same rounding
        qkv = self.to_qkv(rearrange(x, "b c s -> b 1 s c"))  # (b, 1, s, 3c)
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
        self.qkv_proj = FusedLinear([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: Tensor) -> Tensor:
        refuse_hooks([self.q_proj, self.k_proj, self.v_proj])
        qkv = self.qkv_proj(x)  # (b, s, 3d)
        q, k, v = rearrange(qkv, "b s (three nh hd) -> three b nh s hd", three=3, nh=self.num_heads)
        out = attention(q, k, v, causal=self.causal)
        return self.out_proj(rearrange(out, "b nh s hd -> b s (nh hd)"))


def make_fast(model: nn.Module) -> nn.Module:
    """Apply the speed-ups above to a loaded minisd UNet, VAE or TextEncoder, in place; returns it.

    Idempotent; keeps the model's device and dtype (choose the dtype before: fast_dtype). Outputs equal the eager
    model's in the same dtype to its rounding (tests/test_fast.py states the bounds).
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
    if onednn_can_pack(next(model.parameters())):
        _prepack(model)
    elif isinstance(model, (unet.UNet, vae.VAE)):
        _to_channels_last(model)
    return model


def _prepack(model: nn.Module) -> None:
    """Replace every nn.Conv2d, nn.Linear and FusedLinear below `model` by its prepacked twin (same keys)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                setattr(parent, name, PrepackedConv2d(child))
            elif type(child) in (nn.Linear, FusedLinear):
                setattr(parent, name, PrepackedLinear(child))


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
