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
- a dtype token for `torch.<Type>Storage`, `collections.OrderedDict(pairs)` and `builtins.set(items)` (scalar keys
  only, see below), a latin-1-only `_codecs.encode`,
- an inert `Stub` class for the harmless training objects old checkpoints carry (Lightning callbacks, numpy scalars
  and dtypes): it records the pickled name and ignores its arguments and state, the real class is never imported,
and raises a one-line `MinisdError` naming the global and the file for anything else (`os.system`, `builtins.eval`,
`subprocess.Popen`, ...). BUILD (`__setstate__`) is honoured only on stubs and OrderedDicts, whose state is dropped.

A hostile pickle is refused before it can hang or crash the loader:
- dict keys and set items must be scalars (str, int, float, bool, None, bytes) or stub classes: hashing a key is
  then linear in its size (a tuple key can be a DAG of 2**80 paths, or nested a million deep: `hash` hangs or
  crashes); SETITEM / APPEND / ADDITEMS only fill real dicts, lists and sets;
- containers nest at most MAX_NESTING deep and never hold themselves (`check_nesting`, after loading);
- every tensor lies inside its storage: no more elements than the storage holds from its offset on.
The file around the pickle (zip or legacy layout, sizes, the memory map) is weights_convert/torch_save.py's.
"""

import collections
import math
import pickle
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

# Limits on what a pickle may build (real checkpoints nest ~6 deep and use 4-dimensional tensors at most).
MAX_NESTING = 64  # containers inside containers (Python's own recursion limit is 1000)
MAX_DIMS = 16  # tensor dimensions
SCALAR_KEYS = (str, int, float, bool, type(None), bytes)


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
        or len(size) > MAX_DIMS
    ):
        raise pickle.UnpicklingError(  # types only: the values may be anything (a repr can take forever)
            f"_rebuild_tensor_v2 got a bad layout: offset, size, stride of types {type(storage_offset).__name__}, "
            f"{type(size).__name__}, {type(stride).__name__} (non-negative ints, at most {MAX_DIMS} dimensions)"
        )
    if type(requires_grad) is not bool:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 got a non-bool requires_grad")
    # The view must lie inside its storage (its last element, at offset + Σ (n − 1)·stride) and hold no more
    # elements than the storage has from its offset on: a stride-0 view of 2**40 elements would otherwise read
    # as a 4 TiB tensor made of one stored number.
    numel = math.prod(size)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if storage_offset < 0 or (numel and (last >= storage.numel or numel > storage.numel - storage_offset)):
        raise pickle.UnpicklingError(
            f"tensor of size {size} and stride {stride} at offset {storage_offset} does not fit in its storage of "
            f"{storage.numel} elements"
        )
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, storage_offset, size, stride)


def _check_keys(keys, what: str = "dict keys") -> None:
    """Keys (and set items) must hash in time linear in their size: scalars, or the stub classes Lightning uses."""
    for key in keys:
        if not (type(key) in SCALAR_KEYS or isinstance(key, Stub) or (isinstance(key, type) and issubclass(key, Stub))):
            raise pickle.UnpicklingError(
                f"{what} must be str, int, float, bool, None or bytes, got a {type(key).__name__}"
            )


def ordered_dict(items=()) -> collections.OrderedDict:
    """`collections.OrderedDict(items)` for a list or tuple of (key, value) pairs with scalar keys."""
    if type(items) not in (list, tuple) or not all(type(pair) in (list, tuple) and len(pair) == 2 for pair in items):
        raise pickle.UnpicklingError("OrderedDict is allowed only as OrderedDict(list of (key, value) pairs)")
    _check_keys(pair[0] for pair in items)
    return collections.OrderedDict(items)


def make_set(items=()) -> set:
    """`set(items)` for a list or tuple of scalars (how protocol-2 pickles write a set)."""
    if type(items) not in (list, tuple):
        raise pickle.UnpicklingError("set is allowed only as set(list of items)")
    _check_keys(items, "set items")
    return set(items)


def check_nesting(root, path: Path) -> None:
    """Refuse containers (dicts, lists, tuples) nested more than MAX_NESTING deep, or holding themselves.

    The depth is the longest path of the object graph, computed bottom-up by an iterative depth-first search that
    finishes each container once: a DAG of 2**80 paths costs its few nodes, a million levels cost no Python stack.
    Dict keys and set items are scalars (checked while loading), so only dict values, list and tuple items count.
    """
    containers = (dict, list, tuple)

    def children(node) -> list:
        return [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, containers)]

    depth: dict[int, int] = {}  # id of a finished container -> its depth (1: holds no containers)
    on_path: set[int] = set()  # ids of the containers being expanded: meeting one again is a cycle
    todo = [(root, False)] if isinstance(root, containers) else []
    while todo:
        node, expanded = todo.pop()
        if expanded:
            on_path.discard(id(node))
            depth[id(node)] = 1 + max((depth[id(c)] for c in children(node)), default=0)
            if depth[id(node)] > MAX_NESTING:
                raise MinisdError(f"{path}: containers nested more than {MAX_NESTING} deep: not a checkpoint")
        elif id(node) not in depth:
            if id(node) in on_path:
                raise MinisdError(f"{path}: a container holds itself: not a checkpoint")
            on_path.add(id(node))
            todo.append((node, True))
            todo.extend((c, False) for c in children(node))


def rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> torch.Tensor:
    """Our `torch._utils._rebuild_parameter(_with_state)`: the plain tensor inside an nn.Parameter."""
    if not isinstance(data, torch.Tensor | None):
        raise pickle.UnpicklingError("_rebuild_parameter expects a tensor")
    return data


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("collections", "OrderedDict"): ordered_dict,
    ("builtins", "set"): make_set,
    ("__builtin__", "set"): make_set,  # protocol-2 pickles written by Python 2 name builtins this way
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
        ok = type(pid) is tuple and len(pid) in (5, 6) and type(pid[0]) is str and pid[0] == "storage"
        if not ok or not isinstance(pid[1], StorageType) or type(pid[2]) is not str or type(pid[4]) is not int:
            raise pickle.UnpicklingError(f"unsupported persistent id (a {type(pid).__name__})")
        if pid[4] < 0:
            raise pickle.UnpicklingError(f"storage {pid[2]:.40} has a negative size")
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

    # The opcodes that hash (dict keys, set items) or fill a container: scalar keys, real containers only. In the
    # pure-Python unpickler the items since the last MARK are `self.stack`, the stack below it `self.metastack[-1]`.
    @staticmethod
    def _check_target(target, kind: type, opcode: str) -> None:
        if not isinstance(target, kind):
            raise pickle.UnpicklingError(f"{opcode} on a {type(target).__name__} is not allowed")

    def load_setitem(self):  # stack: ... dict key value
        _check_keys(self.stack[-2:-1])
        self._check_target(self.stack[-3], dict, "SETITEM")
        pickle._Unpickler.load_setitem(self)

    def load_setitems(self):  # ... dict MARK key value key value ...
        _check_keys(self.stack[0::2])
        self._check_target(self.metastack[-1][-1], dict, "SETITEMS")
        pickle._Unpickler.load_setitems(self)

    def load_dict(self):  # MARK key value ... -> a new dict
        _check_keys(self.stack[0::2])
        pickle._Unpickler.load_dict(self)

    def load_additems(self):  # ... set MARK item item ...
        _check_keys(self.stack, "set items")
        self._check_target(self.metastack[-1][-1], set, "ADDITEMS")
        pickle._Unpickler.load_additems(self)

    def load_frozenset(self):  # MARK item ... -> a new frozenset
        _check_keys(self.stack, "set items")
        pickle._Unpickler.load_frozenset(self)

    def load_append(self):  # ... list value
        self._check_target(self.stack[-2], list, "APPEND")
        pickle._Unpickler.load_append(self)

    def load_appends(self):  # ... list MARK value value ...
        self._check_target(self.metastack[-1][-1], list, "APPENDS")
        pickle._Unpickler.load_appends(self)

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
