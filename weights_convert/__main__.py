"""`python -m weights_convert`: inspect SD v1 / SD 2.x weights and convert them between layouts.

    python -m weights_convert info FILE_OR_FOLDER
    python -m weights_convert convert IN OUT_FOLDER        # -> a diffusers-style folder
    python -m weights_convert convert IN OUT.safetensors   # -> minisd's single file (unet.* vae.* text_encoder.*)
    python -m weights_convert export IN OUT.safetensors    # -> the official single-file layout

IN may be an official single file (.safetensors / .ckpt), a minisd single file or a diffusers-style folder.
An existing OUT is never replaced unless --overwrite is given; OUT is written beside, then renamed into place, and
an existing OUT folder keeps every file a conversion does not write. OUT may not be, contain or lie inside IN.
Errors: one line on stderr, exit status 2.
What the model predicts travels with it (a folder's scheduler_config, a minisd file's metadata); an SD 2 single
file does not record it: --prediction-type says it, else the file's name decides (768 = v) and a note says so.
"""

import sys
from pathlib import Path

import torch

from minisd.arguments import DTYPES, ArgumentParser
from minisd.errors import MinisdError
from minisd.samplers.base import PREDICTION_TYPES
from weights_convert.describe import describe
from weights_convert.detect import LAYOUT_NAMES, MINISD_METADATA, join_minisd_file
from weights_convert.files import check_output, write_beside
from weights_convert.folders import cast_floats, prediction_of, read_weights, save_safetensors, write_folder
from weights_convert.official import minisd_to_ldm

# ---------------------------------------------------------------------------------------------------------------
# The three commands (info is describe.describe).


def command_convert(
    src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool, prediction_type: str | None
) -> str:
    to_file = out.suffix == ".safetensors"
    check_output(src, out, overwrite, "file" if to_file else "folder")
    weights = read_weights(src, use_ema)
    layout, variant = weights.info.layout, weights.info.variant
    prediction, note = prediction_of(weights.info, prediction_type, str(src))
    components = {c: cast_floats(sd, dtype) for c, sd in weights.state_dicts.items()}
    if to_file:
        metadata = {**MINISD_METADATA, "minisd.variant": variant, "minisd.prediction_type": prediction}
        write_beside(out, "file", lambda path: save_safetensors(join_minisd_file(components), path, metadata))
        return f"wrote {out} (minisd single file, from the {LAYOUT_NAMES[layout]})" + (
            f"\nnote: {note}" if note else ""
        )
    sample_size = 768 if variant == "v2" and prediction == "v_prediction" else 512  # SD 2's v models: 768 px
    written = []
    write_beside(
        out, "folder", lambda path: written.extend(write_folder(components, path, variant, prediction, sample_size))
    )
    return f"wrote {out}/: {', '.join(written)} (from the {LAYOUT_NAMES[layout]})" + (f"\nnote: {note}" if note else "")


def command_export(src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool) -> str:
    if out.suffix != ".safetensors":
        raise MinisdError(f"OUT must be a .safetensors file path, got {str(out)!r}")
    check_output(src, out, overwrite, "file")
    weights = read_weights(src, use_ema)
    layout = weights.info.layout
    variant = weights.info.variant
    state_dict = minisd_to_ldm(weights.state_dicts, variant=variant, kept=weights.kept)
    state_dict = cast_floats(state_dict, dtype)
    write_beside(out, "file", lambda path: save_safetensors(state_dict, path, {"format": "pt"}))
    family = "SD 2" if variant.startswith("v2") else "SD v1"
    return f"wrote {out} (official {family} layout, {len(state_dict)} tensors, from the {LAYOUT_NAMES[layout]})"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    info = commands.add_parser("info", help="what a weights file or folder holds")
    info.add_argument("path", type=Path, metavar="FILE", help="a weights file or a diffusers-style folder")
    for name, help_text in (
        ("convert", "to a diffusers-style folder, or (OUT ending in .safetensors) minisd's single file"),
        ("export", "to the official single-file layout (.safetensors)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("src", type=Path, metavar="IN", help="official .safetensors/.ckpt, minisd file or folder")
        out_help = "a new folder or .safetensors path" if name == "convert" else "a new .safetensors path"
        command.add_argument("out", type=Path, metavar="OUT", help=out_help)
        command.add_argument("--raw-unet", action="store_true", help="take the non-EMA UNet of a v1-5-pruned file")
        command.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing OUT (in a folder: only the "
                             "files a conversion writes)")  # fmt: skip
        if name == "convert":
            command.add_argument(
                "--prediction-type", choices=PREDICTION_TYPES, help="what an SD 2 single file's model predicts"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            message = describe(args.path)
        else:
            dtype = DTYPES[args.dtype] if args.dtype else None
            if args.command == "convert":
                message = command_convert(
                    args.src, args.out, not args.raw_unet, dtype, args.overwrite, args.prediction_type
                )
            else:
                message = command_export(args.src, args.out, not args.raw_unet, dtype, args.overwrite)
    except (MinisdError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
