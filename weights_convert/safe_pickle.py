"""Read PyTorch `.ckpt` / `.pt` / `.bin` files without running any code from them.

Why this exists: `torch.load(path, weights_only=True)` refuses the official Stable Diffusion v1 `.ckpt` files
(diffusers issue #8874: `v1-5-pruned-emaonly.ckpt` raises UnpicklingError), because besides the tensors they pickle
a few harmless Lightning training objects, e.g. the class `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`
as a key of the `callbacks` dict. `torch.load(weights_only=False)` would accept them, but it runs whatever the file
asks for: a pickle can call `os.system`. This module is the third way: an allow-list unpickler.

How a checkpoint pickle rebuilds a tensor (torch.save, zip format):

    torch._utils._rebuild_tensor_v2(
        persistent_id(("storage", torch.FloatStorage, "<key>", "cpu", numel)),  # bytes in record data/<key>
        storage_offset, size, stride, requires_grad, OrderedDict())

Every `module.name` global the pickle names goes through `find_class`, which hands back only:
- our own tensor builders for `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` (they check their arguments
  and view the file's bytes; they never call torch's functions with values from the file),
- a dtype token for `torch.<Type>Storage`, the real `collections.OrderedDict` and `builtins.set`, a latin-1-only
  `_codecs.encode`,
- an inert `Stub` class for the harmless training objects old checkpoints carry (Lightning callbacks, numpy scalars
  and dtypes): it records the pickled name and ignores its arguments and state, the real class is never imported,
and raises a one-line `MinisdError` naming the global and the file for anything else (`os.system`, `builtins.eval`,
`subprocess.Popen`, ...). BUILD (`__setstate__`) is honoured only on stubs and OrderedDicts, whose state is dropped.

Storages are never copied: the whole file is memory-mapped once (`torch.UntypedStorage.from_file`, private
copy-on-write pages) and every tensor is a view into it at its record's offset, so pages are read when first used.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import ClassVar

import torch

from minisd.errors import MinisdError

# torch.<Name>Storage -> element dtype (the pickle names the typed storage class; its dtype is the tensor's dtype).
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Harmless non-tensor objects found in old SD checkpoints, replaced by inert stubs. Sources: the official v1 `.ckpt`
# files (Lightning 1.4 `callbacks` dict), AUTOMATIC1111 modules/safe.py and ComfyUI comfy/utils.py allow-lists.
STUBBED_GLOBALS = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.dtypes", "Float64DType"),
    ("numpy.dtypes", "Float32DType"),
    ("numpy.dtypes", "Int64DType"),
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 (non-zip) torch.save file


class Stub:
    """Inert stand-in for a harmless object pickled in a checkpoint: keeps the pickled name, ignores everything else.

    The unpickler makes one subclass per pickled name (`stub_class`), so the class can also serve as a dict key,
    as Lightning's `callbacks` dict uses it. Calling it, NEWOBJ and BUILD all end here and do nothing.
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<stub of {self.pickled_name}>"


_STUB_CLASSES: dict[str, type] = {}


def stub_class(full_name: str) -> type:
    """The Stub subclass standing for `full_name` (one per name, so unpickled class keys compare equal).

    >>> stub = stub_class("numpy.dtype")("f8", False, True)  # called like the real class; nothing runs
    >>> stub, stub_class("numpy.dtype") is type(stub)
    (<stub of numpy.dtype>, True)
    """
    if full_name not in _STUB_CLASSES:
        _STUB_CLASSES[full_name] = type("Stub", (Stub,), {"pickled_name": full_name})
    return _STUB_CLASSES[full_name]


class StorageType:
    """What `torch.FloatStorage` etc. unpickle to: just the dtype. Not callable, so REDUCE on it fails."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class FileStorage:
    """One storage record of the file: an untyped view into the memory map, plus its dtype and element count."""

    def __init__(self, untyped: torch.UntypedStorage | None, dtype: torch.dtype, numel: int):
        self.untyped, self.dtype, self.numel = untyped, dtype, numel


def codecs_encode(text, encoding="latin1"):
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 text -> bytes, nothing else.

    >>> codecs_encode("\\x00\\xff", "latin1")
    b'\\x00\\xff'
    """
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


def _is_int_tuple(value) -> bool:
    return type(value) is tuple and all(type(x) is int and x >= 0 for x in value)


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None) -> torch.Tensor:
    """Our `torch._utils._rebuild_tensor_v2`: a view of `storage` at size/stride; hooks and metadata are dropped."""
    if not isinstance(storage, FileStorage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 expects a storage record as first argument")
    if storage.untyped is None:
        return None  # first pass over a legacy file: only the storages' dtypes are being collected
    if (
        type(storage_offset) is not int
        or not _is_int_tuple(size)
        or not _is_int_tuple(stride)
        or len(size) != len(stride)
    ):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 got a bad layout: offset {storage_offset!r}, size {size!r}")
    if type(requires_grad) is not bool:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got a non-bool requires_grad")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else storage_offset
    if storage_offset < 0 or (all(size) and last >= storage.numel):
        raise pickle.UnpicklingError(f"tensor of size {size} at offset {storage_offset} overruns its storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> torch.Tensor:
    """Our `torch._utils._rebuild_parameter(_with_state)`: the plain tensor inside an nn.Parameter."""
    if not isinstance(data, torch.Tensor | None):
        raise pickle.UnpicklingError("_rebuild_parameter expects a tensor")
    return data


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 pickles written by Python 2 name builtins this way
    ("_codecs", "encode"): codecs_encode,
}


class SafeUnpickler(pickle._Unpickler):
    """Allow-list unpickler (the pure-Python one, so BUILD can be restricted too).

    `storages(key, dtype, numel)` returns the FileStorage of a record; `path` names the file in errors.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path, storages):
        super().__init__(file)
        self.path, self.storages = path, storages

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if (module, name) in STUBBED_GLOBALS:
            return stub_class(f"{module}.{name}")
        raise MinisdError(
            f"{self.path}: refusing to unpickle global {module}.{name!s}: only tensors and known harmless checkpoint "
            "objects are allowed (no code from the file is run); convert the file with a tool you trust"
        )

    def persistent_load(self, pid):
        # ("storage", torch.FloatStorage, key, location, numel[, view_metadata]); location is ignored: all loads
        # go to CPU memory first.
        ok = type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"
        if not ok or not isinstance(pid[1], StorageType) or type(pid[2]) is not str or type(pid[4]) is not int:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-1.0 torch) are not supported")
        return self.storages(pid[2], pid[1].dtype, pid[4])

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Stub | collections.OrderedDict):
            raise pickle.UnpicklingError(f"BUILD (__setstate__) on a {type(inst).__name__} is not allowed")
        del state  # stubs keep no state; an OrderedDict's __dict__ (torch's `_metadata`) is not needed

    dispatch[pickle.BUILD[0]] = load_build


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _zip_records(path: Path, size: int) -> tuple[str, bytes, dict[str, tuple[int, int]]]:
    """The zip's root folder, its data.pkl bytes and {record name: (data offset, nbytes)} of the stored records."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise MinisdError(f"{path}: a zip file, but not a torch.save checkpoint (no <root>/data.pkl record)")
        root = pkl_names[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder") if root + "byteorder" in archive.namelist() else b"little"
        if byteorder != b"little":
            raise MinisdError(f"{path}: big-endian checkpoints are not supported (byteorder record: {byteorder!r})")
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
        return root, archive.read(pkl_names[0]), records


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
    an int64 element count and its bytes, in key order. Two passes: the first learns each storage's dtype."""
    dtypes: dict[str, torch.dtype] = {}

    def scan(key: str, dtype: torch.dtype, numel: int) -> FileStorage:
        dtypes[key] = dtype
        return FileStorage(None, dtype, numel)  # rebuild_tensor returns None for these

    with open(path, "rb") as file:
        for _ in range(3):  # magic number, protocol version, sys info
            SafeUnpickler(file, path, None).load()
        object_start = file.tell()
        SafeUnpickler(file, path, scan).load()
        keys = SafeUnpickler(file, path, None).load()
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise MinisdError(f"{path}: legacy torch file with a malformed storage key list")
        locations = {}
        for key in keys:
            header = file.read(8)
            if len(header) < 8:
                raise MinisdError(f"{path}: truncated file (storage {key} is missing)")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * torch.empty(0, dtype=dtypes.get(key, torch.uint8)).element_size()
            locations[key] = (file.tell(), nbytes)
            if file.tell() + nbytes > size:
                raise MinisdError(f"{path}: truncated file (storage {key} ends past the end of the file)")
            file.seek(nbytes, os.SEEK_CUR)
        file.seek(object_start)

        def locate(key: str) -> tuple[int, int]:
            if key not in locations:
                raise MinisdError(f"{path}: the pickle refers to storage {key}, which the file lacks")
            return locations[key]

        return SafeUnpickler(file, path, _storage_lookup(path, mapped, locate)).load()


def safe_load(path: str | os.PathLike):
    """Unpickle a torch.save file (zip, or pre-1.6 legacy) without running code from it; tensors view a memory map.

    Returns the pickled object (for an SD `.ckpt`: a dict with "state_dict", "global_step", ...), harmless
    non-tensor objects replaced by `Stub`s. Raises a one-line MinisdError for anything else.
    """
    path = Path(path)
    size = path.stat().st_size
    mapped = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)  # MAP_PRIVATE, read lazily
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, mapped, size)
        with open(path, "rb") as file:
            magic = SafeUnpickler(file, path, None).load()
        if magic != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch.save file (neither a zip nor the legacy magic number)")
        return _load_legacy(path, mapped, size)
    except MinisdError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, RuntimeError, struct.error, UnicodeDecodeError, RecursionError) as error:  # fmt: skip
        raise MinisdError(f"{path}: cannot read as a PyTorch checkpoint ({_one_line(error)})") from None
