"""What users bring to a loaded SD v1 model: textual-inversion embeddings, LoRAs and a separate VAE, each the way
diffusers users and AUTOMATIC1111 (A1111) users know it, and the record that makes an image again.

    added by                                       diffusers' way                       A1111's way
    an embedding (minisd/textual_inversion.py)     load_textual_inversion(path, token)  embeddings folder: the file's
                                                   the token typed in the prompt        stem typed in either prompt
    a LoRA (minisd/lora.py)                        load_lora_weights(path, weight)      lora folder: <lora:name:0.8>
                                                   for every image; fuse() to merge     in the prompt, for that image
    a VAE (minisd.loading.load_vae)                from_pretrained(…, vae=…)            (--vae on the command line)

`Additions` keeps them for one StableDiffusion: `record` writes into an image's GenerationParameters what it used
(A1111's "TI hashes", "Lora hashes", "VAE", "VAE hash", and the paths minisd needs to find them again), `applied`
puts a prompt's <lora:…> tags on for one image, and `restore` loads what a record names (`minisd regenerate`).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minisd.errors import MinisdError
from minisd.lora import Adapters, LoraWeight, lora_tags, read_lora
from minisd.parameters import GenerationParameters, file_hash, lora_hash
from minisd.textual_inversion import EmbeddingsFolder, LoadedEmbedding, load_textual_inversion, used_embeddings

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
TAG_PREFIX = "<lora>"  # adapters applied by a prompt's tags carry this before their name, apart from the user's


class Additions:
    """The embeddings, LoRAs and VAE added to one model's networks (`components`: .tokenizer .text_encoder .unet)."""

    def __init__(self, components, fast: bool = False):
        self.components = components
        self.fast = fast  # minisd.fast networks (fused QKV, prepacked convs) take no LoRA
        self.embeddings: list[LoadedEmbedding] = []
        self.embeddings_folder: EmbeddingsFolder | None = None
        self.lora_folder: Path | None = None
        self.lora_paths: dict[str, Path] = {}  # names a prompt's tags may use beyond the folder (from a record)
        self.adapters = Adapters({"unet": components.unet, "text_encoder": components.text_encoder})
        self._lora_cache: dict[Path, list[LoraWeight]] = {}
        self.vae: tuple[str, str | None, str] | None = None  # (name, hash, source) of a separate VAE

    # --- embeddings

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> LoadedEmbedding:
        loaded = load_textual_inversion(self.components.tokenizer, self.components.text_encoder, path, token)
        self.embeddings.append(loaded)
        return loaded

    def use_embeddings_folder(self, folder: str | os.PathLike) -> None:
        self.embeddings_folder = EmbeddingsFolder(folder)

    def _load_used_embeddings(self, texts: list[str]) -> None:
        """Load the folder's embeddings these prompts name (A1111 matches them by file stem)."""
        if self.embeddings_folder is None:
            return
        loaded = {e.token.lower() for e in self.embeddings}
        for name, path in self.embeddings_folder.used_in(texts):
            if name.lower() not in loaded:
                tokenizer, text_encoder = self.components.tokenizer, self.components.text_encoder
                self.embeddings.append(load_textual_inversion(tokenizer, text_encoder, path, name, whole_word=True))

    # --- LoRAs

    def _read_lora(self, path: Path) -> list[LoraWeight]:
        if self.fast:
            raise MinisdError("LoRAs need the eager networks; minisd.fast's fused QKV and prepacked convs take none")
        path = Path(path).resolve()
        if path not in self._lora_cache:
            networks = {"unet": self.components.unet, "text_encoder": self.components.text_encoder}
            self._lora_cache[path] = read_lora(path, networks)
        return self._lora_cache[path]

    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, name: str | None = None) -> None:
        path = Path(path)
        name = path.stem if name is None else name
        if not isinstance(name, str) or name.startswith(TAG_PREFIX):
            raise MinisdError(f"a LoRA's name must be a str not starting with {TAG_PREFIX!r}, got {name!r}")
        self.adapters.add(name, self._read_lora(path), weight, path.resolve(), lora_hash(path))

    def use_lora_folder(self, folder: str | os.PathLike) -> None:
        if not Path(folder).is_dir():
            raise MinisdError(f"LoRA folder {str(folder)!r} is not a folder")
        self.lora_folder = Path(folder)

    def _tag_path(self, name: str) -> Path:
        """The file of a prompt's <lora:name:…>: recorded for the name, else name.safetensors (…) in the folder."""
        if name in self.lora_paths:
            return self.lora_paths[name]
        if self.lora_folder is not None:
            for path in [self.lora_folder / (name + suffix) for suffix in LORA_SUFFIXES]:
                if path.is_file():
                    return path.resolve()
        where = f"in the LoRA folder {self.lora_folder}" if self.lora_folder else "(no LoRA folder given: --lora-dir)"
        raise MinisdError(f"the prompt's <lora:{name}:…> names no LoRA file {where}")

    @contextmanager
    def applied(self, params: GenerationParameters) -> Iterator[str]:
        """For one image: the prompt's <lora:name:w> tags on (on the fly, each at its weight); yields the prompt
        without them, as the text encoder must see it. Every tag's LoRA is off again afterwards."""
        prompt, tags = lora_tags(params.prompt)
        names = []
        try:
            for name, weight in tags.items():
                path = self._tag_path(name)
                self.adapters.add(TAG_PREFIX + name, self._read_lora(path), weight, path, lora_hash(path))
                names.append(TAG_PREFIX + name)
            yield prompt
        finally:
            for name in names:
                self.adapters.remove(name)

    # --- the record

    def record(self, params: GenerationParameters) -> None:
        """Write into params what the image will use: the embeddings its prompts name (loading the folder's), every
        LoRA (the user's and the prompt's tags), the separate VAE."""
        if lora_tags(params.negative_prompt)[1]:
            raise MinisdError("LoRA tags (<lora:name:w>) belong in the prompt, not the negative prompt")
        prompt, tags = lora_tags(params.prompt)
        texts = [prompt, params.negative_prompt]
        self._load_used_embeddings(texts)
        for embedding in used_embeddings(self.components.tokenizer, self.embeddings, texts):
            params.ti_hashes[embedding.token] = embedding.hash
            params.ti_files[embedding.token] = str(embedding.path)
        for adapter in self.adapters.adapters.values():
            params.lora_hashes[adapter.name] = adapter.hash
            entry = {"file": str(adapter.path), "weight": adapter.scale, "fused": adapter.fused}
            params.lora_files[adapter.name] = entry
        for name in tags:
            path = self._tag_path(name)
            if name in params.lora_files:
                raise MinisdError(f"LoRA {name!r} is loaded and also named by a <lora:…> tag: use one of the two")
            params.lora_hashes[name], params.lora_files[name] = lora_hash(path), {"file": str(path)}
        if self.vae is not None:
            params.vae, params.vae_hash, params.vae_source = self.vae

    def restore(self, params: GenerationParameters) -> None:
        """Load what a record names (its embeddings, its LoRAs at their weights, fused as they were; the tags' files
        by name), each checked against its recorded hash: what `minisd regenerate` does before generating."""
        for token, path in params.ti_files.items():
            loaded = self.load_textual_inversion(path, token)
            _same_hash("embedding", token, loaded.hash, params.ti_hashes.get(token))
        for name, entry in params.lora_files.items():
            path = Path(entry.get("file", "")) if isinstance(entry, dict) else Path("")
            if not path.is_file():
                raise MinisdError(f"the LoRA {name!r} the parameters name is no file: {str(path)!r}")
            _same_hash("LoRA", name, lora_hash(path), params.lora_hashes.get(name))
            if "weight" in entry:
                self.load_lora(path, entry["weight"], name)
                if entry.get("fused"):
                    self.adapters.fuse([name])
            else:
                self.lora_paths[name] = path

    def vae_record(self, source: str) -> None:
        """Remember a separate VAE for the records: A1111's name (the file's name, or the folder's or hub id), the
        file's 10-digit hash, and where it came from (absolute path or hub id)."""
        path = Path(source)
        if path.is_file():
            self.vae = (path.name, file_hash(path), str(path.resolve()))
        elif path.is_dir():
            self.vae = (path.resolve().name, None, str(path.resolve()))
        else:
            self.vae = (source, None, source)


def _same_hash(what: str, name: str, found: str, recorded: str | None) -> None:
    if recorded is not None and found != recorded:
        raise MinisdError(f"the {what} {name!r} has changed: its hash is {found}, the parameters record {recorded}")
