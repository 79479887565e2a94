"""`python -m benchmarks picture FILE`: a whole picture from an SD v1 single file, each runner in its own process.

What a user pays for one `minisd generate` (or one diffusers pipeline call) from a fresh start: the load, the
picture (text encoding, --steps guided DDIM steps, the decode), and the peak resident memory of the process
(resource.getrusage's ru_maxrss: everything, file pages included). One fresh Python process per runner, so none
inherits another's memory:
    minisd float32 / bfloat16 / fast   StableDiffusion.from_pretrained(FILE, dtype=..., fast=...)
    diffusers float32 / bfloat16       StableDiffusionPipeline.from_single_file(FILE, config=<local SD v1 config
                                       folder>, torch_dtype=...) with DDIMScheduler (offline)
Both draw the same prompt at the same size from the same seed; "max diff" is each picture's largest pixel difference
(0-255) from the first runner's (minisd float32 by default). The peak of a picture does not grow with the step
count (each step frees its activations), so `--steps 2` measures memory in minutes; times per step are speed.py's.
"""

import os
import resource
import tempfile
import time

import torch

PROMPT = "a photograph of an astronaut riding a horse"
RUNNERS = {  # name: (library, dtype, fast)
    "minisd float32": ("minisd", "float32", False),
    "minisd bfloat16": ("minisd", "bfloat16", False),
    "minisd --fast": ("minisd", None, True),
    "diffusers float32": ("diffusers", "float32", False),
    "diffusers bfloat16": ("diffusers", "bfloat16", False),
}


def child(runner: str, path: str, config_folder: str, steps: int, size: int, out: str) -> dict:
    """Runs in the child process: load, draw one picture, save it to `out`; report times and peak RSS."""
    library, dtype_name, fast = RUNNERS[runner]
    dtype = getattr(torch, dtype_name) if dtype_name else None
    if library == "minisd":
        from minisd.api import StableDiffusion

        start = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(path, dtype=dtype, fast=fast)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - start
        image = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, sampler="DDIM", seed=1).images[0]
    else:
        import diffusers  # the reference: imported only here, in its own process

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        pipeline_class, scheduler_class = diffusers.StableDiffusionPipeline, diffusers.DDIMScheduler  # import first
        start = time.perf_counter()
        pipe = pipeline_class.from_single_file(path, config=config_folder, torch_dtype=dtype, local_files_only=True)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - start
        generator = torch.Generator().manual_seed(1)
        image = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator).images[0]
    total_s = time.perf_counter() - start
    image.save(out)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"load_s": load_s, "picture_s": total_s - load_s, "peak_rss": peak_rss}


def bench_picture(path: str, steps: int, size: int, runners: list[str]) -> list[dict]:
    from PIL import Image

    from benchmarks.load import run_child, write_sd_v1_config_folder
    from benchmarks.speed import cpu_description, load_line

    if not os.path.isfile(path):
        raise SystemExit(f"python -m benchmarks picture: {path}: no such file (an SD v1 .safetensors or .ckpt)")
    unknown = [name for name in runners if name not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown runner(s) {unknown}; choose from {list(RUNNERS)}")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_sd_v1_config_folder(folder)
        for runner in runners:  # one at a time: each child has the machine's memory to itself
            out = os.path.join(folder, runner.replace(" ", "_") + ".png")
            rows.append(
                {
                    "runner": runner,
                    "png": out,
                    **run_child("_picture", runner, path, folder, str(steps), str(size), out),
                }
            )
        pixels = {row["runner"]: torch.tensor(list(Image.open(row["png"]).getdata())).float() for row in rows}
    size_bytes = os.path.getsize(path)
    first = pixels[rows[0]["runner"]]
    print(f"file: {path} ({size_bytes / 2**30:.2f} GiB); {size}x{size} px, {steps} DDIM steps, one process per runner")
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(load_line(load_before, os.getloadavg()))
    print(f"{'runner':<20} {'load s':>8} {'picture s':>10} {'peak RSS GiB':>13} {'max diff':>9}")
    for row in rows:
        row["max_diff"] = (pixels[row["runner"]] - first).abs().max().item()
        print(
            f"{row['runner']:<20} {row['load_s']:8.1f} {row['picture_s']:10.1f} {row['peak_rss'] / 2**30:13.2f} "
            f"{row['max_diff']:9.0f}"
        )
    return rows
