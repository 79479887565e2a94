"""`minisd` (also `python -m minisd`): generate images from the command line.

    minisd generate "a watercolour fox" --checkpoint v1-5-pruned-emaonly.safetensors --steps 25 --seed 1 -o fox.png
    minisd img2img "a fox in winter" --image fox.png --strength 0.6 --model stable-diffusion-v1-5/stable-diffusion-v1-5
    minisd inpaint "a red hat" --image fox.png --mask hat-mask.png --checkpoint sd-v1-5-inpainting.ckpt
    minisd generate "a lighthouse at dusk" --checkpoint v2-1_768-ema-pruned.safetensors   # SD 2.1: 768 px, v
    minisd info v1-5-pruned-emaonly.safetensors      # what a file, folder or hub id holds
    minisd regenerate fox.png --models-dir models/     # the same image again, from the parameters in the PNG

Weights: --checkpoint FILE, or --model ID_OR_FOLDER (a hub id through the Hugging Face cache, or a diffusers
folder; a Kandinsky 2.2 decoder: see minisd/kandinsky/cli.py); SD v1 or SD 2.x (ε or v: an SD 2 file does not say;
--prediction-type, else its name decides, 768 = v, and a "note:" line says so). What users bring: --vae FILE|ID,
--lora FILE[:WEIGHT] (repeatable), --embedding FILE (repeatable; type its name), and A1111's folders --embeddings
DIR (a file's name typed in a prompt) and --lora-dir DIR (<lora:name:0.8>). PNGs hold A1111's "parameters" text;
without -o they go to outputs/00001.png, 00002.png, ... An existing file is never replaced without --overwrite: a
fresh name is taken and printed instead. With --num-images N, image i uses seed + i and goes to its own file
(OUT-1.png ... OUT-N.png with -o OUT.png); --grid adds one picture of them all. `regenerate` finds the weights the
PNG names by name and hash (minisd/locate.py), and its embeddings, LoRAs and VAE the same way.
Bad arguments or files: one line on stderr, exit status 2. Progress goes to stderr when it is a terminal.
"""

import argparse
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from minisd import __version__, additions_cli
from minisd.api import StableDiffusion, default_model
from minisd.arguments import DTYPES, ArgumentParser, number, positive_int
from minisd.errors import MinisdError
from minisd.hashes import hash_matches
from minisd.images import make_grid, open_image, read_png_parameters, save_png
from minisd.kandinsky import cli as kandinsky_cli
from minisd.loading import HUB_ID, check_device
from minisd.locate import find_vae, find_weights
from minisd.parameters import GenerationParameters, check_fields, draw_seed, parse_parameters
from minisd.samplers import sampler_names
from minisd.samplers.base import PREDICTION_TYPES
from minisd.samplers.schedule import SPACINGS
from minisd.samplers.sigmas import SCHEDULE_TYPES

OUTPUT_DIR = Path("outputs")
MAX_IMAGES = 10_000  # --num-images: each image is written as it is made, but a run should end this year
MAX_GRID = 100  # --grid: the images of one run in one picture (100 SD v1 images: 26 M pixels)
MODES = {"generate": "txt2img", "img2img": "img2img", "inpaint": "inpaint"}  # command -> GenerationParameters.mode
NUMBERED = re.compile(r"^(\d{5,})")  # outputs/00042.png, 00042-cat.png, ...
NO_WEIGHTS = (
    "no weights named: pass --checkpoint FILE (.safetensors/.ckpt) or --model ID_OR_FOLDER "
    "(e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5, or a diffusers folder)"
)


# ---------------------------------------------------------------------------------------------------------------
# Status on stderr


class Status:
    """One status line on a terminal (`loading v1-5.safetensors ... (2.1 s)`); the denoising steps get the API's tqdm
    bar. Silent when `stream` is not a terminal (logs and pipes get only the results), unless live=True."""

    def __init__(self, stream=None, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.start = time.perf_counter()

    def write(self, text: str, end: str = "") -> None:
        if self.live:
            self.stream.write(f"\r\033[K{text}{end}")
            self.stream.flush()

    def phase(self, text: str) -> None:
        """Start a step (loading, hashing, an image)."""
        self.start = time.perf_counter()
        self.write(f"{text} ...", end="\n")

    def done(self, text: str) -> None:
        self.write(f"{text} ({time.perf_counter() - self.start:.1f} s)", end="\n")


# ---------------------------------------------------------------------------------------------------------------
# Argument checks made before anything is loaded


def check_args(args) -> None:
    """What must fail before the weights load: the device, the dtype and the output path. The weights and image
    files are checked where they are read; every range (size, strength, seed, ...) by the pipeline's checks
    (minisd/pipelines/checks.py), in their words."""
    if args.dtype is not None and args.dtype not in DTYPES:
        raise MinisdError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.device is not None:
        check_device(args.device, "--device")
    if args.output is not None:
        check_output(args.output)


def check_output(output: str) -> None:
    if Path(output).is_dir():
        return
    if Path(output).suffix.lower() != ".png" or (Path(output).exists() and not Path(output).is_file()):  # a FIFO
        raise MinisdError(f"-o must be a .png file or an existing folder, got {output!r}")
    if not Path(output).parent.is_dir():
        raise MinisdError(f"-o: the folder {str(Path(output).parent)!r} does not exist")


def weights_source(args) -> str:
    """--checkpoint FILE or --model ID_OR_FOLDER, else the shipped default model, else a one-line hint."""
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            path = Path(args.checkpoint)
            what = "no such file" if not path.exists() else "not a regular file (a pipe, socket or device)"
            what = "a folder (use --model for diffusers folders)" if path.is_dir() else what
            raise MinisdError(f"--checkpoint {args.checkpoint!r}: {what}")
        return args.checkpoint
    if args.model is not None:
        if not Path(args.model).is_dir() and not HUB_ID.match(args.model):
            raise MinisdError(f"--model must be a hub id 'org/name' or a diffusers folder, got {args.model!r}")
        return args.model
    model = default_model()
    if model is None:
        raise MinisdError(NO_WEIGHTS)
    return str(model)


def load(source: str, dtype: str | None, device: str | None, fast: bool, status: Status, cached_only: bool = False,
         vae: str | None = None, prediction_type: str | None = None) -> StableDiffusion:  # fmt: skip
    status.phase(f"loading {source}")
    dtype = DTYPES[dtype] if dtype else None
    with warnings.catch_warnings(record=True) as caught:  # what loading assumed: one "note:" line each
        warnings.simplefilter("always")
        pipe = StableDiffusion.from_pretrained(
            source, dtype=dtype, device=device or "cpu", fast=fast, local_files_only=cached_only, vae=vae,
            prediction_type=prediction_type,
        )  # fmt: skip
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    pipe.set_progress_bar_config(disable=not status.live)  # the steps' bar on a terminal only, as the status lines
    status.done(f"loaded {source}")
    if Path(source).is_file():
        status.phase("hashing the weights file (A1111's model hash)")
        status.done(f"model hash {pipe.model_hash}")
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Output files


def next_numbered(folder: Path) -> Path:
    """folder/00001.png, or one past the highest number there (A1111's numbering)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := NUMBERED.match(p.name))]
    return folder / f"{max(numbers, default=0) + 1:05d}.png"


def output_paths(output: str | None, n: int) -> Iterator[Path]:
    """Where n images go, one path at a time: -o FILE (FILE-1.png ... with n > 1), -o FOLDER or outputs/ (numbered).
    Nothing is created here: outputs/ is made when the first image is written (see save)."""
    if output is None or Path(output).is_dir():
        folder = OUTPUT_DIR if output is None else Path(output)
        first = int(NUMBERED.match(next_numbered(folder).name).group(1))
        return (folder / f"{first + i:05d}.png" for i in range(n))
    path = Path(output)
    return iter([path]) if n == 1 else (path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(n))


def write_png(pil, path: Path, text: str | None, overwrite: bool) -> Path:
    """Save; an existing path (without overwrite) gets a fresh name path-1.png, path-2.png, ... Returns the path."""
    candidate, k = path, 0
    while True:
        try:
            save_png(pil, candidate, text, overwrite=overwrite)  # refuses an existing file unless overwrite
            break
        except MinisdError:
            if overwrite or not candidate.exists():
                raise
        except OSError as error:  # permissions, a full disk: about the output path, not a bug
            raise MinisdError(f"cannot write {candidate}: {error.strerror or error}") from None
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    if candidate != path:
        print(f"note: {path} exists, wrote {candidate} instead (--overwrite replaces)", file=sys.stderr)
    return candidate


def save(pil, params: GenerationParameters, path: Path, overwrite: bool) -> Path:
    """Write one image with its parameters and print where it went."""
    text = params.text()
    if type(params).from_text(text) != params:
        print(
            "note: the prompt cannot be written exactly in A1111's format (spaces at a line's ends, or a line "
            "starting 'Negative prompt:'); regenerate will use the recorded text",
            file=sys.stderr,
        )
    if params.sampler == "DDPM":
        print("note: A1111 has no DDPM sampler: it reads this PNG's Sampler as its default sampler", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)  # outputs/, on the first image (-o folders exist already)
    written = write_png(pil, path, text, overwrite)
    print(f"{written}  seed {params.seed}")
    return written


# ---------------------------------------------------------------------------------------------------------------
# Commands


def command_generate(args, status: Status) -> None:
    source = weights_source(args)
    if kandinsky_cli.is_kandinsky(source):  # its model_index.json names a Kandinsky 2.2 pipeline
        return kandinsky_cli.generate(args, source, status, save, output_paths)
    if args.prior is not None or (args.command != "generate" and (args.height or args.width)):
        raise MinisdError("--prior, and --height/--width with an input image, are Kandinsky 2.2 options")
    args.steps = args.steps or 50  # SD v1's default (the sampler's: the model's, see StableDiffusion.sampler)
    if args.command != "generate" and args.strength is None:
        args.strength = 0.8 if args.command == "img2img" else 1.0
    if args.grid and args.num_images > MAX_GRID:
        raise MinisdError(f"--grid takes at most {MAX_GRID} images (--num-images), got {args.num_images}")
    # the source images are opened once, here: a missing, special or oversized file fails before loading
    image = None if args.image is None else open_image("--image", args.image)
    mask = None if args.mask is None else open_image("--mask", args.mask)
    seed = args.seed if args.seed is not None else draw_seed()
    loras = additions_cli.check(args)  # a bad --lora or <lora:…> tag fails before loading
    paths = output_paths(args.output, args.num_images)
    pipe = load(source, args.dtype, args.device, args.fast, status, vae=args.vae, prediction_type=args.prediction_type)
    added = additions_cli.apply(pipe, args, loras)
    params, sources = pipe.parameters(
        MODES[args.command], args.prompt, args.negative_prompt, args.steps, args.guidance, args.sampler, args.eta,
        args.clip_skip, height=args.height, width=args.width, strength=args.strength, image=image,
        mask_image=mask, schedule_type=args.schedule_type, timestep_spacing=args.timestep_spacing,
        guidance_rescale=args.guidance_rescale, vae_tiling=args.vae_tiling, paste_unmasked=args.paste_unmasked,
    )  # fmt: skip
    written = []
    for i, path in enumerate(paths):  # one image at a time, so each is written as soon as it is made
        label = f"image {i + 1}/{args.num_images}"
        written.append(make_image(pipe, params, sources, seed + i, path, args.overwrite, status, label))
    if args.grid and len(written) > 1:
        grid = make_grid([open_image("image", p) for p in written], rows=max(1, round(math.sqrt(len(written)))))
        grid_path = written[0].with_name(f"{written[0].stem}-grid.png")
        print(f"{write_png(grid, grid_path, None, args.overwrite)}  grid of {len(written)} images")
    from minisd.train.evaluate import prompt_note  # the nano model's grammar: a note for prompts outside it

    note = None if added else prompt_note(source, args.prompt)  # after the run: a refusal stays the only line
    if note is not None:
        print(note, file=sys.stderr)
    if args.seed is None:
        print(f"seed {seed} was drawn (--seed {seed} repeats this run)", file=sys.stderr)


def command_regenerate(args, status: Status) -> None:
    text = read_png_parameters(args.png)
    if not text:
        raise MinisdError(f"{args.png} holds no 'parameters' text: not written by minisd or A1111 (or a grid)")
    try:  # a text too long, malformed or out of range: one line naming the file
        fields = parse_parameters(text)
        params = None if kandinsky_cli.is_kandinsky_text(text) else GenerationParameters.from_text(text)
    except MinisdError as error:
        raise MinisdError(f"{args.png}: {error}") from None
    if params is None:
        return kandinsky_cli.regenerate(args, text, status, save, output_paths, weights_source)
    if args.prior is not None:
        raise MinisdError("--prior is a Kandinsky 2.2 option; this PNG's parameters are a Stable Diffusion image's")
    unknown = check_fields(fields)
    if unknown:
        print(f"note: fields minisd does not know, not used: {', '.join(unknown)}", file=sys.stderr)
    cached_only = False
    if args.checkpoint is not None or args.model is not None:
        source = weights_source(args)
    else:
        source, cached_only = find_weights(params.model_name, params.model_hash, args.models_dir or [])
    sources = params.source_images(args.image, args.mask)  # before loading: a missing image fails fast
    dtype = args.dtype or params.dtype
    if dtype is not None and dtype not in DTYPES:
        raise MinisdError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = args.device or params.device
    if device is not None:
        check_device(device, "--device" if args.device else f"{args.png}'s Device parameter")
    if params.threads is not None and (device or "cpu").startswith("cpu"):
        torch.set_num_threads(params.threads)  # the CPU's float sums depend on how the work is split
    vae = None if params.vae is None else find_vae(params.vae, params.vae_hash, args.models_dir or [])
    prediction_type = args.prediction_type or params.prediction_type  # an SD 2 file does not record it: the PNG does
    pipe = load(source, dtype, device, args.fast or params.fast, status, cached_only, vae, prediction_type)
    if params.model_hash is not None and Path(source).is_file() and not hash_matches(params.model_hash, source):
        raise MinisdError(f"{source} has model hash {pipe.model_hash}, the PNG was made with {params.model_hash}")
    pipe.additions.restore(params, args.models_dir or [])  # its embeddings and LoRAs, found by name and hash
    params.model_name = pipe.model_name  # as loaded now (the same unless overridden)
    params.model_hash = pipe.model_hash  # A1111's 10 digits, also where the PNG held its old 8
    params.dtype, params.device = str(pipe.dtype).removeprefix("torch."), pipe.device.type
    params.threads = torch.get_num_threads() if pipe.device.type == "cpu" else None  # also where A1111 wrote none
    path = next(output_paths(args.output, 1))
    make_image(pipe, params, sources, params.seed, path, args.overwrite, status, "regenerating")


def make_image(pipe, params, sources, seed: int, path: Path, overwrite: bool, status: Status, label: str) -> Path:
    """One image of `params` from `seed` (pipe.run, where the mode picks the pipeline), saved with its record."""
    status.phase(label)
    output = pipe.run(params, sources, seed, 1)
    status.done(f"{label}: sampled and decoded")
    return save(output.images[0], output.parameters[0], path, overwrite)


def command_info(args) -> None:
    from minisd.loading import hub_snapshot
    from weights_convert.describe import describe

    path = Path(args.source)
    if not path.exists() and HUB_ID.match(args.source):
        path = hub_snapshot(args.source, None, local_files_only=False)
    print(describe(path))


# ---------------------------------------------------------------------------------------------------------------
# The parser


def add_weights_args(command) -> None:
    weights = command.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE", help="a single weights file (.safetensors, .ckpt)")
    weights.add_argument("--model", metavar="ID|DIR", help="a Hugging Face hub id or a diffusers folder")
    command.add_argument(
        "--dtype",
        help=f"one of {', '.join(DTYPES)} (default: float32 on the CPU, bfloat16 with --fast where the CPU has it; "
        "the file's on a GPU)",
    )
    command.add_argument("--device", help="cpu (default), cuda, cuda:1, mps")
    command.add_argument(
        "--fast",
        action="store_true",
        help="minisd.fast: on the CPU bfloat16 where it has AVX-512 BF16 or AMX (unless --dtype; ~1-2 %% change in "
        "each network's output) and weights prepacked for oneDNN, on a GPU channels_last; fused QKV everywhere. "
        "The same picture up to rounding, recorded in the PNG (Fast, Dtype)",
    )
    sd2_help = "what an SD 2 single file's model predicts (default: its name decides, 768 = v_prediction)"
    command.add_argument("--prediction-type", choices=PREDICTION_TYPES, help=sd2_help)
    command.add_argument("-o", "--output", metavar="OUT", help="a .png path or a folder (default: outputs/, numbered)")
    command.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def add_generation_args(command, name: str) -> None:
    command.add_argument("prompt", help="the prompt (A1111 emphasis: (word:1.2), [word], BREAK)")
    if name != "generate":
        command.add_argument("--image", required=True, help="the source image (sides multiples of 8, at most "
                             "16 times the model's own area)")  # fmt: skip
    if name == "inpaint":
        command.add_argument("--mask", required=True, help="the mask, the image's size (white = repaint)")
        command.add_argument(
            "--paste-unmasked", action="store_true", help="keep the image's own pixels outside the mask"
        )
    command.add_argument("--negative-prompt", default="", help="what to steer away from")
    command.add_argument("--steps", type=positive_int, help="sampling steps (50; Kandinsky 2.2: 100)")
    command.add_argument("--guidance", type=number, help="classifier-free guidance scale (default: the model's, "
                         "7.5 for SD v1)")  # fmt: skip
    command.add_argument("--guidance-rescale", type=number, default=0.0, help="φ of Lin et al. 2023, in [0, 1] (0)")
    command.add_argument("--sampler", help=f"one of: {', '.join(sampler_names())} (default: a diffusers folder's "
                         "scheduler, else PLMS; Kandinsky 2.2: DDPM)")  # fmt: skip
    schedules = ", ".join(SCHEDULE_TYPES)
    command.add_argument("--schedule-type", metavar="TYPE", help=f"the σ samplers' schedule: {schedules} or "
                         "Automatic (A1111's choice for the sampler) (default: Uniform)")  # fmt: skip
    command.add_argument("--timestep-spacing", choices=SPACINGS, help="diffusers' spacing of the timesteps (not with "
                         "SGM Uniform) (default: leading for DDPM, DDIM, PLMS; linspace for the others)")  # fmt: skip
    command.add_argument("--eta", type=number, help="DDIM's eta (default 0), or Euler a's / DPM++ 2M SDE's (1)")
    command.add_argument("--seed", type=int, help="random seed (default: drawn, then printed)")
    command.add_argument("--clip-skip", type=int, help="CLIP layers skipped at the end (A1111's Clip skip 2 = 1)")
    command.add_argument("--vae-tiling", action="store_true", help="decode in 512-pixel tiles (large images)")
    command.set_defaults(height=None, width=None, strength=None, image=None, mask=None, paste_unmasked=False)
    if name == "generate":
        size = (
            "pixels, a multiple of 8 (default: the model's size, 512 for SD v1, 64 for the nano model); width × "
            "height at most 16 times the model's own area (2048×2048 for SD v1, 256×256 for the nano model)"
        )
        command.add_argument("--height", type=positive_int, help=size)
        command.add_argument("--width", type=positive_int, help=size)
    else:
        default = "0.8; Kandinsky 2.2: 0.3" if name == "img2img" else "1"
        command.add_argument("--strength", type=number, help=f"in (0, 1] ({default})")
    command.add_argument("--num-images", type=partial(positive_int, most=MAX_IMAGES), default=1,
                         help=f"images, seed, seed+1, ... (1; at most {MAX_IMAGES})")  # fmt: skip
    command.add_argument("--grid", action="store_true", help="with --num-images: also one picture of them all (at "
                         f"most {MAX_GRID} images)")  # fmt: skip


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="minisd", description=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"minisd {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, help_text in (
        ("generate", "text to image"),
        ("img2img", "redraw an image following a prompt"),
        ("inpaint", "repaint the white part of a mask"),
    ):
        command = commands.add_parser(name, help=help_text)
        add_generation_args(command, name)
        add_weights_args(command)
        additions_cli.add_arguments(command)
        kandinsky_cli.add_arguments(command, name, positive_int, number)
    regenerate = commands.add_parser("regenerate", help="make a PNG minisd or A1111 wrote again, from its parameters")
    regenerate.add_argument("png", help="a PNG with A1111's 'parameters' text (minisd's, or A1111's own)")
    regenerate.add_argument("--models-dir", metavar="DIR", type=Path, action="append", help="where to look for the "
                            "weights, embeddings, LoRAs and VAE the PNG names, by hash or name (repeat)")  # fmt: skip
    regenerate.add_argument("--image", help="the source image of an img2img or inpaint PNG (checked by its hash)")
    regenerate.add_argument("--mask", help="the mask of an inpaint PNG (checked by its hash)")
    add_weights_args(regenerate)
    regenerate.add_argument("--prior", metavar="ID|DIR", help="Kandinsky 2.2: another prior than the recorded one")
    explain = commands.add_parser("explain", help='a local web page that steps through one run (needs ".[web]")')
    weights = explain.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE", help="a single weights file (default: the nano model)")
    weights.add_argument("--model", metavar="ID|DIR", help="a Hugging Face hub id or a diffusers folder")
    explain.add_argument("--device", help="cpu (default), cuda, cuda:1, mps")
    explain.add_argument("--port", type=partial(positive_int, most=65535), default=7860,
                         help="http://127.0.0.1:PORT (7860)")  # fmt: skip
    explain.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    info = commands.add_parser("info", help="what a weights file, diffusers folder or hub id holds")
    info.add_argument("source", metavar="FILE_OR_ID", help="a .safetensors/.ckpt file, a diffusers folder or a hub id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = Status()
    try:
        if args.command == "info":
            command_info(args)
        elif args.command == "explain":
            from minisd.explain import launch

            launch(weights_source(args), args.device, args.port, open_browser=not args.no_browser)
        elif args.command == "regenerate":
            if args.output is not None:
                check_output(args.output)
            command_regenerate(args, status)
        else:
            check_args(args)
            command_generate(args, status)
    except MinisdError as error:
        print(f"minisd: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nminisd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
