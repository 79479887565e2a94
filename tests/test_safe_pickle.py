"""weights_convert.safe_pickle: tensors come out of official-style .ckpt files; no code from any file ever runs.

Every malicious payload below would create a marker file if it ran; each test checks the marker is absent and the
error is one MinisdError line naming the file (and the refused global where there is one).
"""

import collections
import functools
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from minisd.errors import MinisdError
from weights_convert.safe_pickle import Stub
from weights_convert.torch_save import safe_load


def write_torch_zip(path, data_pkl: bytes) -> None:
    """A zip laid out like torch.save's, holding a hand-made data.pkl (no storages)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")


def assert_refused(path, marker, *names):
    with pytest.raises(MinisdError) as info:
        safe_load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for name in names:
        assert name in message, message
    assert not marker.exists(), "the payload ran"
    return message


class Reduce:
    """An object whose pickle is `func(*args)`: the classic payload."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hand_written_payloads(marker) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the global the refusal must name). Written opcode by opcode, protocol 0/2/4."""
    m = str(marker).encode()
    touch = b"S'touch " + m + b"'\n"
    code = b"S\"open('" + m + b"', 'w')\"\n"
    return {
        # GLOBAL + REDUCE
        "os.system": (b"cos\nsystem\n(" + touch + b"tR.", "os.system"),
        "posix.system": (b"cposix\nsystem\n(" + touch + b"tR.", "posix.system"),
        "builtins.eval": (b"cbuiltins\neval\n(" + code + b"tR.", "builtins.eval"),
        "builtins.exec": (b"cbuiltins\nexec\n(" + code + b"tR.", "builtins.exec"),
        "__builtin__.eval": (b"\x80\x02c__builtin__\neval\n(" + code + b"tR.", "__builtin__.eval"),
        # __import__('os') then getattr(os, 'system')(cmd)
        "getattr chain": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(" + touch + b"tR.",
            "builtins.getattr",
        ),
        "__import__": (b"c__builtin__\n__import__\n(S'os'\ntR.", "__builtin__.__import__"),
        # INST: module/name inline, instantiated with the marked arguments
        "INST": (b"(" + touch + b"ios\nsystem\n.", "os.system"),
        # OBJ: class and arguments from the stack
        "OBJ": (b"(cos\nsystem\n" + touch + b"o.", "os.system"),
        # STACK_GLOBAL with the names memoised, dropped and fetched back at run time (protocol 4)
        "STACK_GLOBAL from memo": (
            b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94" + b"00"  # push, memoise, pop both
            b"h\x00h\x01\x93" + b"\x8c\x08touch " + bytes([len(m)]) + b"\x85R.",  # fetch back, STACK_GLOBAL
            "posix.system",
        ),
        # STACK_GLOBAL whose name comes from an allowed call: bytes, not str, so refused by STACK_GLOBAL itself
        "STACK_GLOBAL from _codecs": (
            b"\x80\x02\x8c\x02os\x8c\x06system(tc_codecs\nencode\n0\x93.",
            "",
        ),
        # BUILD: set __setstate__ to eval on an allowed object, then BUILD again with code
        "BUILD setstate": (
            b"ccollections\nOrderedDict\n)R}S'__setstate__'\ncbuiltins\neval\nsb" + code + b"b.",
            "builtins.eval",
        ),
        # BUILD on an object that is neither a stub nor an OrderedDict
        "BUILD on a list": (b"(l}S'__class__'\nS'x'\nsb.", "BUILD"),
        # a harmless stub class called as a function does nothing, and its result cannot reach os.system
        "stub then os.system": (
            b"cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n("
            + touch
            + b"tRcos\nsystem\n("
            + touch
            + b"tR.",
            "os.system",
        ),
    }


@pytest.mark.parametrize(
    "name",
    list(hand_written_payloads("m")),
)
def test_hand_written_payloads_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    payload, refused = hand_written_payloads(marker)[name]
    path = tmp_path / "evil.ckpt"
    write_torch_zip(path, payload)
    assert_refused(path, marker, refused)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "INST"])
def test_payloads_in_legacy_container_never_run(tmp_path, name):
    """The pre-1.6 (non-zip) format starts with a pickle too; the same payloads are refused there."""
    marker = tmp_path / "pwned"
    payload, refused = hand_written_payloads(marker)[name]
    path = tmp_path / "evil.pt"
    path.write_bytes(payload)
    assert_refused(path, marker, refused)


def pickled_payloads(marker) -> dict[str, tuple[object, str]]:
    """name -> (object whose pickle is the payload, the global the refusal must name), via pickle itself."""
    code = f"open({str(marker)!r}, 'w')"
    return {
        "os.system": (Reduce(os.system, (f"touch {marker}",)), f"{os.system.__module__}.system"),
        "eval": (Reduce(eval, (code,)), "builtin"),  # protocol 2 names the module __builtin__, 4 builtins
        "exec": (Reduce(exec, (code,)), "builtin"),
        "subprocess.Popen": (Reduce(subprocess.Popen, (["touch", str(marker)],)), ".Popen"),  # 2: commands.Popen
        "reduce returns a partial": (
            Reduce(functools.partial(os.system, f"touch {marker}"), ()),
            "functools.partial",
        ),
    }


@pytest.mark.parametrize("name", list(pickled_payloads("m")))
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickled_payloads_never_run(tmp_path, name, protocol):
    marker = tmp_path / "pwned"
    payload, refused = pickled_payloads(marker)[name]
    path = tmp_path / "evil.ckpt"
    write_torch_zip(path, pickle.dumps(payload, protocol=protocol))
    assert_refused(path, marker, refused)


def test_payload_nested_in_a_state_dict_never_runs(tmp_path):
    """A real torch.save file whose state_dict hides an os.system call among tensors."""
    marker = tmp_path / "pwned"
    path = tmp_path / "nested.ckpt"
    state_dict = {"a.weight": torch.ones(2), "b": {"c": [Reduce(os.system, (f"touch {marker}",))]}}
    torch.save({"state_dict": state_dict, "epoch": 1}, path)
    assert_refused(path, marker, f"{os.system.__module__}.system")


def install_fake_lightning(monkeypatch) -> type:
    """Register a stand-in ModelCheckpoint at Lightning's module path so torch.save can pickle it by that name."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    for name in ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.dirpath, self.best_model_score = None, "/ckpt", torch.tensor(0.25)

        def __setstate__(self, state):
            raise AssertionError("the real class must never be used when loading")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module_name, "ModelCheckpoint"
    sys.modules[module_name].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


def official_like_state_dict() -> dict[str, torch.Tensor]:
    """A few tensors with official names and dtypes (float32, int64 position_ids, int32 EMA counter)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "betas": torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2).float(),
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=generator),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
        "first_stage_model.decoder.mid.attn_1.q.weight": torch.randn(4, 4, 1, 1, generator=generator).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
    }


def test_official_style_ckpt_loads_where_weights_only_refuses(tmp_path, monkeypatch):
    state_dict = official_like_state_dict()
    path = tmp_path / "sd-v1-like.ckpt"
    with monkeypatch.context() as patch:
        model_checkpoint = install_fake_lightning(patch)
        checkpoint = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            # Lightning 1.4 keys callback state by the callback class; an instance is pickled here too
            "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.5)}, "instance": model_checkpoint()},
            "optimizer_states": [],
            "lr_schedulers": [],
        }
        torch.save(checkpoint, path)
    assert "pytorch_lightning" not in sys.modules  # the loader below cannot lean on the stand-in

    # The reason for safe_pickle: torch's own safe mode refuses the file.
    with pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(path, weights_only=True)
    print("torch.load(weights_only=True):", [line for line in str(refused.value).splitlines() if "global" in line][:1])

    loaded = safe_load(path)
    assert (loaded["epoch"], loaded["global_step"], loaded["pytorch-lightning_version"]) == (6, 470000, "1.4.2")
    assert loaded["state_dict"].keys() == state_dict.keys()
    for name, tensor in state_dict.items():
        assert loaded["state_dict"][name].dtype == tensor.dtype, name
        assert torch.equal(loaded["state_dict"][name], tensor), name
    (callback_class,) = [key for key in loaded["callbacks"] if key != "instance"]
    assert issubclass(callback_class, Stub)
    assert callback_class.pickled_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert isinstance(loaded["callbacks"]["instance"], callback_class)
    assert isinstance(loaded["callbacks"][callback_class]["best_model_score"], Stub)  # numpy scalar, inert


def test_tensors_are_views_of_one_memory_map(tmp_path):
    """No copy: tensors sit at the same relative addresses as torch.load(mmap=True) puts them (file offsets)."""
    state_dict = official_like_state_dict()
    path = tmp_path / "plain.pt"
    torch.save(state_dict, path)
    ours, torchs = safe_load(path), torch.load(path, mmap=True, weights_only=True)
    first = next(iter(state_dict))
    for name in state_dict:
        assert ours[name].data_ptr() - ours[first].data_ptr() == torchs[name].data_ptr() - torchs[first].data_ptr()
        assert torch.equal(ours[name], state_dict[name])


def test_legacy_non_zip_file_loads(tmp_path):
    state_dict = collections.OrderedDict(official_like_state_dict())
    state_dict["view"] = state_dict["model.diffusion_model.input_blocks.0.0.weight"][1]  # shares a storage
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": state_dict}, path, _use_new_zipfile_serialization=False)
    loaded = safe_load(path)["state_dict"]
    for name, tensor in state_dict.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "mutilate",
    [
        lambda data: data[: len(data) // 2],  # truncated: no central directory
        lambda data: b"junk" + data[4:],  # bad signature at the start, zip still found from the end
        lambda data: b"not a checkpoint at all",
    ],
)
def test_corrupt_files_give_one_line(tmp_path, mutilate):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": official_like_state_dict()}, path)
    path.write_bytes(mutilate(path.read_bytes()))
    with pytest.raises(MinisdError) as info:
        safe_load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
