"""Find the weights a PNG's parameters name, by their name and hash, in the places the user names: what `minisd
regenerate` does, since no path of the maker's machine is recorded (minisd/parameters.py).

    where                                what matches the recorded "Model" and "Model hash"
    --models-dir DIR (any number)        a .safetensors / .ckpt file under DIR whose short hash (A1111's 10 digits,
                                         or its old 8) is the recorded one, files named like the model tried first;
                                         without a recorded hash, a diffusers folder DIR/<Model>
                                         (a Kandinsky decoder's or prior's too), else a file <Model>.safetensors
                                         or .ckpt under DIR (A1111 with its model hash turned off)
    the Hugging Face cache               a Model that is a hub id ("org/name"), as cached (never downloaded here)
    minisd's nano model                  its hash
(--checkpoint FILE or --model ID|DIR name the weights outright; the command line checks a file's hash then.)
"""

from pathlib import Path

from minisd.api import default_model
from minisd.errors import MinisdError
from minisd.hashes import file_hash, find_by_hash, hash_matches
from minisd.loading import HUB_ID, WEIGHT_SUFFIXES


def is_hub_id(name: str) -> bool:
    """Whether a recorded Model is a hub id "org/name" by the hub's rules (no "..", "--", no part starting or ending
    with "." or "-"): never a relative path such as "../elsewhere".

    >>> is_hub_id("CompVis/stable-diffusion-v1-4"), is_hub_id("../outside")
    (True, False)
    """
    parts = name.split("/")
    return (
        bool(HUB_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not any(part[0] in ".-" or part[-1] in ".-" for part in parts)
    )


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
        plain = model_name not in ("", ".", "..") and Path(model_name).name == model_name  # not "../elsewhere"
        for folder in models_dirs if plain else []:
            if (folder / model_name).is_dir():  # a diffusers folder (a Kandinsky prior has no unet/)
                return str(folder / model_name), False
            named = [path for path in weight_files(folder, model_name) if path.stem == model_name]
            if named:  # A1111 with its model hash turned off writes the file's name alone
                return str(named[0]), False
        if is_hub_id(model_name):
            return model_name, True
    where = ", ".join(str(folder) for folder in models_dirs) or "no --models-dir given"
    raise MinisdError(
        f"the weights the PNG names (Model {model_name!r}, Model hash {model_hash}) are not in {where}: pass "
        "--checkpoint FILE, --model ID|DIR or --models-dir DIR"
    )


def find_vae(name: str, recorded: str | None, places: list[Path]) -> str:
    """The separate VAE a record names: a file by its hash under `places`, else a folder <name> in one of them, else
    a hub id as cached."""
    if recorded is not None:
        return str(find_by_hash("VAE", Path(name).stem, recorded, file_hash, places))
    for folder in places:
        if (Path(folder) / name).is_dir():
            return str(Path(folder) / name)
    if HUB_ID.match(name):
        return name
    raise MinisdError(f"the VAE {name!r} the PNG names is no hub id and no folder in --models-dir: pass --models-dir")
