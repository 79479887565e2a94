"""The command line's options for what users bring (minisd/additions.py): --vae, --lora FILE[:WEIGHT], --embedding
FILE, and A1111's folders --embeddings DIR and --lora-dir DIR; checked before the model loads, applied after."""

import argparse
from pathlib import Path

from minisd.errors import MinisdError
from minisd.lora import lora_tags


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--vae", metavar="FILE|ID", help="a separate VAE: a file, a folder or a hub id")
    command.add_argument("--lora", metavar="FILE[:WEIGHT]", action="append", default=[],
                         help="apply a LoRA at WEIGHT (1), to every image; repeatable")  # fmt: skip
    command.add_argument("--embedding", metavar="FILE", action="append", default=[],
                         help="a textual-inversion embedding; type its name in the prompt; repeatable")  # fmt: skip
    command.add_argument("--embeddings", metavar="DIR", help="A1111's embeddings folder: a file's name in a "
                         "prompt or negative prompt loads it")  # fmt: skip
    command.add_argument("--lora-dir", metavar="DIR", help="A1111's Lora folder for <lora:name:WEIGHT> in the "
                         "prompt")  # fmt: skip


def lora_argument(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] -> (FILE, WEIGHT); weight 1 when none is given.

    >>> lora_argument("ink.safetensors:0.8"), lora_argument("ink.safetensors")
    (('ink.safetensors', 0.8), ('ink.safetensors', 1.0))
    """
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0  # a colon that is part of the file name


def check(args: argparse.Namespace) -> list[tuple[str, float]]:
    """What must fail before loading: the --lora arguments (returned as (file, weight)), the prompt's <lora:…> tags,
    missing files, --fast with LoRAs."""
    loras = [lora_argument(text) for text in args.lora]
    lora_tags(args.prompt)
    for path in [*args.embedding, *(path for path, _ in loras)]:
        if not Path(path).is_file():
            raise MinisdError(f"{path}: no such file")
    if args.fast and (loras or args.lora_dir):
        raise MinisdError("--fast networks take no LoRA (fused QKV, prepacked convs): drop --fast or the LoRAs")
    return loras


def apply(pipe, args: argparse.Namespace, loras: list[tuple[str, float]]) -> bool:
    """Load the embeddings and LoRAs, name the folders; True when anything beyond the model's own words and weights
    may be used (an embedding, a LoRA, a folder or a <lora:…> tag)."""
    for path in args.embedding:
        pipe.load_textual_inversion(path)
    for path, weight in loras:
        pipe.load_lora_weights(path, weight)
    if args.embeddings is not None:
        pipe.use_embeddings_folder(args.embeddings)
    if args.lora_dir is not None:
        pipe.use_lora_folder(args.lora_dir)
    extras = (args.embedding, loras, args.embeddings, args.lora_dir, lora_tags(args.prompt)[1])
    return any(bool(x) for x in extras)
