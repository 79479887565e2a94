"""One weights file -> {name: tensor} with every float already in the dtype the networks will hold, read one tensor
at a time: what the loader uses when a dtype is asked for (float32 on the CPU, bfloat16 for low memory).

Why not convert the memory-mapped views (weights_convert.files)? Reading a mapped view makes its pages resident,
and they stay counted in the process's memory while the file is mapped, i.e. until the last view is dropped. An
fp16 SD v1 file converted to bfloat16 that way peaks at both: 2.1 GB of file pages + 2.1 GB of copies. Here each
tensor is read with a plain `readinto` (the bytes go through the page cache, which the kernel may evict, not into
the process) into a buffer of the file's dtype, converted, and the buffer dropped: the peak is the converted
weights plus the largest single tensor (the 49408 × 768 token embedding).

A .safetensors file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}} and the raw bytes, `begin`/`end` counted from the end of the header. The file is
first opened by weights_convert.files (safetensors checks the header and that every tensor lies inside the file;
a bad file gets its one-line error there), so only the offsets are read here.

torch.save pickles (.ckpt) are read through their memory map (the unpickled tensors are views of it): each view is
converted, then the file pages under it are handed back to the kernel (madvise MADV_DONTNEED; the map is private
and never written, so a later read would simply fetch them from the file again). The peak is then the same as for
.safetensors: the converted weights plus about one tensor.
"""

import ctypes
import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.files import SAFETENSORS_SUFFIXES, read_state_dict


def read_converted(path: str | os.PathLike, dtype: torch.dtype) -> dict[str, Tensor]:
    """Read a weights file: {name: tensor} on the CPU, floating tensors in `dtype`, integer ones as in the file,
    from a .safetensors file each in its own memory (no view of a mapped file). Errors as
    weights_convert.files.read_state_dict's."""
    path = Path(path)
    mapped = read_state_dict(path)  # checks the file; views of its map give names, shapes, dtypes (no data read)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        state_dict, mappings = {}, file_mappings(path)
        for name, view in mapped.items():
            state_dict[name] = view.to(dtype) if view.is_floating_point() else view
            if state_dict[name] is not view:  # a copy was made: the file's pages behind the view can go
                release_pages(view, mappings)
        return state_dict
    state_dict = {}
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))  # {name: {"dtype", "shape", "data_offsets"}, "__metadata__"}
        for name, view in mapped.items():
            begin, end = header[name]["data_offsets"]
            raw = torch.empty(view.shape, dtype=view.dtype)  # the file's dtype; its bytes, flat, receive the read
            file.seek(8 + header_size + begin)
            if file.readinto(raw.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise MinisdError(f"{path}: {name} is cut short (the file is truncated)")
            state_dict[name] = raw.to(dtype) if raw.is_floating_point() else raw  # the file-dtype buffer is dropped
    return state_dict


MADV_DONTNEED = 4  # Linux's value (sys/mman.h): "I will not need these pages; drop them"


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges [begin, end) where this process maps `path` (Linux's /proc/self/maps; elsewhere none)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges, name = [], str(path.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:  # "begin-end perms offset dev inode   pathname"
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == name:
                begin, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((begin, end))
    return ranges


def release_pages(view: Tensor, mappings: list[tuple[int, int]]) -> None:
    """Hand back to the kernel the file pages under `view`'s storage, if they lie inside one of `mappings` (the
    file's own map: never memory anything else owns). Whole pages go, a neighbour's share of the first and last one
    too: that neighbour reads them from the file again when it is converted, so nothing is lost, only re-read."""
    storage = view.untyped_storage()
    page = os.sysconf("SC_PAGE_SIZE")
    start = storage.data_ptr() // page * page
    end = -(-(storage.data_ptr() + storage.nbytes()) // page) * page
    if end > start and any(begin <= start and end <= stop for begin, stop in mappings):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
