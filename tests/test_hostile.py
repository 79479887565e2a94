"""Hostile and broken input (issue 15): every bad input is refused with ONE line on stderr and exit status 2, within
seconds and bounded memory, before any compute, with nothing written or deleted; or it succeeds correctly.

One test per class of attack; each builds its crafted inputs here (pickles written opcode by opcode, zips with
compressed records, PNGs declaring huge sizes, FIFOs) and runs the real command lines (`python -m weights_convert`,
`python -m minisd`, `python -m minisd.train`) in a child process that carries the limits:

- memory: RLIMIT_AS set in the child (the address space it inherits plus MEMORY_BUDGET), so a blow-up fails the
  test as a MemoryError or a killed child instead of swapping the machine;
- time: an alarm set in the child (TIME_LIMIT seconds, SIGALRM's default action kills it, even inside C code);
- nothing written or deleted: the folder the command runs in is snapshotted before and after (names, sizes,
  modification times).

The children are forked from one warm server interpreter that imported torch and minisd once (`serve` below): a
fresh `python -m ...` costs a second of imports, a fork a few milliseconds, which keeps this file fast.
"""

import collections
import io
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BUDGET = 2 << 30  # bytes of address space a child may add to what it inherits
TIME_LIMIT = 30  # seconds per refused command: ~2 s on an idle machine, loading the nano model included
RUN_LIMIT = 120  # seconds for the few commands that must succeed (and compute) on a busy machine


# ---------------------------------------------------------------------------------------------------------------
# The fork server and the checks every case makes


def serve() -> None:
    """Read one JSON request per line ({"module", "argv", "cwd", "nobody", "env", "seconds"}), run it in a forked
    child under the limits, reply one JSON line {"rc", "seconds", "stdout", "stderr"} (rc < 0: killed by signal
    -rc, e.g. -14 for the alarm, -11 for a crash). Runs in its own interpreter (see Commands)."""
    import resource
    import runpy
    import signal
    import tempfile
    import traceback

    # imported once here, inherited by every child
    import minisd.cli
    import minisd.train.__main__
    import weights_convert.__main__

    del minisd, weights_convert
    with torch.device("meta"):  # the first module built on the meta device imports ~800 modules (5 s): once, here
        torch.nn.Linear(1, 1)

    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryDirectory() as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            sys.stdout.flush()
            sys.stderr.flush()
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # the child: limits, redirections, then the command line as `python -m module argv`
                code = 1
                try:
                    os.chdir(request["cwd"])
                    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                                            (2, err, os.O_WRONLY | os.O_CREAT)):  # fmt: skip
                        os.dup2(os.open(path, flags), fd)
                    vm = next(int(v.split()[1]) for v in open("/proc/self/status") if v.startswith("VmSize:"))
                    limit = vm * 1024 + MEMORY_BUDGET
                    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                    if request.get("nobody") and os.getuid() == 0:  # so file permissions apply, even to root
                        os.setgid(65534)
                        os.setuid(65534)
                    signal.alarm(request["seconds"])
                    for name, value in request["env"].items():
                        if value is None:
                            os.environ.pop(name, None)
                        else:
                            os.environ[name] = value
                    sys.argv = [request["module"], *request["argv"]]
                    sys.modules.pop(request["module"] + ".__main__", None)  # runpy runs it afresh, as `python -m`
                    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            seconds = time.perf_counter() - start
            reply = {
                "rc": os.waitstatus_to_exitcode(status),
                "seconds": seconds,
                "stdout": out.read_text(errors="replace"),
                "stderr": err.read_text(errors="replace"),
            }
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class Commands:
    """The client side: `run(module, *argv, cwd=...)` -> the reply dict."""

    def __init__(self):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.server = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_hostile import serve; serve()"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(
        self, module: str, *argv, cwd: Path, nobody: bool = False, env: dict | None = None, seconds: int = RUN_LIMIT
    ) -> dict:
        """env: variables to set in the child (None removes one); seconds: its time limit."""
        request = {"module": module, "argv": [str(a) for a in argv], "cwd": str(cwd), "nobody": nobody}
        request.update(env=env or {}, seconds=seconds)
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


@pytest.fixture(scope="module")
def commands():
    server = Commands()
    yield server
    server.close()


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under folder with its kind, and a file's size and modification time: what 'nothing written or
    deleted' compares (a folder's own times are left out: a temporary file made and removed leaves nothing)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        is_dir = stat.S_ISDIR(info.st_mode)
        entries[str(path.relative_to(folder))] = (info.st_mode, None if is_dir else (info.st_size, info.st_mtime_ns))
    return entries


def assert_refused(
    commands: Commands, module: str, *argv, cwd: Path, says: tuple[str, ...] = (), nobody: bool = False, env=None
) -> str:
    """Run the command line in `cwd` (as user nobody if asked, with `env` changes): exit status 2, exactly one line
    on stderr naming each of `says`, nothing on stdout, within TIME_LIMIT and MEMORY_BUDGET, and the folder
    unchanged. Returns the line."""
    before = snapshot(cwd)
    reply = commands.run(module, *argv, cwd=cwd, nobody=nobody, env=env, seconds=TIME_LIMIT)
    shown = f"{module} {' '.join(map(str, argv))[:200]}: rc {reply['rc']}, {reply['seconds']:.1f} s, " + (
        f"stderr {reply['stderr'][-1500:]!r}"
    )
    assert reply["rc"] == 2, shown
    lines = reply["stderr"].splitlines()
    assert len(lines) == 1 and reply["stderr"].endswith("\n"), shown
    assert "Traceback" not in reply["stderr"] and len(lines[0]) <= 1200, shown
    for word in says:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert reply["stdout"] == "", shown
    assert snapshot(cwd) == before, f"{shown}: the folder changed"
    if os.environ.get("HOSTILE_SHOW"):
        print(f"{reply['seconds']:5.2f} s  {module} {' '.join(map(str, argv))[:80]}\n        {lines[0]}")
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Crafted checkpoints: torch.save's two layouts, written by hand so each part can lie


class Storage:
    """A storage record: pickled as torch.save's persistent id ("storage", torch.FloatStorage, key, "cpu", numel)."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class View:
    """A tensor: pickled as torch.save does, `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class CheckpointPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def checkpoint_parts(state_dict: dict, lies: dict | None = None) -> tuple[bytes, dict[str, bytes]]:
    """The pickle of {"state_dict": views} and the storage records {key: bytes} for float32 tensors; `lies` maps a
    name to the (offset, size, stride) its view claims instead of the truth."""
    views, records = {}, {}
    for i, (name, tensor) in enumerate(state_dict.items()):
        tensor = tensor.float().contiguous()
        records[str(i)] = tensor.numpy().tobytes()
        offset, size, stride = (lies or {}).get(name, (0, tuple(tensor.shape), tuple(tensor.stride())))
        views[name] = View(Storage(str(i), tensor.numel()), offset, size, stride)
    buffer = io.BytesIO()
    CheckpointPickler(buffer, protocol=2).dump({"state_dict": views, "global_step": 1})
    return buffer.getvalue(), records


def write_zip_checkpoint(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def write_legacy_checkpoint(path: Path, data_pkl: bytes, records: dict[str, bytes], numels: dict[str, int]) -> Path:
    """torch.save's pre-1.6 layout: magic, protocol, sys info, the object, the keys, then (int64 count, bytes) each."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info)]
    parts += [data_pkl, pickle.dumps(list(records), protocol=2)]
    parts += [struct.pack("<q", numels.get(key, len(data) // 4)) + data for key, data in records.items()]
    path.write_bytes(b"".join(parts))
    return path


def raw_zip(path: Path, entries: list[tuple[str, int, bytes, int]]) -> Path:
    """A zip written field by field: entries (name, method, stored bytes, declared uncompressed size), so the
    declared size can be anything. CRCs are 0: every case here is refused before a CRC is checked, or fails it."""
    body, directory = bytearray(), bytearray()
    for name, method, stored, declared in entries:
        encoded, offset = name.encode(), len(body)
        body += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0, 0, len(stored), declared, len(encoded), 0)
        body += encoded + stored
        directory += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0, 0, len(stored), declared, len(encoded),
            0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        directory += encoded
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path


def deflated_zeros(mebibytes: int) -> bytes:
    """A raw deflate stream of `mebibytes` MiB of zeros, about 1 KB per MiB, made without compressing them all: once
    the window is zeros, every further MiB compresses to the same block, which is repeated."""
    zeros = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return first + repeated * (mebibytes - 1) + compressor.flush()


def deep_key(kind: str) -> bytes:
    """Pickle opcodes pushing one hashable-looking key: a tuple DAG with 2**80 paths (each level is (x, x) of the
    level below, through the memo), or 300,000 nested 1-tuples (hash recurses in C: 200,000 crash CPython 3.11)."""
    if kind == "dag":
        return b"N" + b"q\x00h\x00\x86" * 80  # BINPUT 0, BINGET 0, TUPLE2: x -> (x, x)
    return b"N" + b"\x85" * 300_000  # TUPLE1


# Every way an allowed opcode or an allowed global hashes a key or a set item (protocol 2 and 4 opcodes).
HASHING = {
    "SETITEM": lambda key: b"\x80\x02}" + key + b"K\x01s.",
    "SETITEMS": lambda key: b"\x80\x02}(" + key + b"K\x01u.",
    "DICT": lambda key: b"\x80\x02(" + key + b"K\x01d.",
    "OrderedDict": lambda key: b"\x80\x02ccollections\nOrderedDict\n(((" + key + b"K\x01tltR.",
    "builtins.set": lambda key: b"\x80\x02cbuiltins\nset\n((" + key + b"ltR.",
    "ADDITEMS": lambda key: b"\x80\x04\x8f(" + key + b"\x90.",
    "FROZENSET": lambda key: b"\x80\x04(" + key + b"\x91.",
}


def test_pickle_bombs_through_allowed_opcodes(commands, tmp_path):
    """A 1 KB tuple-DAG key hung `info` and `generate` forever (hash walks 2**80 paths); deeply nested 1-tuples
    crashed the interpreter (hash recurses in C). Keys and set items must be scalars; nesting is bounded."""
    cases = [(name, "dag") for name in HASHING] + [(name, "deep") for name in ("SETITEM", "builtins.set", "FROZENSET")]
    for name, kind in cases:
        path = write_zip_checkpoint(tmp_path / f"{name}-{kind}.ckpt", HASHING[name](deep_key(kind)))
        assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name, "must be str"))
    path = tmp_path / "SETITEM-dag.ckpt"
    assert_refused(commands, "minisd", "generate", "a fox", "--checkpoint", path.name, cwd=tmp_path, says=(path.name,))
    # the legacy layout; the same nesting as dict values and list items: legal keys, but nested past any checkpoint
    legacy = write_legacy_checkpoint(tmp_path / "legacy.pt", HASHING["SETITEM"](deep_key("dag")), {}, {})
    deep_tuple = b"\x80\x02}X\x01\x00\x00\x00v" + b"N" + b"\x85" * 100_000 + b"s."
    deep_list = b"\x80\x02}X\x01\x00\x00\x00v" + b"]" * 100_000 + b"a" * 99_999 + b"s."  # [[[...]]] by APPEND
    for path, says in (
        (legacy, "must be str"),
        (write_zip_checkpoint(tmp_path / "tuple.ckpt", deep_tuple), "nested more than"),
        (write_zip_checkpoint(tmp_path / "list.ckpt", deep_list), "nested more than"),
    ):
        assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name, says))


def test_zip_bombs(commands, tmp_path):
    """A compressed data.pkl or byteorder record was inflated whole (1 MB -> 2.3-5.4 GB, then a MemoryError): each
    record is read against a size limit, in bounded pieces, whatever its header declares."""
    bomb = deflated_zeros(3000)  # 3 MB that inflate to 3000 MiB
    pickle_bytes = pickle.dumps({"state_dict": {}}, protocol=2)
    cases = {
        "honest data.pkl": [("archive/data.pkl", zipfile.ZIP_DEFLATED, bomb, 3000 << 20)],
        "lying data.pkl": [("archive/data.pkl", zipfile.ZIP_DEFLATED, bomb, 1000)],
        "honest byteorder": [
            ("archive/data.pkl", zipfile.ZIP_STORED, pickle_bytes, len(pickle_bytes)),
            ("archive/byteorder", zipfile.ZIP_DEFLATED, bomb, 3000 << 20),
        ],
        "lying byteorder": [
            ("archive/data.pkl", zipfile.ZIP_STORED, pickle_bytes, len(pickle_bytes)),
            ("archive/byteorder", zipfile.ZIP_DEFLATED, bomb, 6),
        ],
    }
    for i, entries in enumerate(cases.values()):
        path = raw_zip(tmp_path / f"bomb{i}.ckpt", entries)
        assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name,))
    path = tmp_path / "bomb0.ckpt"
    assert_refused(commands, "minisd", "generate", "a fox", "--checkpoint", path.name, cwd=tmp_path)


def test_lying_tensors_and_storages(commands, tmp_path):
    """A stride-0 view of 2**40 elements was accepted (`info` said 1.1e12 parameters, `convert` tried to allocate
    4 TiB and left a partial folder); a legacy storage of negative size gave an OSError. Every tensor must lie
    inside its storage, every storage inside the file, every size be >= 0."""
    from tests.fakes import tiny_official_state_dict

    state_dict = tiny_official_state_dict("emaonly")
    name = "model.diffusion_model.input_blocks.0.0.weight"
    lies = {
        "stride 0": (0, (2**20, 2**20), (0, 0)),
        "past the end": (1, tuple(state_dict[name].shape), tuple(state_dict[name].stride())),
        "negative offset": (-1, (1,), (1,)),
        "17 dimensions": (0, (1,) * 17, (1,) * 17),
    }
    for i, lie in enumerate(lies.values()):
        data_pkl, records = checkpoint_parts(state_dict, {name: lie})
        path = write_zip_checkpoint(tmp_path / f"lie{i}.ckpt", data_pkl, records)
        assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name,))
    assert_refused(commands, "weights_convert", "convert", "lie0.ckpt", "out", cwd=tmp_path, says=("lie0.ckpt",))
    assert_refused(commands, "minisd", "generate", "a fox", "--checkpoint", "lie0.ckpt", cwd=tmp_path)

    # the storage sizes of the legacy layout, and its pickles, which are read from the file itself
    small = {"model.diffusion_model.x": torch.ones(4)}
    data_pkl, records = checkpoint_parts(small)
    huge_string = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x04\x8e" + struct.pack("<Q", 3 << 30)
    for path in (
        write_legacy_checkpoint(tmp_path / "negative.pt", data_pkl, records, {"0": -(2**62)}),
        write_legacy_checkpoint(tmp_path / "past-the-end.pt", data_pkl, records, {"0": 1 << 40}),
        tmp_path / "huge-string.pt",  # a BINBYTES8 opcode declaring 3 GiB
    ):
        if path.name == "huge-string.pt":
            path.write_bytes(huge_string + b"x" * 100 + b".")
        assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name,))
    # zip storage records: a negative size in the persistent id
    data_pkl = data_pkl.replace(b"K\x04", b"J" + struct.pack("<i", -4), 1)  # BININT1 4 -> BININT -4 (the numel)
    path = write_zip_checkpoint(tmp_path / "negative-numel.ckpt", data_pkl, records)
    assert_refused(commands, "weights_convert", "info", path.name, cwd=tmp_path, says=(path.name,))


def test_convert_never_loses_data(commands, tmp_path):
    """`convert models/x.safetensors models --overwrite` deleted the whole models/ folder, input included, and
    exited 0; a failed conversion with --overwrite deleted the old output first. Now OUT may not be, contain or lie
    inside IN; OUT is written beside and renamed into place; an existing OUT folder keeps the files a conversion
    does not write."""
    from safetensors.torch import save_file

    from tests.fakes import tiny_official_state_dict

    models = tmp_path / "models"
    models.mkdir()
    save_file(tiny_official_state_dict("emaonly"), models / "x.safetensors", metadata={"format": "pt"})
    (models / "notes.txt").write_text("mine")
    (tmp_path / "link.safetensors").symlink_to(models / "x.safetensors")
    for argv in (
        ("convert", "models/x.safetensors", "models"),  # OUT contains IN
        ("convert", "models/x.safetensors", "."),
        ("convert", "models/x.safetensors", "models/x.safetensors"),  # the same file
        ("convert", "models/x.safetensors", "link.safetensors"),  # the same file through a link
        ("export", "models/x.safetensors", "link.safetensors"),
        ("convert", "models/x.safetensors", "models/notes.txt"),  # a file where a folder would go
    ):
        assert_refused(commands, "weights_convert", *argv, "--overwrite", cwd=tmp_path)

    reply = commands.run("weights_convert", "convert", "models/x.safetensors", "sd", cwd=tmp_path)
    assert reply["rc"] == 0, reply["stderr"]
    assert_refused(commands, "weights_convert", "convert", "sd", "sd/unet", "--overwrite", cwd=tmp_path)  # inside IN
    # --overwrite on a folder: the converted files are replaced, the user's own are kept, nothing temporary is left
    (tmp_path / "sd" / "mine.txt").write_text("keep me")
    before = snapshot(tmp_path)
    reply = commands.run("weights_convert", "convert", "models/x.safetensors", "sd", "--overwrite", cwd=tmp_path)
    assert reply["rc"] == 0, reply["stderr"]
    assert snapshot(tmp_path).keys() == before.keys() and (tmp_path / "sd" / "mine.txt").read_text() == "keep me"
    # a conversion that fails at writing time leaves the old OUT as it was
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").unlink()
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").mkdir()  # a folder where a file must go
    assert_refused(commands, "weights_convert", "convert", "models/x.safetensors", "sd", "--overwrite", cwd=tmp_path)


def test_training_files_and_settings(commands, tmp_path):
    """`python -m minisd.train` gave tracebacks for a --run-dir that is a file or cannot be made, a checkpoint with
    bad metadata or state, a corrupt log.jsonl, --device cuda without CUDA; argparse's usage block on errors; and
    `evaluate --grid EXISTING.png` replaced the file silently."""
    from safetensors.torch import save_file

    from minisd.train.common import build, config_to_json, save_checkpoint
    from minisd.train.vae_training import VAETrainingConfig
    from minisd.vae import VAE

    (tmp_path / "a-file").write_text("not a folder")
    vae_config = VAETrainingConfig().vae
    vae = build(VAE, vae_config, torch.Generator().manual_seed(0))
    metadata = {"minisd.vae_config": config_to_json(vae_config)}
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors", metadata)
    save_file({"x": torch.ones(1)}, tmp_path / "bad-vae.safetensors", {"minisd.vae_config": "{not json"})
    (tmp_path / "grid.png").write_bytes(b"an earlier grid")

    def resumable(folder: str, metadata: dict | None = None, state: dict | None = None, log: str | None = None):
        (tmp_path / folder).mkdir()
        if state is not None:
            save_checkpoint(tmp_path / folder / "checkpoint.safetensors", state)
        else:
            save_file({"x": torch.ones(1)}, tmp_path / folder / "checkpoint.safetensors", metadata)
        if log is not None:
            (tmp_path / folder / "log.jsonl").write_text(log)

    config = config_to_json(VAETrainingConfig())
    resumable("not-json", {"minisd.checkpoint": "{not json"})
    resumable("not-a-tree", {"minisd.checkpoint": "[1, 2]"})
    resumable("no-step", state={"config": config})
    resumable("wrong-state", state={"vae": {"x": torch.ones(1)}, "optimizer": {}, "step": 3, "config": config})
    resumable("bad-log", state={"step": 3, "config": config}, log='{"step": 1, "l1": 0.5}\n{"step": 2, "l1"\n')
    vae_args = ("--num-pictures", "8", "--batch-size", "2")
    for argv in (
        ("vae", "--run-dir", "a-file"),
        ("vae", "--run-dir", "a-file/run"),
        ("diffusion", "--run-dir", "a-file", "--vae", "vae.safetensors"),
        ("all", "--run-dir", "a-file/run", "--out", "model.safetensors"),
        ("--device", "cuda:99", "vae", "--run-dir", "run"),
        ("--device", "meta", "vae", "--run-dir", "run"),
        ("--device", "xla", "vae", "--run-dir", "run"),
        ("vae",),  # argparse: --run-dir is required
        ("vae", "--run-dir", "run", "--steps", "many"),
        *(("vae", "--run-dir", name, *vae_args) for name in ("not-json", "not-a-tree", "no-step", "wrong-state")),
        ("vae", "--run-dir", "bad-log", *vae_args),
        ("diffusion", "--run-dir", "not-json", "--vae", "vae.safetensors"),
        ("diffusion", "--run-dir", "run", "--vae", "bad-vae.safetensors"),
        ("evaluate", "--grid", "grid.png"),
        ("evaluate", "--grid", "grid.jpg"),
    ):
        assert_refused(commands, "minisd.train", *argv, cwd=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Weights that load: the shipped nano model, changed one way at a time

NANO = ROOT / "minisd" / "data" / "nano.safetensors"


def nano_copy(path: Path, tensors=None, **metadata: str) -> Path:
    """A copy of the nano model with some tensors replaced ({name: tensor}) and some metadata changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(NANO, "pt") as file:
        state_dict = {name: file.get_tensor(name) for name in file.keys()}
        state_metadata = file.metadata()
    save_file({**state_dict, **(tensors or {})}, path, {**state_metadata, **metadata})
    return path


def nano_config() -> dict:
    from safetensors import safe_open

    with safe_open(NANO, "pt") as file:
        return json.loads(file.metadata()["minisd.config"])


def test_metadata_that_drives_memory(commands, tmp_path):
    """A layer count in the file's minisd.config metadata (40,000 layers) was allocated before any shape was
    checked (2.1 GB, 49 s). Every size a config states is checked against the tensors before a module is built:
    the file's metadata, a diffusers config.json, a training VAE's metadata."""
    from safetensors.torch import save_file

    from minisd.train.common import build, config_to_json
    from minisd.train.vae_training import VAETrainingConfig
    from minisd.vae import VAE
    from tests.fakes import tiny_components
    from weights_convert.folders import write_folder

    for component, key in (("text_encoder", "num_hidden_layers"), ("unet", "layers_per_block"),
                           ("vae", "layers_per_block")):  # fmt: skip
        config = nano_config()
        config[component][key] = 40_000
        nano_copy(tmp_path / f"{component}.safetensors", **{"minisd.config": json.dumps(config)})
        argv = ("generate", "a red circle", "--checkpoint", f"{component}.safetensors", "--steps", "1")
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(key, "40000"))

    write_folder(tiny_components(), tmp_path / "sd")
    for component, key, value in (("unet", "layers_per_block", 40_000), ("text_encoder", "num_hidden_layers", 40_000),
                                  ("vae", "block_out_channels", [32] * 16)):  # fmt: skip
        path = tmp_path / "sd" / component / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, key: value}))
        argv = ("generate", "a fox", "--model", "sd", "--steps", "1")
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(key,))
        path.write_text(json.dumps(config))

    vae_config = VAETrainingConfig().vae
    vae = build(VAE, vae_config, torch.Generator().manual_seed(0))
    metadata = {"minisd.vae_config": json.dumps({**json.loads(config_to_json(vae_config)), "layers_per_block": 40_000})}
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors", metadata)
    argv = ("diffusion", "--run-dir", "run", "--vae", "vae.safetensors")
    assert_refused(commands, "minisd.train", *argv, cwd=tmp_path, says=("layers_per_block",))


def test_weights_and_configs_of_the_wrong_kind(commands, tmp_path):
    """Tracebacks where one line belongs: weights stored as integers or with the wrong number of dimensions under
    SD keys, minisd.sample_size or minisd.config metadata of the wrong type, a diffusers config.json that is a list
    or has strings for numbers."""
    from safetensors.torch import save_file

    from tests.fakes import tiny_components, tiny_official_state_dict
    from weights_convert.folders import write_folder

    conv_in, table = "unet.conv_in.weight", "text_encoder.embeddings.token_embedding.weight"
    config = nano_config()

    def changed(component: str, **values) -> str:
        return json.dumps({**config, component: {**config[component], **values}})

    cases = {
        "int weight": {"tensors": {conv_in: torch.zeros(32, 4, 3, 3, dtype=torch.int8)}},
        "int table": {"tensors": {table: torch.zeros(49408, 64, dtype=torch.int32)}},
        "1-d weight": {"tensors": {conv_in: torch.zeros(32 * 4 * 3 * 3, dtype=torch.float16)}},
        "sample_size ²": {"minisd.sample_size": "6²"},
        "sample_size 64.0": {"minisd.sample_size": "64.0"},
        "guidance nan": {"minisd.guidance_scale": "nan"},
        "config a list": {"minisd.config": "[1, 2]"},
        "config strings": {"minisd.config": changed("unet", layers_per_block="1")},
        "config bool": {"minisd.config": changed("vae", layers_per_block=True)},
        "config float": {"minisd.config": changed("unet", attention_head_dim=4.0)},
        "heads do not divide": {"minisd.config": changed("unet", attention_head_dim=3)},
        "groups do not divide": {"minisd.config": changed("vae", norm_num_groups=5)},
    }
    for i, change in enumerate(cases.values()):
        path = nano_copy(tmp_path / f"case{i}.safetensors", change.pop("tensors", None), **change)
        assert_refused(commands, "minisd", "generate", "a red circle", "--checkpoint", path.name, cwd=tmp_path)
    # an official-layout file without metadata: its sizes are read off the shapes
    state_dict = tiny_official_state_dict("emaonly")
    name = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({**state_dict, name: state_dict[name].flatten()}, tmp_path / "flat.safetensors")
    for command in (("info",), ("convert",)):
        argv = (*command, "flat.safetensors", *(("out",) if command == ("convert",) else ()))
        assert_refused(commands, "weights_convert", *argv, cwd=tmp_path, says=(name,))
    argv = ("generate", "a fox", "--checkpoint", "flat.safetensors")
    assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(name, "dimensions"))

    write_folder(tiny_components(), tmp_path / "sd")
    path = tmp_path / "sd" / "unet" / "config.json"
    config = json.loads(path.read_text())  # a diffusers folder's config.json
    for broken in ([config], {**config, "layers_per_block": "1"}, {**config, "block_out_channels": "32,64"},
                   {**config, "block_out_channels": 32}, {**config, "norm_num_groups": 1e400}):  # fmt: skip
        path.write_text(json.dumps(broken))
        assert_refused(commands, "minisd", "generate", "a fox", "--model", "sd", cwd=tmp_path, says=("sd",))


def test_sd2_files_get_the_same_checks(commands, tmp_path):
    """SD 2 files are accepted since issue 19; the same classes stay refused in one line there: a fused OpenCLIP
    q, k, v of the wrong shape, NaN weights, SD 2's own config fields of the wrong type or not fitting the weights
    (attention_head_dim per level, use_linear_projection, upcast_attention, hidden_act), a bad recorded prediction
    type, and a folder's scheduler_config / special_tokens_map that are wrong, nested too deep or too large."""
    from safetensors.torch import save_file

    from tests.fakes import tiny_components, tiny_sd2_official_state_dict
    from weights_convert.configs import configs_from_shapes
    from weights_convert.detect import MINISD_METADATA, join_minisd_file
    from weights_convert.folders import write_folder

    official = tiny_sd2_official_state_dict()
    fused = next(name for name in official if name.endswith("in_proj_weight"))
    proj_in = next(name for name in official if name.endswith("proj_in.weight"))
    for i, (name, tensor) in enumerate(((fused, torch.tensor(1.0)), (fused, torch.zeros(5, official[fused].shape[1])),
                                        (proj_in, torch.full_like(official[proj_in], float("nan"))))):  # fmt: skip
        save_file({**official, name: tensor}, tmp_path / f"official{i}.safetensors")
        argv = ("generate", "a fox", "--checkpoint", f"official{i}.safetensors")
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(name.rsplit(".", 2)[-2],))

    components = tiny_components(sd2=True)
    configs = configs_from_shapes(components, "v2")
    metadata = {**MINISD_METADATA, "minisd.variant": "v2", "minisd.prediction_type": "v_prediction"}
    cases = [("unet", "attention_head_dim", "8"), ("unet", "attention_head_dim", [0, 1]),
             ("unet", "attention_head_dim", [3, 3]), ("unet", "attention_head_dim", [1, 2, 3]),
             ("unet", "use_linear_projection", "yes"), ("unet", "use_linear_projection", False),
             ("unet", "upcast_attention", 1), ("text_encoder", "hidden_act", ["gelu"]),
             ("text_encoder", "hidden_act", "relu"), ("text_encoder", "num_hidden_layers", 40_000)]  # fmt: skip
    for i, (component, key, value) in enumerate(cases):
        changed = {**configs, component: {**configs[component], key: value}}
        path = tmp_path / f"minisd{i}.safetensors"
        save_file(join_minisd_file(components), path, {**metadata, "minisd.config": json.dumps(changed)})
        assert_refused(commands, "minisd", "generate", "a fox", "--checkpoint", path.name, cwd=tmp_path)
    save_file(join_minisd_file(components), tmp_path / "pred.safetensors", {**metadata, "minisd.prediction_type": "x"})
    argv = ("generate", "a fox", "--checkpoint", "pred.safetensors")
    assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=("prediction_type",))

    write_folder(components, tmp_path / "sd2", "v2", "v_prediction", 64)
    for name, text in (("scheduler/scheduler_config.json", json.dumps({"prediction_type": ["v_prediction"]})),
                       ("scheduler/scheduler_config.json", json.dumps({"rescale_betas_zero_snr": "yes"})),
                       ("scheduler/scheduler_config.json", "[" * 100_000 + "]" * 100_000),
                       ("tokenizer/special_tokens_map.json", "[" * 100_000 + "]" * 100_000),
                       ("tokenizer/special_tokens_map.json", json.dumps({"pad_token": "!" * (2 << 20)}))):  # fmt: skip
        path = tmp_path / "sd2" / name
        kept = path.read_text()
        path.write_text(text)
        argv = ("generate", "a fox", "--model", "sd2")
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(path.name,))
        path.write_text(kept)


def test_unreadable_and_special_weights_files(commands, tmp_path):
    """An unreadable .ckpt gave a traceback and an unreadable .safetensors was reported as "No such file"; a FIFO
    or a folder where a weights file belongs must not block or mislead either."""
    import shutil

    tmp_path.chmod(0o777)  # the commands run as user nobody, so that permissions apply even to root
    nano = shutil.copyfile(NANO, tmp_path / "locked.safetensors")
    nano.chmod(0o000)
    ckpt = write_zip_checkpoint(tmp_path / "locked.ckpt", pickle.dumps({"state_dict": {}}, protocol=2))
    ckpt.chmod(0o000)
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.mkfifo(tmp_path / "fifo.ckpt")
    (tmp_path / "folder.ckpt").mkdir()
    for name in ("locked.safetensors", "locked.ckpt"):
        for module, *argv in (
            ("weights_convert", "info"),
            ("minisd", "info"),
            ("minisd", "generate", "x", "--checkpoint"),
        ):
            assert_refused(commands, module, *argv, name, cwd=tmp_path, says=(name, "denied"), nobody=True)
    for name in ("fifo.safetensors", "fifo.ckpt", "folder.ckpt"):
        for module, *argv in (("weights_convert", "info"), ("minisd", "generate", "x", "--checkpoint")):
            assert_refused(commands, module, *argv, name, cwd=tmp_path, says=(name,))
        assert_refused(commands, "weights_convert", "convert", name, "out", cwd=tmp_path, says=(name,))


def test_devices_that_hold_no_numbers(commands, tmp_path):
    """--device meta / xla, or "Device: meta" in a PNG's parameters, gave tracebacks: cpu, cuda[:N] present, or mps."""
    from PIL import Image

    from minisd.images import save_png

    for device in ("meta", "xla", "cuda:99", "banana", "cpu:0:1"):
        argv = ("generate", "a red circle", "--steps", "1", "--device", device)
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=("--device",))
    text = "a red circle\nSteps: 1, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Model: nano, Device: meta"
    save_png(Image.new("RGB", (64, 64)), tmp_path / "meta.png", text)
    argv = ("regenerate", "meta.png", "--checkpoint", NANO)
    assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=("meta", "Device"))
    assert_refused(commands, "minisd", "explain", "--device", "meta", "--no-browser", cwd=tmp_path, says=("meta",))
    assert_refused(commands, "minisd", "explain", "--port", "99999", "--no-browser", cwd=tmp_path, says=("--port",))


def test_hub_ids_offline_by_default(commands, tmp_path):
    """A hub id with the network off cost 25 s of retries and a dozen stderr lines, and a tampered PNG could make
    `regenerate` contact the Hub. An id found in the cache is used without any network call; one not there is one
    line at once; an id a PNG names is never downloaded."""
    import select
    import socket

    from PIL import Image

    from minisd.images import save_png
    from tests.fakes import tiny_components
    from weights_convert.folders import write_folder

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    write_folder(tiny_components(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    silent = socket.socket()  # a Hub that accepts connections and never answers: a request would hang
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()  # a Hub that refuses connections: the network is off
    closed.bind(("127.0.0.1", 0))
    env = {"HF_HUB_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": None}
    offline = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}
    hanging = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    try:
        for argv in (("generate", "a fox", "--model", "org/absent", "--steps", "1"), ("info", "org/absent")):
            before = time.perf_counter()
            assert_refused(commands, "minisd", *argv, cwd=tmp_path, env=offline, says=("org/absent", "cache"))
            assert time.perf_counter() - before < 10, "the hub client retried"
        reply = commands.run("minisd", "info", "org/tiny", cwd=tmp_path, env=hanging)
        assert reply["rc"] == 0 and reply["seconds"] < 10, reply
        argv = ("generate", "a fox", "--model", "org/tiny", "--steps", "1", "--guidance", "1000")  # refused once loaded
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, env=hanging, says=("guidance",))
        text = "a fox\nSteps: 1, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Model: org/absent"
        save_png(Image.new("RGB", (64, 64)), tmp_path / "tampered.png", text)
        assert_refused(
            commands, "minisd", "regenerate", "tampered.png", cwd=tmp_path, env=hanging, says=("org/absent",)
        )
        assert not select.select([silent], [], [], 0)[0], "minisd contacted the Hub"
    finally:
        silent.close()
        closed.close()


# ---------------------------------------------------------------------------------------------------------------
# Images, PNG parameters, prompts and sizes on the command line


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A valid black RGB PNG of any size, a few hundred KB: its rows (a filter byte and zeros) are zlib-compressed
    zeros, made with deflated_zeros' trick. 10000×10000 is 296 KB and decodes to 300 MB."""
    size = height * (1 + 3 * width)
    zeros = bytes(min(size, 1 << 20))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    whole, rest = divmod(size, len(zeros))  # whole >= 1
    body = first + repeated * (whole - 1) + compressor.compress(bytes(rest)) + compressor.flush()
    idat = b"\x78\xda" + body + struct.pack(">I", ((size % 65521) << 16) | 1)  # zlib header, deflate, Adler-32
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_text(path: Path, text: bytes, kind: bytes = b"tEXt") -> Path:
    """A 64×64 PNG whose "parameters" chunk holds `text` as given (tEXt: Latin-1; zTXt: compressed)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    data = buffer.getvalue()
    body = b"parameters\x00" + (text if kind == b"tEXt" else b"\x00" + zlib.compress(text))
    path.write_bytes(data[:-12] + png_chunk(kind, body) + data[-12:])  # before IEND
    return path


def test_png_parameters_parsing_is_linear_and_bounded(commands, tmp_path):
    """The regex that read PNG "parameters" was quadratic: 100 KB of text took 54 s, a 2 MB chunk hung `regenerate`.
    Parsing is linear and the text has a size limit (also when compressed)."""
    line = b"Steps" + b" a" * 50_000  # no ":" after the key: every start position scanned to the end
    cases = {
        "100 KB": line,
        "100 KB after a prompt": b"a fox\n" + line,
        "2 MB": b"a fox\n" + b"Steps 1 " * 250_000,
        "20 MB compressed": b"x" * 20_000_000,
    }
    for i, (name, text) in enumerate(cases.items()):
        path = png_with_text(tmp_path / f"case{i}.png", text, b"zTXt" if "compressed" in name else b"tEXt")
        assert_refused(commands, "minisd", "regenerate", path.name, cwd=tmp_path, says=(path.name,))


def test_unbounded_sizes(commands, tmp_path):
    """img2img/inpaint accepted a 296 KB PNG declaring 10000×10000 (3.7 GB, then a traceback); PIL's
    DecompressionBombError escaped as a traceback; --num-images 30000000 built every path up front (5.4 GB); the
    documented maximum 8192×8192 ran for minutes on the nano model without a word. Each has a limit, in --help."""
    from PIL import Image

    (tmp_path / "huge.png").write_bytes(png_declaring(10_000, 10_000))
    (tmp_path / "bomb.png").write_bytes(png_declaring(20_000, 10_000))  # past PIL's 179 M pixel bomb limit
    (tmp_path / "wide.png").write_bytes(png_declaring(4096, 64))  # under 8192, far past the nano model's size
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    for argv in (
        ("img2img", "a red circle", "--image", "huge.png"),
        ("img2img", "a red circle", "--image", "bomb.png"),
        ("img2img", "a red circle", "--image", "wide.png"),
        ("inpaint", "a red circle", "--image", "small.png", "--mask", "huge.png"),
        ("generate", "a red circle", "--num-images", "30000000"),
        ("generate", "a red circle", "--height", "8192", "--width", "8192"),
    ):
        assert_refused(commands, "minisd", *argv, "--steps", "5", cwd=tmp_path)
    reply = commands.run("minisd", "generate", "--help", cwd=tmp_path)
    assert reply["rc"] == 0 and "at most" in reply["stdout"], reply


def test_blocking_files(commands, tmp_path):
    """A FIFO as --image, or as "Init image:" in a PNG, blocked forever; --image was opened twice. Images are
    opened once, and only regular files (PNGs no longer name source images: regenerate takes them as --image)."""
    from PIL import Image

    from minisd.images import save_png

    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    os.mkfifo(tmp_path / "fifo.png")
    text = (
        "a red circle\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Denoising strength: 0.5, "
        "Init image hash: 0123456789, Model: nano"
    )
    save_png(Image.new("RGB", (64, 64)), tmp_path / "init.png", text)
    for argv in (
        ("img2img", "a red circle", "--image", "fifo.png", "--steps", "1"),
        ("inpaint", "a red circle", "--image", "small.png", "--mask", "fifo.png", "--steps", "1"),
        ("regenerate", "init.png", "--checkpoint", NANO, "--image", "fifo.png"),
        ("regenerate", "fifo.png"),
        ("generate", "a red circle", "--steps", "1", "-o", "fifo.png", "--overwrite"),
    ):
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=("fifo.png",))


def test_nonfinite_weights_and_arguments(commands, tmp_path):
    """NaN or inf weights, --guidance inf or 1e308, an emphasis weight that overflows: the run computed garbage, then
    blamed "a VAE decode in float16" in a float32 run; a +inf VAE bias exited 0 with an all-white picture. Weights
    are checked at load, arguments up front, and the message names the real cause."""
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    conv_in = torch.zeros(32, 4, 3, 3, dtype=torch.float16)
    conv_in[0, 0, 0, 0] = float("nan")
    nano_copy(tmp_path / "nan.safetensors", {"unet.conv_in.weight": conv_in})
    nano_copy(tmp_path / "inf.safetensors", {"vae.decoder.conv_out.bias": torch.full((3,), float("inf")).half()})
    for name in ("nan.safetensors", "inf.safetensors"):
        argv = ("generate", "a red circle", "--steps", "1", "--checkpoint", name)
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=(name, "NaN or inf"))
    for argv in (
        ("--guidance", "inf"),
        ("--guidance", "1e308"),
        ("--guidance", "nan"),
        ("--eta", "nan", "--sampler", "DDIM"),
        ("--strength", "nan"),
    ):
        command = "img2img" if "--strength" in argv else "generate"
        image = ("--image", "small.png") if command == "img2img" else ()
        assert_refused(commands, "minisd", command, "a red circle", *image, "--steps", "1", *argv, cwd=tmp_path)
    for prompt in ("a (red:" + "9" * 400 + ") circle", "a (red:100000) circle", "a " + "(" * 5000 + "red circle"):
        assert_refused(commands, "minisd", "generate", prompt, "--steps", "1", cwd=tmp_path, says=("emphasis",))


def test_undecodable_prompt(commands, tmp_path):
    """Invalid UTF-8 in the prompt (argv bytes Python keeps as lone surrogates) gave a traceback."""
    for argv in (("a red \udcff circle",), ("a red circle", "--negative-prompt", "\udcff")):
        assert_refused(commands, "minisd", "generate", *argv, "--steps", "1", cwd=tmp_path, says=("valid text",))


def test_exif_orientation_is_applied(commands, tmp_path):
    """EXIF orientation was ignored: phone photos came out sideways (diffusers and A1111 apply it)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are turned 90°; viewers show them upright, 64 wide, 128 high
    Image.new("RGB", (128, 64), (200, 30, 30)).save(tmp_path / "phone.png", exif=exif)
    argv = ("img2img", "a red circle", "--image", "phone.png", "--steps", "2", "--strength", "0.5", "-o", "out.png")
    reply = commands.run("minisd", *argv, cwd=tmp_path)
    assert reply["rc"] == 0, reply["stderr"]
    assert Image.open(tmp_path / "out.png").size == (64, 128)


def test_messages_quote_little(commands, tmp_path):
    """An error message embedded a whole 25 MB key; the nano prompt note echoed a 10,000-word prompt (300 words here:
    a shorter run, the same echo)."""
    from safetensors.torch import save_file

    save_file({"k" * 25_000_000: torch.zeros(1)}, tmp_path / "long-key.safetensors")
    for module, *argv in (("weights_convert", "info"), ("minisd", "generate", "a fox", "--checkpoint")):
        assert_refused(commands, module, *argv, "long-key.safetensors", cwd=tmp_path)
    prompt = " ".join(["word"] * 300)
    reply = commands.run("minisd", "generate", prompt, "--steps", "1", "--seed", "1", "-o", "out.png", cwd=tmp_path)
    assert reply["rc"] == 0 and reply["stderr"], reply["stderr"][:300]
    assert all(len(line) <= 600 for line in reply["stderr"].splitlines()), reply["stderr"][:2000]


def test_kandinsky_shares_the_protections(commands, tmp_path):
    """Kandinsky 2.2's CLI reads the same kinds of files through its own loader: a config that drives memory, NaN
    weights, oversized or blocking source images, a PNG's Device: each refused in one line, bounded, nothing written."""
    import shutil

    from PIL import Image
    from safetensors.torch import load_file, save_file

    from minisd.images import save_png
    from tests.kandinsky_reference import save_tiny_repos, tiny_reference
    from tests.reference import write_reference_tokenizer_folder

    save_tiny_repos(tmp_path, tiny_reference(write_reference_tokenizer_folder(tmp_path / "tokenizer")))
    shutil.copytree(tmp_path / "decoder", tmp_path / "layers")  # a unet config that says a million layers
    config = json.loads((tmp_path / "layers" / "unet" / "config.json").read_text())
    (tmp_path / "layers" / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 1_000_000}))
    shutil.copytree(tmp_path / "decoder", tmp_path / "nan")  # a NaN in MoVQ's weights
    movq = tmp_path / "nan" / "movq" / "diffusion_pytorch_model.safetensors"
    weights = load_file(movq)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    save_file(weights, movq)
    (tmp_path / "huge.png").write_bytes(png_declaring(10_000, 10_000))
    os.mkfifo(tmp_path / "fifo.png")
    shutil.rmtree(tmp_path / "tokenizer")
    shared = ("--prior", "prior", "--steps", "1", "--prior-steps", "1")
    for argv, says in (
        (("generate", "a cat", "--model", "layers", *shared), ("layers_per_block",)),
        (("generate", "a cat", "--model", "nan", *shared), ("NaN or inf",)),
        (("img2img", "a cat", "--model", "decoder", "--image", "huge.png", *shared), ("huge.png",)),
        (("img2img", "a cat", "--model", "decoder", "--image", "fifo.png", *shared), ("fifo.png",)),
        (("generate", "a cat", "--model", "decoder", "--height", "4096", "--width", "4096", *shared), ("4096",)),
    ):
        assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=says)
    text = "a cat\nSteps: 1, Sampler: DDPM, CFG scale: 4, Seed: 1, Size: 64x64, Model: decoder, Device: meta, " + (
        "Prior steps: 1, Prior: prior"
    )
    save_png(Image.new("RGB", (64, 64)), tmp_path / "meta.png", text)
    argv = ("regenerate", "meta.png", "--model", "decoder", "--prior", "prior")
    assert_refused(commands, "minisd", *argv, cwd=tmp_path, says=("meta", "Device"))
