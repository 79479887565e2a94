"""One weights file -> a flat {name: tensor} state dict, memory-mapped, never running code from the file; and the
safe way to write converted weights (`check_output`, `write_beside`).

`.safetensors` through safetensors' own memory map; `.ckpt` / `.pt` / `.pth` / `.bin` (torch.save pickles) through
weights_convert.torch_save (the file) and safe_pickle (the pickle). Tensors are views of the mapped file: nothing is
read until used, nothing copied.
"""

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors
from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.detect import ROUTES
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
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MinisdError(f"{path}: no such file") from None
    except OSError as error:
        raise MinisdError(f"{path}: cannot read ({error.strerror})") from None
    if stat.S_ISDIR(mode):
        raise MinisdError(f"{path} is a directory; read_state_dict wants one weights file (.safetensors or .ckpt)")
    if not stat.S_ISREG(mode):
        raise MinisdError(f"{path} is not a regular file (a pipe, socket or device): weights are read from files")
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise MinisdError(
            f"{path}: unknown weights file extension {suffix or '(none)'!r}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise MinisdError(f"{path} is empty (0 bytes): an interrupted download?")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # the readers below report it as missing, or crash
    except OSError as error:
        raise MinisdError(f"{path}: cannot read ({error.strerror})") from None
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
    if "string_to_param" in checkpoint:  # AUTOMATIC1111's embedding .pt (weights_convert/embeddings.py reads it)
        raise MinisdError(f"{path}: this is {ROUTES['embedding']}; it is not a weights file")
    not_tensors = [name for name, value in checkpoint.items() if not isinstance(value, Tensor)]
    if not_tensors or not all(isinstance(name, str) for name in checkpoint):
        shown = ", ".join(map(str, not_tensors[:5]))
        raise MinisdError(f"{path}: not a flat state dict of tensors ({len(not_tensors)} entries are not: {shown})")
    return dict(checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# Writing: never over the input, never deleting what this run did not write


def check_output(src: Path, out: Path, overwrite: bool, kind: str) -> None:
    """Refuse an OUT (kind "file" or "folder") that would destroy input or unrelated data, before any work: OUT
    equal to IN, containing IN or inside an IN folder; an existing OUT without `overwrite`; an existing OUT of the
    other kind or of neither (a folder where a file goes, a FIFO); a missing parent folder."""
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real:
        raise MinisdError(f"IN and OUT are the same path ({out}); write to a new path")
    if out_real in src_real.parents:
        raise MinisdError(f"OUT {out} contains IN {src}: writing OUT must not touch the input; name a new folder")
    if src.is_dir() and src_real in out_real.parents:
        raise MinisdError(f"OUT {out} is inside the IN folder {src}: write it elsewhere")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MinisdError(f"{out} already exists; pass --overwrite to replace it")
        found = "folder" if out.is_dir() else "file" if out.is_file() else "special file"
        if found != kind:
            raise MinisdError(f"{out} is a {found}; --overwrite replaces a {kind} with a {kind} only")
    if not out.parent.is_dir():
        raise MinisdError(f"the folder {out.parent} for OUT does not exist")


def write_beside(out: Path, kind: str, write: Callable[[Path], None]) -> None:
    """`write(path)` makes the new file or folder at a temporary path beside OUT, which then takes OUT's place
    (os.replace: atomic for a file). A failed or interrupted write leaves OUT as it was and removes only its own
    temporary path. An existing OUT folder keeps every file this run did not write: the new files replace their
    namesakes one by one, after checking that none of them lands on a folder."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        new = temporary / out.name
        write(new)
        if kind == "file" or not out.exists():
            os.replace(new, out)
            return
        written = sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
        blocked = [str(rel) for rel in written if (out / rel).is_dir() or any(
            (out / parent).exists() and not (out / parent).is_dir() for parent in rel.parents)]  # fmt: skip
        if blocked:
            raise MinisdError(f"{out}: cannot write {', '.join(blocked[:3])}: in the way is a folder or a file")
        for rel in written:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(new / rel, out / rel)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
