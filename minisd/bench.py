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
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# SD v1.5's diffusers configs (stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hub), enough for
# from_single_file to build the pipeline offline. Keys left out take diffusers' / transformers' defaults.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
CONFIGS = {
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL",
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
}


def write_sd_v1_config_folder(folder: str | os.PathLike) -> Path:
    """A diffusers-style SD v1 folder without weights: model_index.json, the component configs and the tokenizer
    files (from minisd's packaged vocabulary). What `from_single_file(config=folder)` needs offline."""
    from minisd.tokenizer import Tokenizer

    folder = Path(folder)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    for name, config in CONFIGS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config, indent=2))
    Tokenizer.from_default().backend.model.save(str(folder / "tokenizer"))  # vocab.json, merges.txt
    return folder


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


def main(argv: list[str] | None = None) -> None:
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
