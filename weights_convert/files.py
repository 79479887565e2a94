"""One weights file -> a flat {name: tensor} state dict, memory-mapped, never running code from the file.

`.safetensors` through safetensors' own memory map; `.ckpt` / `.pt` / `.pth` / `.bin` (torch.save pickles) through
weights_convert.torch_save (the file) and safe_pickle (the pickle). Tensors are views of the mapped file: nothing is
read until used, nothing copied.
"""

import os
from pathlib import Path

import safetensors
from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.torch_save import safe_load

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a weights file: {name: tensor} in the file's dtypes, on CPU, memory-mapped.

    A torch.save checkpoint may hold the tensors at its top level or under "state_dict" (Lightning `.ckpt`).
    Raises a one-line MinisdError for a missing, empty, truncated or corrupt file, a directory, or an unknown
    extension.
    """
    path = Path(path)
    if path.is_dir():
        raise MinisdError(f"{path} is a directory; read_state_dict wants one weights file (.safetensors or .ckpt)")
    if not path.is_file():
        raise MinisdError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise MinisdError(
            f"{path}: unknown weights file extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise MinisdError(f"{path} is empty (0 bytes): an interrupted download?")
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    return _read_pickle(path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safetensors.safe_open(path, framework="pt") as file:  # memory-mapped; tensors view the map
            return {name: file.get_tensor(name) for name in file.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        detail = " ".join(str(error).split())
        raise MinisdError(f"{path}: not a valid safetensors file, truncated or corrupt ({detail})") from None


def _read_pickle(path: Path) -> dict[str, Tensor]:
    checkpoint = safe_load(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning .ckpt: {"state_dict": ..., "global_step": ..., ...}
    if not isinstance(checkpoint, dict):
        raise MinisdError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict of tensors")
    not_tensors = [name for name, value in checkpoint.items() if not isinstance(value, Tensor)]
    if not_tensors or not all(isinstance(name, str) for name in checkpoint):
        shown = ", ".join(map(str, not_tensors[:5]))
        raise MinisdError(f"{path}: not a flat state dict of tensors ({len(not_tensors)} entries are not: {shown})")
    return dict(checkpoint)
