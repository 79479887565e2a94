"""The command line's Kandinsky 2.2 side: `minisd generate|img2img|inpaint --model <a Kandinsky decoder>` and
`minisd regenerate` of the PNGs it writes. minisd/cli.py parses the arguments and hands over here when the weights
are Kandinsky's (their model_index.json says so).

    minisd img2img "cat wizard, gandalf" --image cat.png --model kandinsky-community/kandinsky-2-2-decoder
    minisd inpaint "a black cat" --image inpaint.png --mask inpaint_mask.png \\
        --model kandinsky-community/kandinsky-2-2-decoder-inpaint --negative-prompt "bad anatomy"

Defaults are diffusers': 100 decoder steps (DDPM), guidance 4, 25 prior steps, prior guidance 4, 512 × 512 (input
images are resized to it), img2img strength 0.3. The prior is the one the decoder's README names, or --prior.
The PNG names the decoder and prior by hub id or folder name (no paths); `regenerate` finds them again in the
Hugging Face cache or --models-dir, and takes the source images again (--image, --mask).
"""

import sys

import torch

from minisd.arguments import DTYPES
from minisd.errors import MinisdError
from minisd.images import open_image
from minisd.kandinsky.api import Kandinsky, KandinskyParameters, is_kandinsky_text, record_name
from minisd.kandinsky.loading import AUTO, is_kandinsky
from minisd.kandinsky.pipelines.common import DECODER_SAMPLERS
from minisd.loading import check_device
from minisd.locate import find_weights
from minisd.parameters import draw_seed

__all__ = ["add_arguments", "generate", "is_kandinsky", "is_kandinsky_text", "regenerate"]  # what minisd/cli.py uses
DEFAULTS = {"steps": 100, "guidance": 4.0, "sampler": "DDPM", "size": 512, "strength": 0.3}


def add_arguments(command, name: str, positive_int, number) -> None:
    """The options only Kandinsky 2.2 reads, on the generate / img2img / inpaint commands."""
    group = command.add_argument_group("Kandinsky 2.2 (--model a Kandinsky decoder)")
    group.add_argument("--prior", metavar="ID|DIR", help="the prior (default: the one the decoder's README names)")
    group.add_argument("--prior-steps", type=positive_int, default=25, help="prior sampling steps (25)")
    group.add_argument("--prior-guidance", type=number, default=4.0, help="the prior's guidance scale (4)")
    if name != "generate":  # the output size (generate has --height/--width for every model)
        group.add_argument("--height", type=positive_int, help="pixels, a multiple of 64 (512; the image is resized)")
        group.add_argument("--width", type=positive_int, help="pixels, a multiple of 64 (512)")


def check(args) -> None:
    """Options that mean nothing for Kandinsky 2.2: one line rather than silently ignored."""
    if args.clip_skip is not None:
        raise MinisdError("--clip-skip is an SD option; Kandinsky 2.2's prior reads its text encoder's last layer")
    if args.eta:
        raise MinisdError("--eta is an SD option (A1111's Eta DDIM and Eta); Kandinsky 2.2's DDPM and DDIM take none")
    if args.fast:
        raise MinisdError("--fast applies to SD v1's networks, not Kandinsky 2.2's")
    sd_only = [option for option, value in (
        ("--schedule-type", args.schedule_type), ("--timestep-spacing", args.timestep_spacing),
        ("--guidance-rescale", args.guidance_rescale), ("--vae-tiling", args.vae_tiling),
        ("--paste-unmasked", args.paste_unmasked), ("--grid", args.grid),
    ) if value]  # fmt: skip
    if sd_only:
        raise MinisdError(f"{', '.join(sd_only)}: SD v1 options, not Kandinsky 2.2's")
    if args.sampler is not None and args.sampler not in DECODER_SAMPLERS:
        raise MinisdError(
            f"--sampler must be one of {', '.join(DECODER_SAMPLERS)} for Kandinsky 2.2, got {args.sampler!r}"
        )


def load(
    source: str, prior: str | None, dtype: str | None, device: str | None, status, cached_only: bool = False
) -> Kandinsky:
    status.phase(f"loading {source}")
    pipe = Kandinsky.from_pretrained(source, prior=prior or AUTO, dtype=DTYPES[dtype] if dtype else None,
                                     device=device or "cpu", local_files_only=cached_only)  # fmt: skip
    status.done(f"loaded {source} with the prior {pipe.prior}")
    return pipe


def generate(args, source: str, status, save, output_paths) -> None:
    """`minisd generate|img2img|inpaint` with a Kandinsky 2.2 decoder: one image at a time, each written at once."""
    check(args)
    strength = 1.0 if args.command != "img2img" else DEFAULTS["strength"] if args.strength is None else args.strength
    # the source images are opened once, here: a missing, special or oversized file fails before loading
    image = None if args.image is None else open_image("--image", args.image)
    mask = None if args.mask is None else open_image("--mask", args.mask)
    seed = args.seed if args.seed is not None else draw_seed()
    paths = output_paths(args.output, args.num_images)
    pipe = load(source, args.prior, args.dtype, args.device, status)
    shared = {
        "negative_prompt": args.negative_prompt, "height": args.height or DEFAULTS["size"],
        "width": args.width or DEFAULTS["size"], "num_inference_steps": args.steps or DEFAULTS["steps"],
        "guidance_scale": DEFAULTS["guidance"] if args.guidance is None else args.guidance,
        "prior_num_inference_steps": args.prior_steps, "prior_guidance_scale": args.prior_guidance,
        "sampler": args.sampler or DEFAULTS["sampler"],
    }  # fmt: skip
    for i, path in enumerate(paths):
        label = f"image {i + 1}/{args.num_images}"
        status.phase(label)
        if args.command == "generate":
            output = pipe(args.prompt, seed=seed + i, **shared)
        elif args.command == "img2img":
            output = pipe.img2img(args.prompt, image, strength, seed=seed + i, **shared)
        else:
            output = pipe.inpaint(args.prompt, image, mask, seed=seed + i, **shared)
        status.done(f"{label}: prior, decoder and MoVQ done")
        save(output.images[0], output.parameters[0], path, args.overwrite)
    if args.seed is None:
        print(f"seed {seed} was drawn (--seed {seed} repeats this run)", file=sys.stderr)


def regenerate(args, text: str, status, save, output_paths, weights_source) -> None:
    """`minisd regenerate` of a Kandinsky 2.2 PNG: the decoder and prior it names, found again by name
    (minisd/locate.py: a hub id in the Hugging Face cache, a folder in --models-dir), or --model / --prior."""
    params = KandinskyParameters.from_text(text)
    models_dirs = args.models_dir or []
    if args.model is not None or args.checkpoint is not None:
        source, cached_only = weights_source(args), False
    else:
        source, cached_only = find_weights(params.model_name, None, models_dirs)
    prior = args.prior
    if prior is None and params.prior is not None:
        prior = find_weights(params.prior, None, models_dirs)[0]
    sources = params.source_images(args.image, args.mask)  # before loading: a missing or changed image fails fast
    dtype = args.dtype or params.dtype
    if dtype is not None and dtype not in DTYPES:
        raise MinisdError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = args.device or params.device
    if device is not None:
        check_device(device, "--device" if args.device else f"{args.png}'s Device parameter")
    if params.threads is not None and (device or "cpu").startswith("cpu"):
        torch.set_num_threads(params.threads)  # the CPU's float sums depend on how the work is split
    pipe = load(source, prior, dtype, device, status, cached_only)
    params.prior, params.model_name = record_name(pipe.prior), pipe.model_name
    params.dtype, params.device = str(pipe.dtype).removeprefix("torch."), pipe.device.type
    params.threads = torch.get_num_threads() if pipe.device.type == "cpu" else None
    status.phase("regenerating")
    pil = pipe.generate(params, *sources)  # the images read once, above
    status.done("regenerated: prior, decoder and MoVQ done")
    save(pil, params, next(output_paths(args.output, 1)), args.overwrite)
