"""What users bring to a loaded SD v1 model: textual-inversion embeddings, LoRAs and a separate VAE, each the way
diffusers users and AUTOMATIC1111 (A1111) users know it, and the record that makes an image again.

    added by                                       diffusers' way                       A1111's way
    an embedding (minisd/textual_inversion.py)     load_textual_inversion(path, token)  embeddings folder: the file's
                                                   the token typed in the prompt        stem typed in either prompt
    a LoRA (minisd/lora.py)                        load_lora_weights(path, weight)      lora folder: <lora:name:0.8>
                                                   for every image; fuse() to merge     in the prompt, for that image
    a VAE (minisd.loading.load_vae)                from_pretrained(…, vae=…)            (--vae on the command line)

`Additions` keeps them for one StableDiffusion: `record` writes into an image's GenerationParameters what it used
(A1111's "TI hashes", "Lora hashes", "VAE", "VAE hash", and minisd's "Lora weights": names and hashes, never a
path), `applied` puts a prompt's <lora:…> tags on for one image, and `restore` loads what a record names, found
again by hash in the folders given (`minisd regenerate --models-dir`).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from minisd.errors import MinisdError
from minisd.hashes import file_hash, find_by_hash, lora_hash
from minisd.loading import load_vae
from minisd.lora import Adapters, LoraWeight, lora_tags, read_lora
from minisd.parameters import GenerationParameters
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
        self.vae: tuple[str, str | None] | None = None  # (name, hash) of a separate VAE

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
        for adapter in self.adapters.adapters.values():
            params.lora_hashes[adapter.name] = adapter.hash
            params.lora_weights[adapter.name] = {"weight": adapter.scale, "fused": adapter.fused}
        for name in tags:
            if name in params.lora_weights:
                raise MinisdError(f"LoRA {name!r} is loaded and also named by a <lora:…> tag: use one of the two")
            params.lora_hashes[name] = lora_hash(self._tag_path(name))
        if self.vae is not None:
            params.vae, params.vae_hash = self.vae

    def restore(self, params: GenerationParameters, places: list[Path]) -> None:
        """Load what a record names, each file found under `places` by its recorded hash (no path is recorded): its
        embeddings, its LoRAs at their weights, fused as they were, and the files of its prompt's <lora:…> tags (by
        name): what `minisd regenerate` does before generating."""
        for token, recorded in params.ti_hashes.items():
            path = find_by_hash("embedding", token, recorded, lambda p: file_hash(p, digits=12), places)
            self.load_textual_inversion(path, token)
        for name, recorded in params.lora_hashes.items():
            path = find_by_hash("LoRA", name, recorded, lora_hash, places).resolve()
            entry = params.lora_weights.get(name)
            if entry is None:  # a <lora:name:w> tag of the prompt: its weight is there
                self.lora_paths[name] = path
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("weight"), int | float):
                raise MinisdError(f"parameters' Lora weights for {name!r} must be {{'weight': w, ...}}, got {entry!r}")
            self.load_lora(path, entry["weight"], name)
            if entry.get("fused"):
                self.adapters.fuse([name])

    def vae_record(self, source: str | os.PathLike | None) -> None:
        """Remember a separate VAE for the records: A1111's name (the file's name, or the folder's, or the hub id)
        and a file's 10-digit hash (never a path: minisd.locate.find_vae finds it again). None: no separate VAE."""
        if source is None:
            self.vae = None
            return
        path = Path(source)
        if path.is_file():
            self.vae = (path.name, file_hash(path))
        else:
            self.vae = (path.resolve().name if path.is_dir() else str(source), None)


class AdditionsMethods:
    """The diffusers-named methods StableDiffusion (minisd/api.py) offers for embeddings and LoRAs, on its
    `additions`."""

    additions: Additions

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Add a textual-inversion embedding (diffusers' learned_embeds.bin/.safetensors, A1111's .pt/.safetensors)
        as the word `token` (None: the name the file gives); type it in prompts. Returns the token."""
        return self.additions.load_textual_inversion(path, token).token

    def use_embeddings_folder(self, folder: str | os.PathLike) -> None:
        """A1111's embeddings folder: an embedding loads when its file's stem appears in a prompt or negative prompt."""
        self.additions.use_embeddings_folder(folder)

    def load_lora_weights(self, path: str | os.PathLike, weight: float = 1.0, adapter_name: str | None = None) -> None:
        """Apply a LoRA (kohya/A1111 or diffusers/PEFT file) on the fly, at `weight`, to every image from now on,
        beside any others; named `adapter_name` (None: the file's stem)."""
        self.additions.load_lora(path, weight, adapter_name)

    def fuse_lora(self) -> None:
        """Merge the LoRAs applied so far into the weights (faster per step; unload_lora_weights restores them)."""
        self.additions.adapters.fuse()

    def unload_lora_weights(self) -> None:
        """Every LoRA off: the UNet's and text encoder's weights are back, bit for bit."""
        self.additions.adapters.unload()

    def use_lora_folder(self, folder: str | os.PathLike) -> None:
        """A1111's Lora folder: <lora:name:0.8> in a prompt applies folder/name.safetensors at 0.8 to that image."""
        self.additions.use_lora_folder(folder)


def separate_vae(components, vae: str | os.PathLike, dtype, device, local_files_only: bool):
    """A separate VAE for these components (minisd.loading.load_vae), checked to fit their UNet."""
    loaded = load_vae(vae, dtype=dtype, device=device, local_files_only=local_files_only)
    channels = (loaded.config.latent_channels, components.unet.config.out_channels)
    if channels[0] != channels[1]:
        raise MinisdError(f"vae {vae}: {channels[0]} latent channels, the UNet's are {channels[1]}")
    return loaded
