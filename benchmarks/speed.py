"""`python -m benchmarks [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size N] [--steps N] [--fast]`:
minisd's networks and diffusers'/transformers' twins, in ONE process, on the SAME random weights (the full SD v1
config, random init, one state dict loaded into both; `--model tiny`, 64×64 px by default, for a seconds-long smoke
test), timed side by side on the same inputs:
    text_encode     the text encoder on (2, 77) token ids (prompt and empty prompt)
    unet_step       one UNet call on (2, 4, size/8, size/8) latents: classifier-free guidance's batch of 2
    vae_decode      the VAE decoder, (1, 4, size/8, size/8) -> (1, 3, size, size)
    image_N         a whole image: N DDIM steps (UNet batch 2 + guidance) and the decode, text encoding excluded
The runners: minisd and diffusers in --dtype; with --fast also "minisd-fast" (minisd.fast.make_fast, in
minisd.fast.fast_dtype on the CPU: bfloat16 where the CPU has AVX-512 BF16 or AMX; on CUDA the UNet step replayed as
a CUDA graph) and, when that dtype differs, "diffusers-<dtype>" (diffusers as shipped, in the same dtype: what the
dtype alone buys). Each case runs once per runner to warm up, then `--repeat` times with the runners alternating
(ABC CBA ...), so drift in machine load hits all alike; the median is shown, and its ratio to diffusers' median in
--dtype. "error" is each output's max |difference| / max |output| against minisd's in --dtype: the numerical cost.
CUDA times come from CUDA events (the work is asynchronous; host clocks would read the launch), CPU times from
perf_counter. Peak memory is what the case adds above what was resident before it (the weights): CUDA
torch.cuda.max_memory_allocated, CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs), the largest
over the repeats. The header names the CPU, its vector features and the load average (before and after): the machine
this project measures on is shared, and ratios from other CPUs read differently.
"""

import argparse
import os
import statistics
import time

import torch

from minisd.arguments import DTYPES

DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the short names the tables print
PROMPTS = ["a photograph of an astronaut riding a horse", ""]  # the prompt and the empty prompt (guidance)
GUIDANCE_SCALE = 7.5
CASES = ("text_encode", "unet_step", "vae_decode", "image")  # "image" prints as image_N, N = --steps


def model_configs(model: str) -> tuple:
    """(UNetConfig, VAEConfig, TextEncoderConfig): SD v1's sizes, SD 2.1's ("sd-v2": 64-wide heads, linear
    projections, attention upcast, the 23-layer OpenCLIP ViT-H text tower), or SD v1 with small numbers for smoke
    tests."""
    from minisd.clip import TextEncoderConfig
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig

    if model == "sd-v1":
        return UNetConfig(), VAEConfig(), TextEncoderConfig()
    if model == "sd-v2":
        return (
            UNetConfig(
                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True,
            ),
            VAEConfig(),
            TextEncoderConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu",
            ),
        )  # fmt: skip
    return (
        UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32),
        VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
        TextEncoderConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    )


def build_twins(model: str, seed: int = 0) -> tuple[dict, dict]:
    """{"unet", "vae", "text_encoder"} for diffusers/transformers (random init at `model`'s config, on the CPU in
    fp32) and for minisd (built on the meta device, then given the very same tensors with assign=True)."""
    from dataclasses import asdict

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from minisd.clip import TextEncoder
    from minisd.unet import UNet
    from minisd.vae import VAE

    diffusers_logging.set_verbosity_error()  # no "modules that should be kept in float32: []" note on .to()
    unet_config, vae_config, text_config = model_configs(model)
    n = len(vae_config.block_out_channels)
    torch.manual_seed(seed)  # diffusers and transformers initialise from the global generator
    ref = {
        "unet": UNet2DConditionModel(**asdict(unet_config)),
        "vae": AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **asdict(vae_config)
        ),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**asdict(text_config))),
    }
    ours = {}
    for name, ours_class, config in [
        ("unet", UNet, unet_config),
        ("vae", VAE, vae_config),
        ("text_encoder", TextEncoder, text_config),
    ]:
        with torch.device("meta"):
            ours[name] = ours_class(config)
        ours[name].load_state_dict(ref[name].state_dict(), strict=True, assign=True)
    for module in [*ref.values(), *ours.values()]:
        module.eval().requires_grad_(False)
    return ours, ref


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(fn, device: torch.device) -> tuple[float, int, torch.Tensor]:
    """Run fn() once; return (seconds, bytes of memory it added at its peak above what was resident before, output)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated(device) - base, out
    base = _rss_now()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return seconds, _peak_rss() - base, out


def denoise_and_decode(unet_step, decode, context: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """A txt2img image with either library's networks: `steps` DDIM steps with classifier-free guidance, then the
    VAE decode. unet_step(latent_model_input, t, context) -> eps; decode(vae_latents) -> image."""
    from minisd.samplers.ddim import DDIMSampler
    from minisd.vae import LATENT_SCALE

    sampler = DDIMSampler()
    sampler.set_timesteps(steps)
    latents = noise
    for t in sampler.timesteps:
        latent_model_input = torch.cat([latents] * 2)  # (2, 4, h, w): one copy per prompt
        noise_pred_text, noise_pred_uncond = unet_step(latent_model_input, t, context).chunk(2)
        eps = noise_pred_uncond + GUIDANCE_SCALE * (noise_pred_text - noise_pred_uncond)
        latents = sampler.step(eps, t, latents)
    return decode(latents / LATENT_SCALE)


def cpu_description() -> str:
    """The CPU's model name and the vector features that decide its speed here (Linux /proc/cpuinfo flags)."""
    import platform

    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"]
    name, flags = platform.processor() or "unknown CPU", set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break  # every core lists the same
    have = [flag for flag in wanted if flag in flags]
    return f"{name}, {os.cpu_count()} logical CPUs; features: {' '.join(have) or 'none of ' + ' '.join(wanted)}"


def load_line(before: tuple, after: tuple) -> str:
    """The benchmark header's line on machine load: os.getloadavg() before and after the runs."""
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in (before, after))
    return f"load average (1, 5, 15 min): {before} before, {after} after"


def twin_in(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A second copy of a built network in another dtype, made without a transient float32 copy (the full UNet is
    3.4 GB): built on the meta device, then given its weights converted one tensor at a time."""
    import copy

    if not hasattr(type(model), "config_name") and not type(model).__module__.startswith("minisd"):
        return copy.deepcopy(model).to(device, dtype)  # transformers' text encoder: 0.5 GB, non-persistent buffers
    with torch.device("meta"):
        twin = (
            type(model).from_config(model.config) if hasattr(type(model), "config_name") else type(model)(model.config)
        )
    twin.load_state_dict({k: v.to(device, dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    assert not any(t.is_meta for t in [*twin.parameters(), *twin.buffers()]), "a buffer outside the state dict"
    return twin.eval().requires_grad_(False)


def build_runners(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, names: list[str]) -> dict:
    """{runner name: (library, {network name: module}, dtype)}: minisd and diffusers in --dtype; with --fast also
    minisd-fast (minisd.fast, in fast_dtype) and diffusers in that dtype where it differs from --dtype."""
    ours, ref = build_twins(args.model)
    ours, ref = {n: ours[n] for n in names}, {n: ref[n] for n in names}  # only the networks the cases run
    for models in (ours, ref):
        for name in models:
            models[name].to(device, dtype)
    runners = {"minisd": ("minisd", ours, dtype), "diffusers": ("diffusers", ref, dtype)}
    if args.fast:
        from minisd.fast import fast_dtype, make_fast

        fast = fast_dtype(device) or dtype
        runners["minisd-fast"] = ("minisd", {n: make_fast(twin_in(m, fast, device)) for n, m in ours.items()}, fast)
        if fast != dtype:
            short = next(k for k, v in DTYPE_NAMES.items() if DTYPES[v] == fast)
            runners[f"diffusers-{short}"] = ("diffusers", {n: twin_in(m, fast, device) for n, m in ref.items()}, fast)
    return runners


def case_functions(runner: tuple, case: str, inputs: dict, steps: int, cuda_graph: bool):
    """fn() -> output tensor for one runner and case; inputs in float32, cast to the runner's dtype once here."""
    library, models, dtype = runner
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    latents, t, context, noise, ids = (cast[k] for k in ("latents", "t", "context", "noise", "ids"))
    if library == "minisd":
        unet_step = models.get("unet")
        if cuda_graph and case in ("unet_step", "image"):  # one graph per case that runs the UNet
            from minisd.fast import capture_unet_step

            with torch.inference_mode():
                unet_step = capture_unet_step(models["unet"], latents, t, context)
        encode = lambda ids: models["text_encoder"](ids).last_hidden_state  # noqa: E731
        decode = lambda z: models["vae"].decode(z)  # noqa: E731
    else:
        unet_step = lambda x, t, c: models["unet"](x, t, encoder_hidden_states=c).sample  # noqa: E731
        encode = lambda ids: models["text_encoder"](ids).last_hidden_state  # noqa: E731
        decode = lambda z: models["vae"].decode(z).sample  # noqa: E731
    return {
        "text_encode": lambda: encode(ids),
        "unet_step": lambda: unet_step(latents, t, context),
        "vae_decode": lambda: decode(noise),
        "image": lambda: denoise_and_decode(unet_step, decode, context, noise, steps),
    }[case]


NETWORKS = {"text_encode": ["text_encoder"], "unet_step": ["unet"], "vae_decode": ["vae"], "image": ["unet", "vae"]}


def bench_speed(args: argparse.Namespace) -> list[dict]:
    """Time every case for every runner; print the table; return its rows."""
    from minisd.tokenizer import Tokenizer

    device, dtype = torch.device(args.device), DTYPES[DTYPE_NAMES[args.dtype]]
    size = args.size or (512 if args.model == "sd-v1" else 64)
    steps = args.steps or (50 if args.model == "sd-v1" else 5)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    if size % 8 or size < 64:
        raise SystemExit(f"--size must be a multiple of 8, at least 64, got {size}")
    if steps < 1 or args.repeat < 1:
        raise SystemExit(f"--steps and --repeat must be at least 1, got {steps} and {args.repeat}")
    selected = args.cases.split(",") if args.cases else list(CASES)
    for case in selected:
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}, choose from {', '.join(CASES)}")
    if args.threads is not None or args.model == "tiny":
        # the tiny model runs ~1,000 ops of microseconds: on a busy machine each op's barrier between threads can
        # wait a whole scheduler slice for a descheduled thread (seconds per tiny UNet step), so one thread by default
        threads = args.threads or 1
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    names = sorted({n for case in selected for n in NETWORKS[case]})
    runners = build_runners(args, device, dtype, names)

    g = torch.Generator().manual_seed(0)  # inputs drawn on the CPU in fp32, then moved: the same on every device
    h = w = size // 8
    ids = Tokenizer.from_default()(PROMPTS)
    if "text_encoder" in names:  # the tiny smoke-test model has a small vocabulary; clamp is a no-op at full size
        ids = ids.clamp(max=runners["minisd"][1]["text_encoder"].config.vocab_size - 1)
    width = runners["minisd"][1]["unet"].config.cross_attention_dim if "unet" in names else 768
    inputs = {
        "latents": torch.randn(2, 4, h, w, generator=g),
        "t": torch.tensor([500, 500]),
        "context": torch.randn(2, 77, width, generator=g),
        "noise": torch.randn(1, 4, h, w, generator=g),
        "ids": ids,
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    rows = []
    with torch.inference_mode():
        for case in selected:
            graph = args.fast and device.type == "cuda"
            fns = {
                name: case_functions(runner, case, inputs, steps, graph and name == "minisd-fast")
                for name, runner in runners.items()
            }
            for fn in fns.values():  # warm-up: kernel choice, weight packing, allocator growth, first touch of pages
                measure(fn, device)
            seconds = {name: [] for name in fns}
            peak = {name: 0 for name in fns}
            outputs = {}
            for r in range(args.repeat):
                order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # ABC CBA: drift hits all alike
                for name in order:
                    s, p, outputs[name] = measure(fns[name], device)
                    seconds[name].append(s)
                    peak[name] = max(peak[name], p)
            want = outputs["minisd"].double()
            for name in fns:
                error = (outputs[name].double() - want).abs().max() / want.abs().max().clamp_min(1e-30)
                rows.append({
                    "case": f"image_{steps}" if case == "image" else case, "runner": name,
                    "dtype": str(runners[name][2]).removeprefix("torch."), "seconds": statistics.median(seconds[name]),
                    "ratio": statistics.median(seconds[name]) / statistics.median(seconds["diffusers"]),
                    "peak": peak[name], "error": error.item(), "runs": seconds[name],
                })  # fmt: skip
    print_table(rows, args, size, (load_before, os.getloadavg()))
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, size: int, loads: tuple) -> None:
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(
        f"minisd vs diffusers: model {args.model}, {args.device}{gpu} {args.dtype}, {size}x{size} px, "
        f"median of {args.repeat}{' --fast' if args.fast else ''}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.device == "cpu":
        from minisd.fast import fast_dtype

        print(f"CPU: {cpu_description()}; minisd.fast computes in {str(fast_dtype('cpu')).removeprefix('torch.')}")
        print(load_line(*loads))
    header = ["case", "runner", "dtype", "seconds", "x diffusers", "peak MB", "error"]
    print(f"{header[0]:<12} {header[1]:<15} {header[2]:<9} " + " ".join(f"{h:>12}" for h in header[3:]))
    for row in rows:
        print(
            f"{row['case']:<12} {row['runner']:<15} {row['dtype']:<9} {row['seconds']:12.4f} {row['ratio']:12.3f} "
            f"{row['peak'] / 2**20:12.1f} {row['error']:12.2e}"
        )


def speed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="minisd vs diffusers, side by side on the same random SD v1 weights "
        "(`python -m benchmarks load FILE` times checkpoint loading instead)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32")
    parser.add_argument("--size", type=int, help="image height = width in pixels (default 512; tiny: 64)")
    parser.add_argument("--steps", type=int, help="denoising steps of the whole-image case (default 50; tiny: 5)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per runner and case (the median is shown)")
    fast_help = "also time minisd.fast (bfloat16 where the CPU has it) and diffusers in that dtype"
    parser.add_argument("--fast", action="store_true", help=fast_help)
    threads_help = "CPU threads (default: torch's, all cores; tiny: 1, its ops are too small to share)"
    parser.add_argument("--threads", type=int, help=threads_help)
    parser.add_argument("--model", choices=["sd-v1", "sd-v2", "tiny"], default="sd-v1", help="tiny: smoke tests only")
    parser.add_argument("--cases", default="", help="comma-separated subset of text_encode,unet_step,vae_decode,image")
    return parser
