"""`python -m weights_convert`: inspect SD v1 weights and convert them between layouts.

    python -m weights_convert info FILE_OR_FOLDER
    python -m weights_convert convert IN OUT_FOLDER        # -> a diffusers-style folder
    python -m weights_convert convert IN OUT.safetensors   # -> minisd's single file (unet.* vae.* text_encoder.*)
    python -m weights_convert export IN OUT.safetensors    # -> the official single-file layout

IN may be an official single file (.safetensors / .ckpt), a minisd single file or a diffusers-style folder.
An existing OUT is never replaced unless --overwrite is given. Errors: one line on stderr, exit status 2.
"""

import shutil
import sys
from pathlib import Path

import torch

from minisd.arguments import DTYPES, ArgumentParser
from minisd.errors import MinisdError
from weights_convert.detect import LAYOUT_NAMES, MINISD_METADATA, join_minisd_file
from weights_convert.folders import cast_floats, describe, read_weights, save_safetensors, write_folder
from weights_convert.keymap_ldm import minisd_to_ldm


def _check_out(src: Path, out: Path, overwrite: bool, want_file: bool) -> None:
    """Refuse a bad OUT before any work is done (an existing OUT stays until the new data is ready)."""
    if want_file and out.suffix != ".safetensors":
        raise MinisdError(f"OUT must be a .safetensors file path, got {str(out)!r}")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise MinisdError(f"IN and OUT are the same path ({out}); write to a new path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MinisdError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise MinisdError(f"the folder {out.parent} for OUT does not exist")


def _remove(out: Path) -> None:
    """Delete an existing OUT (only reached with --overwrite), just before writing the new one."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()


# ---------------------------------------------------------------------------------------------------------------
# The three commands (info is folders.describe).


def command_convert(src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool) -> str:
    to_file = out.suffix == ".safetensors"
    _check_out(src, out, overwrite, want_file=False)
    weights = read_weights(src, use_ema)
    layout = weights.info.layout
    components = {c: cast_floats(sd, dtype) for c, sd in weights.state_dicts.items()}
    _remove(out)
    if to_file:
        variant = "v1-inpainting" if components["unet"]["conv_in.weight"].shape[1] == 9 else "v1"
        save_safetensors(join_minisd_file(components), out, {**MINISD_METADATA, "minisd.variant": variant})
        return f"wrote {out} (minisd single file, from the {LAYOUT_NAMES[layout]})"
    written = write_folder(components, out)
    return f"wrote {out}/: {', '.join(written)} (from the {LAYOUT_NAMES[layout]})"


def command_export(src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool) -> str:
    _check_out(src, out, overwrite, want_file=True)
    weights = read_weights(src, use_ema)
    layout = weights.info.layout
    state_dict = cast_floats(minisd_to_ldm(weights.state_dicts, model_ema_scalars=weights.ema_scalars), dtype)
    _remove(out)
    save_safetensors(state_dict, out, {"format": "pt"})
    return f"wrote {out} (official SD v1 layout, {len(state_dict)} tensors, from the {LAYOUT_NAMES[layout]})"


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
        command.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            message = describe(args.path)
        else:
            run = command_convert if args.command == "convert" else command_export
            dtype = DTYPES[args.dtype] if args.dtype else None
            message = run(args.src, args.out, not args.raw_unet, dtype, args.overwrite)
    except (MinisdError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
