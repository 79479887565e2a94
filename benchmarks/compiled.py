"""`python -m benchmarks compile`: would torch.compile make the CPU UNet step faster than minisd's eager fast path?

One process, one random UNet (seed 0) at `--model`'s config, four runners on the same inputs, classifier-free
guidance's batch of 2 at --size:
    eager float32         the readable network, as written (the reference for "error")
    compiled float32      torch.compile(unet) (inductor, C++ backend), with inductor's "freezing": the weights become
                          constants, so convolutions and linears get oneDNN's prepacked layout, as minisd.fast does
    fast bfloat16         minisd.fast.make_fast: eager, prepacked weights, fused QKV (`--fast`)
    compiled bfloat16     torch.compile with freezing on a bfloat16 copy: what compiling adds on top of bfloat16
`--regional` compiles each repeated block (ResnetBlock, SpatialTransformer) instead of the whole network: fewer
distinct graphs to trace, so a shorter warm-up, but no fusion across blocks.

Printed per runner: warm-up (the first call: tracing, code generation, the C++ compiler, weight packing), the median
step of --repeat calls after it, and the error max |out - eager| / max |eager|. The warm-up is paid once per process
(inductor's on-disk cache shortened a second process's by a few seconds only, README); a 25-step picture makes 25
calls. Timings need a quiet machine: a job beside it hits the runners unevenly.
"""

import argparse
import os
import statistics
import time

import torch


def _unet(model: str, dtype: torch.dtype) -> torch.nn.Module:
    from benchmarks.speed import model_configs
    from minisd.unet import UNet

    torch.manual_seed(0)  # the same random weights for every runner
    return UNet(model_configs(model)[0]).to(dtype).eval().requires_grad_(False)


def _compile(unet: torch.nn.Module, regional: bool) -> torch.nn.Module:
    from minisd.unet import ResnetBlock, SpatialTransformer

    if not regional:
        return torch.compile(unet)
    for module in unet.modules():
        if isinstance(module, (ResnetBlock, SpatialTransformer)):
            module.compile()  # in place: the module's forward goes through its own compiled graph
    return unet


def bench_compile(args: argparse.Namespace) -> list[dict]:
    import torch._inductor.config as inductor_config

    from benchmarks.speed import cpu_description, load_line, model_configs
    from minisd.fast import fast_dtype, make_fast

    if args.threads:
        torch.set_num_threads(args.threads)
    inductor_config.freezing = True  # weights as constants: prepacked, folded (inference only)
    torch._dynamo.config.recompile_limit = 64  # regional: one graph per block shape, more than the default 8
    size = args.size or (512 if args.model != "tiny" else 64)
    bf16 = fast_dtype("cpu") or torch.bfloat16
    g = torch.Generator().manual_seed(1)
    width = model_configs(args.model)[0].cross_attention_dim
    latents, context = torch.randn(2, 4, size // 8, size // 8, generator=g), torch.randn(2, 77, width, generator=g)
    inputs = (latents, torch.tensor(999), context)
    runners = {
        "eager float32": lambda: _unet(args.model, torch.float32),
        "compiled float32": lambda: _compile(_unet(args.model, torch.float32), args.regional),
        "fast bfloat16": lambda: make_fast(_unet(args.model, bf16)),
        "compiled bfloat16": lambda: _compile(_unet(args.model, bf16), args.regional),
    }
    load_before = os.getloadavg()
    rows, reference = [], None
    with torch.no_grad():  # freezing needs no_grad (not inference_mode) around the compiled call
        for name, build in runners.items():
            unet = build()
            dtype = next(unet.parameters()).dtype
            x, t, context = (v.to(dtype) if v.is_floating_point() else v for v in inputs)
            start = time.perf_counter()
            out = unet(x, t, context)
            warm_up = time.perf_counter() - start
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                out = unet(x, t, context)
                times.append(time.perf_counter() - start)
            out = out.double()
            reference = out if reference is None else reference
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            rows.append({"runner": name, "warm_up": warm_up, "step": statistics.median(times), "error": error})
            del unet
            torch._dynamo.reset()
    print(
        f"torch.compile vs eager: UNet {args.model}, batch 2, {size}x{size} px, "
        f"{'regional (per block)' if args.regional else 'whole network'}, median of {args.repeat}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"CPU: {cpu_description()}")
    print(load_line(load_before, os.getloadavg()))
    print(f"{'runner':<18} {'warm-up s':>10} {'step s':>10} {'x eager':>8} {'error':>10}")
    for row in rows:
        print(
            f"{row['runner']:<18} {row['warm_up']:10.2f} {row['step']:10.4f} {row['step'] / rows[0]['step']:8.3f} "
            f"{row['error']:10.2e}"
        )
    return rows
