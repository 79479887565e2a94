"""Find the weights a PNG's parameters name, by their name and hash, in the places the user names: what `minisd
regenerate` does, since no path of the maker's machine is recorded (minisd/parameters.py).

    where                                what matches the recorded "Model" and "Model hash"
    --models-dir DIR (any number)        a .safetensors / .ckpt file under DIR whose short hash (A1111's 10 digits,
                                         or its old 8) is the recorded one, files named like the model tried first;
                                         without a recorded hash, a diffusers folder DIR/<Model>
                                         (a Kandinsky decoder's or prior's too)
    the Hugging Face cache               a Model that is a hub id ("org/name"), as cached (never downloaded here)
    minisd's nano model                  its hash
(--checkpoint FILE or --model ID|DIR name the weights outright; the command line checks a file's hash then.)
"""

from pathlib import Path

from minisd.api import default_model
from minisd.errors import MinisdError
from minisd.hashes import hash_matches
from minisd.loading import HUB_ID, WEIGHT_SUFFIXES


def weight_files(folder: Path, model_name: str | None) -> list[Path]:
    """The weights files under `folder` (any depth), those whose stem is model_name first."""
    if not folder.is_dir():
        raise MinisdError(f"--models-dir {str(folder)!r}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return sorted(files, key=lambda p: p.stem != model_name)  # stable: named ones first, then the rest in order


def find_weights(model_name: str | None, model_hash: str | None, models_dirs: list[Path]) -> tuple[str, bool]:
    """(the weights to load, whether it is a hub id to read from the cache only) for a record's Model and Model
    hash, looked for in the places of the module docstring; one-line error naming where it looked."""
    if model_name is None and model_hash is None:
        raise MinisdError("the parameters name no model (no Model, no Model hash): pass --checkpoint or --model")
    nano = default_model()
    if model_hash is not None:
        if nano is not None and hash_matches(model_hash, nano):
            return str(nano), False
        for folder in models_dirs:
            for path in weight_files(folder, model_name):
                if hash_matches(model_hash, path):
                    return str(path), False
    elif model_name is not None:
        for folder in models_dirs:
            if (folder / model_name).is_dir():  # a diffusers folder (a Kandinsky prior has no unet/)
                return str(folder / model_name), False
        if HUB_ID.match(model_name):
            return model_name, True
    where = ", ".join(str(folder) for folder in models_dirs) or "no --models-dir given"
    raise MinisdError(
        f"the weights the PNG names (Model {model_name!r}, Model hash {model_hash}) are not in {where}: pass "
        "--checkpoint FILE, --model ID|DIR or --models-dir DIR"
    )
