"""Read the files torch.save writes (`.ckpt` / `.pt` / `.pth` / `.bin`) through weights_convert.safe_pickle.

Two layouts:
    zip (torch >= 1.6)   <root>/data.pkl (the pickle), <root>/byteorder, <root>/data/<key> (each storage's bytes,
                         stored uncompressed)
    legacy (pre-1.6)     5 pickles back to back (magic number, protocol version, sys info, the object, the storage
                         keys), then each storage as an int64 element count and its bytes, in key order

Storages are never copied: the whole file is memory-mapped once (`torch.UntypedStorage.from_file`, private
copy-on-write pages) and every tensor is a view into it at its record's offset, so pages are read when first used.

A hostile file is refused before it can exhaust memory (each limit far above what real checkpoints use):
- the pickle is at most MAX_PICKLE_BYTES, the zip's central directory at most MAX_DIRECTORY_BYTES; a compressed
  record (torch.save never compresses, but zip allows it) is inflated in bounded pieces, never past its limit;
- legacy pickles are read from the file's first MAX_PICKLE_BYTES held in memory, so an opcode declaring a huge
  string reads what is there instead of allocating what it declares;
- every storage lies inside the file, with a size >= 0.
"""

import io
import lzma
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from minisd.errors import MinisdError
from weights_convert.safe_pickle import FileStorage, SafeUnpickler, check_nesting

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file
# Measured on real files: v1-5-pruned.ckpt's data.pkl is 0.2 MB (1,300 tensors), a full training checkpoint with
# Adam states ~1 MB; its central directory ~0.1 MB.
MAX_PICKLE_BYTES = 16 << 20  # ~1.5 GB of Python objects at worst (a new list and a memo entry per 2 opcode bytes)
MAX_DIRECTORY_BYTES = 16 << 20  # ~200,000 zip records


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _central_directory_size(raw, size: int) -> int:
    """The size in bytes of a zip's central directory, read from its end record (zip64 too), before zipfile parses
    it into one Python object per record."""
    tail_length = min(size, 22 + 0xFFFF)  # the end record (22 bytes) is followed by a comment of up to 64 KiB
    raw.seek(size - tail_length)
    tail = raw.read(tail_length)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise zipfile.BadZipFile("no end of central directory record")
    (directory_size,) = struct.unpack("<I", tail[at + 12 : at + 16])
    locator = tail[at - 20 : at] if at >= 20 else b""
    if directory_size == 0xFFFFFFFF and locator[:4] == b"PK\x06\x07":  # zip64: the real size is in its end record
        (record_offset,) = struct.unpack("<Q", locator[8:16])
        raw.seek(record_offset)
        record = raw.read(56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            raise zipfile.BadZipFile("bad zip64 end of central directory record")
        (directory_size,) = struct.unpack("<Q", record[40:48])
    return directory_size


def _read_record(path: Path, archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A (small) record's bytes, at most `limit` of them: a compressed record is inflated in bounded pieces, never
    past its declared size (zipfile stops there and checks the CRC), so a zip bomb cannot fill the memory."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise MinisdError(f"{path}: record {name} declares {info.file_size} bytes; a checkpoint's is under {limit}")
    with archive.open(info) as record:
        return record.read(limit)


def _zip_records(path: Path, size: int) -> tuple[str, bytes, dict[str, tuple[int, int]]]:
    """The zip's root folder, its data.pkl bytes and {record name: (data offset, nbytes)} of the stored records."""
    with open(path, "rb") as raw:
        directory_size = _central_directory_size(raw, size)
        if directory_size > MAX_DIRECTORY_BYTES:
            raise MinisdError(
                f"{path}: a zip whose central directory declares {directory_size} bytes (a checkpoint's is under "
                f"{MAX_DIRECTORY_BYTES})"
            )
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise MinisdError(f"{path}: a zip file, but not a torch.save checkpoint (no <root>/data.pkl record)")
        root = pkl_names[0][: -len("data.pkl")]
        byteorder = (
            _read_record(path, archive, root + "byteorder", 16)
            if root + "byteorder" in archive.namelist()
            else b"little"
        )
        if byteorder != b"little":
            raise MinisdError(
                f"{path}: big-endian checkpoints are not supported (byteorder record: {byteorder[:16]!r})"
            )
        records = {}
        for info in archive.infolist():
            if not info.filename.startswith(root + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise MinisdError(
                    f"{path}: record {info.filename} is compressed; torch.save stores records uncompressed"
                )
            raw.seek(info.header_offset)
            header = raw.read(30)  # zip local file header: name and extra-field lengths at bytes 26 and 28
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise MinisdError(f"{path}: corrupt zip (bad local header of {info.filename})")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            if offset + info.file_size > size:
                raise MinisdError(f"{path}: truncated file (record {info.filename} ends past the end of the file)")
            records[info.filename[len(root + "data/") :]] = (offset, info.file_size)
        return root, _read_record(path, archive, pkl_names[0], MAX_PICKLE_BYTES), records


def _storage_lookup(path: Path, mapped: torch.UntypedStorage, locate):
    """A `storages(key, dtype, numel)` function for SafeUnpickler; `locate(key) -> (offset, nbytes)` in the file."""
    cache: dict[str, FileStorage] = {}

    def storages(key: str, dtype: torch.dtype, numel: int) -> FileStorage:
        if key not in cache:
            offset, nbytes = locate(key)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if numel * itemsize > nbytes:
                raise MinisdError(f"{path}: storage {key} holds {nbytes} bytes, the pickle expects {numel * itemsize}")
            cache[key] = FileStorage(mapped[offset : offset + numel * itemsize], dtype, numel)
        elif cache[key].dtype != dtype:
            raise MinisdError(f"{path}: storage {key} is used with two dtypes ({cache[key].dtype}, {dtype})")
        return cache[key]

    return storages


def _load_zip(path: Path, mapped: torch.UntypedStorage, size: int):
    _, data_pkl, records = _zip_records(path, size)

    def locate(key: str) -> tuple[int, int]:
        if key not in records:
            raise MinisdError(f"{path}: the pickle refers to storage record data/{key}, which the zip lacks")
        return records[key]

    return SafeUnpickler(io.BytesIO(data_pkl), path, _storage_lookup(path, mapped, locate)).load()


def _load_legacy(path: Path, mapped: torch.UntypedStorage, size: int):
    """Pre-1.6 torch.save layout: 5 pickles (magic, version, sys info, object, storage keys), then each storage as
    an int64 element count and its bytes, in key order. Two passes: the first learns each storage's dtype.

    The pickles are read from the file's first MAX_PICKLE_BYTES held in memory: a pickle opcode declaring a
    huge string then reads what is there instead of allocating what it declares."""
    dtypes: dict[str, torch.dtype] = {}

    def scan(key: str, dtype: torch.dtype, numel: int) -> FileStorage:
        dtypes[key] = dtype
        return FileStorage(None, dtype, numel)  # rebuild_tensor returns None for these

    with open(path, "rb") as file:
        head = io.BytesIO(file.read(MAX_PICKLE_BYTES))
        magic = SafeUnpickler(head, path, None).load()
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch.save file (neither a zip nor the legacy magic number)")
        for _ in range(2):  # protocol version, sys info
            SafeUnpickler(head, path, None).load()
        object_start = head.tell()
        SafeUnpickler(head, path, scan).load()
        keys = SafeUnpickler(head, path, None).load()
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise MinisdError(f"{path}: legacy torch file with a malformed storage key list")
        file.seek(head.tell())
        locations = {}
        for key in keys:
            header = file.read(8)
            if len(header) < 8:
                raise MinisdError(f"{path}: truncated file (storage {key:.40} is missing)")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * torch.empty(0, dtype=dtypes.get(key, torch.uint8)).element_size()
            if numel < 0:
                raise MinisdError(f"{path}: storage {key:.40} declares a negative size ({numel} elements)")
            if file.tell() + nbytes > size:
                raise MinisdError(f"{path}: truncated file (storage {key:.40} ends past the end of the file)")
            locations[key] = (file.tell(), nbytes)
            file.seek(nbytes, os.SEEK_CUR)
        head.seek(object_start)

        def locate(key: str) -> tuple[int, int]:
            if key not in locations:
                raise MinisdError(f"{path}: the pickle refers to storage {key:.40}, which the file lacks")
            return locations[key]

        return SafeUnpickler(head, path, _storage_lookup(path, mapped, locate)).load()


def safe_load(path: str | os.PathLike):
    """Unpickle a torch.save file (zip, or pre-1.6 legacy) without running code from it; tensors view a memory map.

    Returns the pickled object (for an SD `.ckpt`: a dict with "state_dict", "global_step", ...), harmless
    non-tensor objects replaced by `Stub`s. Raises a one-line MinisdError for anything else.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)  # MAP_PRIVATE, read lazily
        result = _load_zip(path, mapped, size) if zipfile.is_zipfile(path) else _load_legacy(path, mapped, size)
        check_nesting(result, path)
        return result
    except MinisdError:
        raise
    except OSError as error:
        raise MinisdError(f"{path}: cannot read ({error.strerror or _one_line(error)})") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, RuntimeError, struct.error, UnicodeDecodeError, RecursionError, NotImplementedError,
            OverflowError, zlib.error, lzma.LZMAError) as error:  # fmt: skip
        raise MinisdError(f"{path}: cannot read as a PyTorch checkpoint ({_one_line(error)})") from None
