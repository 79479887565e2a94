"""Textual-inversion embedding files: every common format -> one name and its vectors (n, d).

A textual-inversion "embedding" is n learned rows of the text encoder's token table (Gal et al. 2022,
arXiv:2208.01618): d = 768 for SD v1's CLIP ViT-L (1024 for SD 2.x's OpenCLIP, 64 for minisd's nano model).

    format                              where it comes from               what the file holds
    learned_embeds.bin                  sd-concepts-library, diffusers'   {"<cat-toy>": (d,) or (n, d)}  (a pickle)
                                        textual_inversion.py
    learned_embeds.safetensors          diffusers (safe_serialization)    {"<cat-toy>": (d,) or (n, d)}
    name.pt                             AUTOMATIC1111 (A1111) training    {"string_to_param": {"*": (n, d)},
                                                                          "string_to_token": {"*": 265}, "name": …,
                                                                          "step": …, "sd_checkpoint": …}  (a pickle)
    name.safetensors                    A1111, civitai                    {"emb_params": (n, d)}

Pickles go through weights_convert.safe_pickle (never torch.load): a file that asks for anything but tensors, dicts,
numbers and strings is refused in one line. The name a file suggests is its key (diffusers), its "name" entry (A1111
.pt), or for "emb_params" files, which carry none, the file's stem (A1111 names every embedding by its file stem).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_state_dict
from weights_convert.torch_save import safe_load

A1111_KEY = "emb_params"  # the one key of A1111's .safetensors embeddings
MAX_VECTORS = 75  # one prompt chunk holds 75 tokens: an embedding of more vectors could never be used whole


@dataclass
class Embedding:
    """What an embedding file holds: the name it suggests, its vectors (n, d) and which format it was."""

    name: str
    vectors: Tensor  # (n, d), in the file's dtype
    format: str  # "diffusers", "a1111-pt", "a1111-safetensors"


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Read a textual-inversion file in any of the formats above; a one-line MinisdError for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        data: object = read_state_dict(path)
    elif suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise MinisdError(f"{path}: no such file")
        data = safe_load(path)
    else:
        raise MinisdError(f"{path}: an embedding is a .pt, .bin or .safetensors file, got {suffix or 'no extension'!r}")
    try:
        name, vectors, kind = _name_and_vectors(data, path)
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None
    if vectors.dim() == 1:
        vectors = vectors[None]  # one vector (d,) -> (1, d)
    if vectors.dim() != 2 or not vectors.is_floating_point() or not 1 <= len(vectors) <= MAX_VECTORS:
        raise MinisdError(
            f"{path}: an embedding is 1 to {MAX_VECTORS} float vectors (n, d), got {vectors.dtype} "
            f"{tuple(vectors.shape)}"
        )
    return Embedding(name, vectors.detach(), kind)


def _name_and_vectors(data: object, path: Path) -> tuple[str, Tensor, str]:
    if not isinstance(data, dict) or not data:
        raise MinisdError(f"not a textual-inversion embedding (holds a {type(data).__name__})")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # (a ParameterDict in files of torch <= 1.11)
        if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), Tensor):
            raise MinisdError("string_to_param must hold one tensor (A1111 embeddings have one placeholder '*')")
        name = data.get("name")
        return (name if isinstance(name, str) and name else path.stem), next(iter(params.values())), "a1111-pt"
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(data) == 1 and len(tensors) == 1:
        key, vectors = next(iter(tensors.items()))
        if key == A1111_KEY:
            return path.stem, vectors, "a1111-safetensors"
        return str(key), vectors, "diffusers"
    if {"clip_l", "clip_g"} <= set(data):
        raise MinisdError("this is an SDXL embedding (clip_l and clip_g vectors); SD v1 has one text encoder")
    keys = ", ".join(map(str, list(data)[:4]))
    raise MinisdError(
        f"not a textual-inversion embedding: expected one tensor (diffusers), string_to_param (A1111 .pt) or "
        f"{A1111_KEY} (A1111 .safetensors); found {len(data)} entries ({keys})"
    )
