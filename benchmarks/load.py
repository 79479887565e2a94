"""`python -m benchmarks load FILE`: loading time and peak memory, minisd vs diffusers.

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
"""

import json
import os
import resource
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


def child(loader: str, path: str, config_folder: str) -> dict:
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


def run_child(command: str, runner: str, *args: str) -> dict:
    """`python -m benchmarks <command> <runner> <args>` in a fresh process (also picture.py's): the JSON dict its
    last line of output prints."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", command, runner, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{runner} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_load(path: str, repeat: int) -> None:
    if not os.path.isfile(path):
        raise SystemExit(f"python -m benchmarks load: {path}: no such file (an SD v1 .safetensors or .ckpt)")
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory() as config_folder:
        write_sd_v1_config_folder(config_folder)
        run_child("_child", "minisd", path, config_folder)  # warm-up: brings the file into the page cache
        results = {"minisd": [], "diffusers": []}
        for _ in range(repeat):  # alternate, so drift in machine load hits both
            for loader in results:
                results[loader].append(run_child("_child", loader, path, config_folder))
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
