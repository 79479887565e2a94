"""`python -m benchmarks [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size 512] [--steps 50] [--fast]`:
minisd's networks and diffusers'/transformers' twins, in ONE process, on the SAME random weights (the full SD v1
config, random init, one state dict loaded into both; `--model tiny` for a seconds-long smoke test), timed side by
side on the same inputs:
    text_encode     the text encoder on (2, 77) token ids (prompt and empty prompt)
    unet_step       one UNet call on (2, 4, size/8, size/8) latents: classifier-free guidance's batch of 2
    vae_decode      the VAE decoder, (1, 4, size/8, size/8) -> (1, 3, size, size)
    image_N         a whole image: N DDIM steps (UNet batch 2 + guidance) and the decode, text encoding excluded
Each case runs once per library to warm up, then `--repeat` times with the libraries alternating (ABBA...), so
drift in machine load hits both; the median is shown. CUDA times come from CUDA events (the work is
asynchronous; host clocks would read the launch), CPU times from perf_counter. Peak memory is what the case
adds above what was resident before it (the weights): CUDA torch.cuda.max_memory_allocated, CPU the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs), the largest over the repeats. `--fast` applies
minisd.fast.make_fast to minisd's networks, and on CUDA also replays the UNet step as a CUDA graph; diffusers
runs as shipped.
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
    """(UNetConfig, VAEConfig, TextEncoderConfig): SD v1's sizes, or SD v1 with small numbers for smoke tests."""
    from minisd.clip import TextEncoderConfig
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig

    if model == "sd-v1":
        return UNetConfig(), VAEConfig(), TextEncoderConfig()
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


def measure(fn, device: torch.device) -> tuple[float, int]:
    """Run fn() once; return (seconds, bytes of memory it added at its peak above what was resident before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, torch.cuda.max_memory_allocated(device) - base
    base = _rss_now()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, _peak_rss() - base


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


def bench_speed(args: argparse.Namespace) -> list[dict]:
    """Time every case for both libraries; print the table; return its rows."""
    from minisd.tokenizer import Tokenizer

    device, dtype = torch.device(args.device), DTYPES[DTYPE_NAMES[args.dtype]]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    if args.size % 8 or args.size < 64:
        raise SystemExit(f"--size must be a multiple of 8, at least 64, got {args.size}")
    if args.steps < 1 or args.repeat < 1:
        raise SystemExit(f"--steps and --repeat must be at least 1, got {args.steps} and {args.repeat}")
    selected = args.cases.split(",") if args.cases else list(CASES)
    for case in selected:
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}, choose from {', '.join(CASES)}")
    ours, ref = build_twins(args.model)
    for models in (ours, ref):
        for name in models:
            models[name].to(device, dtype)
    unet_step = ours["unet"]
    if args.fast:
        from minisd.fast import make_fast

        for module in ours.values():
            make_fast(module)

    g = torch.Generator().manual_seed(0)  # inputs drawn on the CPU in fp32, then moved: the same on every device
    h = w = args.size // 8
    ids = Tokenizer.from_default()(PROMPTS).to(device)
    vocab = ours["text_encoder"].config.vocab_size
    ids = ids.clamp(max=vocab - 1)  # the tiny smoke-test model has the full vocabulary; clamp is a no-op then
    latents = torch.randn(2, 4, h, w, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    context = torch.randn(2, 77, ours["unet"].config.cross_attention_dim, generator=g).to(device, dtype)
    noise = torch.randn(1, 4, h, w, generator=g).to(device, dtype)

    if args.fast and device.type == "cuda":
        from minisd.fast import capture_unet_step

        with torch.inference_mode():
            unet_step = capture_unet_step(ours["unet"], latents, t, context)

    cases = {
        "text_encode": (
            lambda: ours["text_encoder"](ids).last_hidden_state,
            lambda: ref["text_encoder"](ids).last_hidden_state,
        ),
        "unet_step": (
            lambda: unet_step(latents, t, context),
            lambda: ref["unet"](latents, t, encoder_hidden_states=context).sample,
        ),
        "vae_decode": (lambda: ours["vae"].decode(noise), lambda: ref["vae"].decode(noise).sample),
        "image": (
            lambda: denoise_and_decode(unet_step, ours["vae"].decode, context, noise, args.steps),
            lambda: denoise_and_decode(
                lambda x, t, c: ref["unet"](x, t, encoder_hidden_states=c).sample,
                lambda z: ref["vae"].decode(z).sample,
                context,
                noise,
                args.steps,
            ),
        ),
    }
    rows = []
    with torch.inference_mode():
        for case in selected:
            fns = dict(zip(("minisd", "diffusers"), cases[case], strict=True))
            for fn in fns.values():  # warm-up: kernel choice, allocator growth, first-touch of weight pages
                measure(fn, device)
            seconds = {name: [] for name in fns}
            peak = {name: 0 for name in fns}
            for r in range(args.repeat):
                order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # ABBA: drift hits both alike
                for name in order:
                    s, p = measure(fns[name], device)
                    seconds[name].append(s)
                    peak[name] = max(peak[name], p)
            med = {name: statistics.median(v) for name, v in seconds.items()}
            name = f"image_{args.steps}" if case == "image" else case
            rows.append({"case": name, "seconds": med, "peak": peak, "runs": seconds})
    print_table(rows, args)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    fast = " --fast" if args.fast else ""
    load = f", load average {os.getloadavg()[0]:.1f}" if args.device == "cpu" else ""
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(
        f"minisd vs diffusers: model {args.model}, {args.device}{gpu} {args.dtype}, {args.size}x{args.size} px, "
        f"median of {args.repeat}{fast}; torch {torch.__version__}, {torch.get_num_threads()} threads{load}"
    )
    header = ["case", "minisd s", "diffusers s", "ratio", "minisd MB", "diffusers MB", "ratio"]
    print(" ".join(f"{name:<12}" if i == 0 else f"{name:>12}" for i, name in enumerate(header)))
    for row in rows:
        s, p = row["seconds"], row["peak"]
        mb = {name: v / 2**20 for name, v in p.items()}
        p_ratio = mb["minisd"] / mb["diffusers"] if mb["diffusers"] > 0 else float("nan")
        print(
            f"{row['case']:<12} {s['minisd']:12.4f} {s['diffusers']:12.4f} {s['minisd'] / s['diffusers']:12.3f} "
            f"{mb['minisd']:12.1f} {mb['diffusers']:12.1f} {p_ratio:12.3f}"
        )


def speed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="minisd vs diffusers, side by side on the same random SD v1 weights "
        "(`python -m benchmarks load FILE` times checkpoint loading instead)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32")
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (latents: size/8)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the whole-image case")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per library and case (the median is shown)")
    parser.add_argument("--fast", action="store_true", help="apply minisd.fast to minisd's networks")
    parser.add_argument("--model", choices=["sd-v1", "tiny"], default="sd-v1", help="tiny: smoke tests only")
    parser.add_argument("--cases", default="", help="comma-separated subset of text_encode,unet_step,vae_decode,image")
    return parser
