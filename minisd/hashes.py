"""The hashes that tie an image's record (minisd/parameters.py) to its weights and source images, and the source
images given again for a record: no path of the maker's machine is recorded, the files are found again by hash.

    file_hash          A1111's "Model hash" and "VAE hash": the first 10 hex digits of the file's SHA-256; "TI
                       hashes": 12
    lora_hash          A1111's "Lora hashes": 12 hex digits of the SHA-256 of a .safetensors file's tensor bytes
    legacy_file_hash   A1111's old 8-digit "Model hash" (SHA-256 of 64 KiB at offset 1 MiB), still in old PNGs
    pixels_hash        "Init image hash" / "Mask image hash": SHA-256 of an image's pixels (mode, size, bytes)

A 4 GB checkpoint takes seconds to hash, and `minisd regenerate --models-dir` may hash every file of a folder, so
the SHA-256 of files of CACHE_FROM bytes or more is kept, as A1111 keeps its cache.json, in hashes.json in
$MINISD_CACHE (default $XDG_CACHE_HOME/minisd, else ~/.cache/minisd), keyed by the file's absolute path, size and
modification time: a file changed in any way is hashed again. A cache that cannot be read or written is ignored.
"""

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from minisd.errors import MinisdError
from minisd.images import open_image


def short_hash(data: bytes) -> str:
    """The first 10 hex digits of SHA-256: A1111's short "Model hash" form.

    >>> short_hash(b"")
    'e3b0c44298'
    """
    return hashlib.sha256(data).hexdigest()[:10]


CACHE_FROM = 64 << 20  # files this large or larger have their SHA-256 cached (checkpoints, VAEs; not embeddings)


def hash_cache_path() -> Path:
    """hashes.json in $MINISD_CACHE, else $XDG_CACHE_HOME/minisd, else ~/.cache/minisd."""
    folder = (
        os.environ.get("MINISD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minisd"
    )
    return Path(folder) / "hashes.json"


def _read_cache(cache: Path) -> dict:
    try:
        entries = json.loads(cache.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Path, entries: dict) -> None:
    """Write the whole cache to a temporary file beside it, then rename: a reader never sees half a file."""
    temporary = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump(entries, f)
        os.replace(temporary, cache)
    except OSError:  # a read-only home: hash again next time
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def file_hash(path: str | os.PathLike, digits: int = 10, skip: int = 0) -> str:
    """The first `digits` hex digits of the SHA-256 of a file's bytes from byte `skip` on, read in 16 MiB pieces:
    A1111's "Model hash" and "VAE hash" (10 digits) and "TI hashes" (12). Whole large files: through the cache."""
    stat = os.stat(path)
    cached = skip == 0 and stat.st_size >= CACHE_FROM
    if cached:
        cache, key = hash_cache_path(), str(Path(path).resolve())
        entry = _read_cache(cache).get(key)
        if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == [stat.st_size, stat.st_mtime_ns]:
            sha256 = entry.get("sha256")
            if isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256):
                return sha256[:digits]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while piece := f.read(16 << 20):
            digest.update(piece)
    if cached:  # read again just before writing: another process may have added entries meanwhile
        entries = _read_cache(cache)
        entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        _write_cache(cache, entries)
    return digest.hexdigest()[:digits]


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's "Lora hashes" entry: 12 hex digits of the SHA-256 of a .safetensors file's tensor bytes, after its
    JSON header (kohya's sd-scripts "addnet" hash, unchanged when only the metadata is edited); of the whole file for
    other formats."""
    skip = 0
    if str(path).lower().endswith(".safetensors"):
        with open(path, "rb") as f:
            skip = 8 + int.from_bytes(f.read(8), "little")  # u64 header length, then the header
    return file_hash(path, digits=12, skip=skip)


def legacy_file_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash (before 2022-12): SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def hash_matches(recorded: str, path: str | os.PathLike) -> bool:
    """Whether a recorded "Model hash" names this file: A1111's short hash (10 hex digits, file_hash) or its old
    one (8, legacy_file_hash), in either case (A1111 writes lower case, Civitai shows its "AutoV2" in upper).
    Any other form matches nothing."""
    recorded = recorded.lower()
    if re.fullmatch(r"[0-9a-f]{10}", recorded):
        return file_hash(path) == recorded
    return bool(re.fullmatch(r"[0-9a-f]{8}", recorded)) and legacy_file_hash(path) == recorded


def pixels_hash(pil: Image.Image) -> str:
    """short_hash of an image's pixels: mode, size and bytes (the same picture in another file format hashes alike)."""
    return short_hash(f"{pil.mode} {pil.width}x{pil.height}\n".encode() + pil.tobytes())


ADDITION_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # embeddings, LoRAs and VAE files


def find_by_hash(what: str, name: str, recorded: str, hash_of, places: list[Path]) -> Path:
    """The file under `places` (folders, searched at any depth) whose hash_of(path) is `recorded`, files whose stem
    is `name` tried first: an embedding, LoRA or VAE a record names (minisd/additions.py)."""
    for folder in places:
        if not Path(folder).is_dir():
            raise MinisdError(f"--models-dir {str(folder)!r}: no such folder")
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in ADDITION_SUFFIXES and p.is_file())
        for path in sorted(files, key=lambda p: p.stem != name):
            if hash_of(path) == recorded:
                return path
    folders = ", ".join(str(folder) for folder in places)
    where = f"is in none of {folders}" if places else "needs a folder to be found in"
    raise MinisdError(f"the {what} {name!r} the PNG names (hash {recorded}) {where}: pass --models-dir DIR")


# ---------------------------------------------------------------------------------------------------------------
# Source images: given as PIL images or paths, recorded by path and hash


def source_image(name: str, image: Image.Image | str | os.PathLike) -> tuple[Image.Image, str]:
    """image (PIL or a path) -> (the PIL image, its pixels hash)."""
    if isinstance(image, Image.Image):
        return image, pixels_hash(image)
    if isinstance(image, str | os.PathLike):
        pil = open_image(name, image)
        return pil, pixels_hash(pil)
    raise MinisdError(f"{name} must be a PIL image or an image file path, got {type(image).__name__}")


def recorded_image(name: str, image: Image.Image | str | os.PathLike | None, recorded_hash: str | None) -> Image.Image:
    """A source image given again for a record, checked against its recorded pixels hash (or A1111's "Init image
    hash": the MD5 of its bytes, 32 hex digits)."""
    if image is None:
        raise MinisdError(f"the parameters were made from a {name} (pixels hash {recorded_hash}): give it again")
    pil, digest = source_image(name, image)
    if recorded_hash is not None and len(recorded_hash) == 32:
        digest = hashlib.md5(pil.tobytes()).hexdigest()  # A1111's, for naming files, not for security
    if recorded_hash is not None and digest != recorded_hash:
        raise MinisdError(
            f"{name} {str(image)[:80]!r} is not the one recorded: pixels hash {digest}, recorded {recorded_hash}"
        )
    return pil
