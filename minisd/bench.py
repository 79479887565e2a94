"""Benchmarks. `python -m minisd.bench load FILE`: loading time and peak memory, minisd vs diffusers.

Each loader runs in its own fresh Python process, so neither inherits the other's imports or memory:
    minisd     load_components(FILE)
    diffusers  StableDiffusionPipeline.from_single_file(FILE, config=<local SD v1 config folder>)  (offline)
Each child reports
    load      seconds from the call to usable modules (imports excluded),
    +read     the same plus reading every weight page once (a strided sum): minisd's parameters are views of
              the memory-mapped file, so its pages are read on first use; this column includes that cost,
    peak RSS  resource.getrusage(RUSAGE_SELF).ru_maxrss of the child at the end, file-backed pages included.
The file should sit in the page cache for both (the first, discarded warm-up run reads it). The issue's target:
minisd loads a .safetensors in at most half diffusers' time, with peak RSS at most 1.1 × the file size.

`python -m minisd.bench [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size 512] [--steps 50] [--fast]`:
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
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_sd_v1_config_folder(folder: str | os.PathLike) -> Path:
    """A diffusers-style SD v1 folder without weights (model_index.json, the component configs, the tokenizer
    files): what `from_single_file(config=folder)` needs offline. The same configs `python -m weights_convert
    convert` writes, read off SD v1's shapes on the meta device."""
    from minisd.clip import TextEncoder, TextEncoderConfig
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import VAE, VAEConfig
    from weights_convert.folders import write_configs

    with torch.device("meta"):
        components = {
            "unet": UNet(UNetConfig()).state_dict(),
            "vae": VAE(VAEConfig()).state_dict(),
            "text_encoder": TextEncoder(TextEncoderConfig()).state_dict(),
        }
    write_configs(components, Path(folder))
    return Path(folder)


def _read_every_page(modules) -> None:
    """Touch every 4 KiB page of every parameter once (a strided sum), as a first forward pass would."""
    with torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                flat = tensor.reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].float().sum()


def _child(loader: str, path: str, config_folder: str) -> dict:
    """Runs in the child process: load once, time it, then read every page; report as a dict."""
    if loader == "minisd":
        from minisd.loading import load_components

        start = time.perf_counter()
        components = load_components(path)
        load_s = time.perf_counter() - start
        modules = [components.unet, components.vae, components.text_encoder]
    else:
        import diffusers  # the reference: imported only here, in its own process

        diffusers.utils.logging.disable_progress_bar()
        pipeline_class = diffusers.StableDiffusionPipeline  # diffusers imports lazily: import before the clock
        start = time.perf_counter()
        pipe = pipeline_class.from_single_file(path, config=config_folder, local_files_only=True)
        load_s = time.perf_counter() - start
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
    _read_every_page(modules)
    read_s = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"load_s": load_s, "read_s": read_s, "peak_rss": peak_rss}


def _run_child(loader: str, path: str, config_folder: str) -> dict:
    command = [sys.executable, "-m", "minisd.bench", "_child", loader, path, config_folder]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{loader} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_load(path: str, repeat: int) -> None:
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory() as config_folder:
        write_sd_v1_config_folder(config_folder)
        _run_child("minisd", path, config_folder)  # warm-up: brings the file into the page cache
        results = {"minisd": [], "diffusers": []}
        for _ in range(repeat):  # alternate, so drift in machine load hits both
            for loader in results:
                results[loader].append(_run_child(loader, path, config_folder))
    best = {loader: min(runs, key=lambda r: r["load_s"]) for loader, runs in results.items()}
    print(f"file: {path}  ({size / 1e9:.2f} GB)   best of {repeat} per loader, each in a fresh process")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (timings are only as quiet as that)")
    print(f"{'':10} {'load s':>8} {'+read s':>8} {'peak RSS GB':>12} {'RSS/file':>9}")
    for loader, r in best.items():
        print(
            f"{loader:10} {r['load_s']:8.2f} {r['read_s']:8.2f} {r['peak_rss'] / 1e9:12.2f} {r['peak_rss'] / size:9.2f}"
        )
    ours, ref = best["minisd"], best["diffusers"]
    ratios = {key: ours[key] / ref[key] for key in ours}
    print(
        f"minisd / diffusers: load {ratios['load_s']:.2f}x, load+read {ratios['read_s']:.2f}x, "
        f"peak RSS {ratios['peak_rss']:.2f}x"
    )


# ---- speed: minisd vs diffusers, one process, same weights ---------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
        "text_encoder": CLIPTextModel(CLIPTextConfig(**asdict(text_config), hidden_act="quick_gelu")),
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

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
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
        prog="python -m minisd.bench",
        description="minisd vs diffusers, side by side on the same random SD v1 weights "
        "(`python -m minisd.bench load FILE` times checkpoint loading instead)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (latents: size/8)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the whole-image case")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per library and case (the median is shown)")
    parser.add_argument("--fast", action="store_true", help="apply minisd.fast to minisd's networks")
    parser.add_argument("--model", choices=["sd-v1", "tiny"], default="sd-v1", help="tiny: smoke tests only")
    parser.add_argument("--cases", default="", help="comma-separated subset of text_encode,unet_step,vae_decode,image")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("load", "_child"):
        bench_speed(speed_parser().parse_args(argv))
        return
    parser = argparse.ArgumentParser(prog="python -m minisd.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="load time and peak RSS, minisd vs diffusers, on one SD v1 file")
    load.add_argument("file")
    load.add_argument("--repeat", type=int, default=2, help="runs per loader (the best is shown)")
    child = commands.add_parser("_child")  # internal: one measurement in a fresh process
    child.add_argument("loader", choices=["minisd", "diffusers"])
    child.add_argument("file")
    child.add_argument("config_folder")
    args = parser.parse_args(argv)
    if args.command == "load":
        bench_load(args.file, args.repeat)
    else:
        print(json.dumps(_child(args.loader, args.file, args.config_folder)))


if __name__ == "__main__":
    main()
