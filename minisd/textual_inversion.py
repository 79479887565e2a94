"""Textual inversion: a new word for the text encoder, learned as rows of its token table (Gal et al. 2022,
"An Image is Worth One Word", arXiv:2208.01618). Nothing else of the model changes.

    prompt "a photo of <cat-toy>"                         the lesson (fast.ai, diffusers' textual_inversion.py)
      ──tokenizer──▶ [49406, 320, 1125, 539, 49408, 49407, …]   tokenizer.add_tokens(new_token): a new id
      ──token table──▶ row 49408 = the learned vector v*         text_encoder.resize_token_embeddings + a row write
      ──position table, 12 layers──▶ context for the UNet, as for any word

An embedding of n vectors is a word of n tokens (diffusers names them <t>, <t>_1, …; A1111 just uses n positions).

Two ways to use one, as the two tools people use do:
  - diffusers' way, `load_textual_inversion(tokenizer, text_encoder, path, token=None)`: the token is the one the file
    names (or `token`), typed in the prompt as it is ("<cat-toy>"), matched anywhere, case-insensitive.
  - AUTOMATIC1111's way, an embeddings folder (`EmbeddingsFolder`): every file is named by its stem and loads when
    that name appears in a prompt or a negative prompt as a word of its own ("easynegative", "(my-style:1.2)").
    A1111 matches the name's token sequence inside the tokenized prompt; minisd matches the name in the lower-cased
    text with word boundaries: the same for names written as they are, not for one split by spaces.

The record of an image names each embedding its prompts used with the first 12 hex digits of the file's SHA-256, as
A1111 writes them ("TI hashes"), and its path, so that regenerate finds it again.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.hashes import file_hash
from minisd.tokenizer import Tokenizer
from weights_convert.embeddings import read_embedding

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
TEXT_WIDTHS = {768: "SD v1 (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL (OpenCLIP ViT-bigG)"}


@dataclass
class LoadedEmbedding:
    """An embedding in use: the word typed in prompts, its file, the ids it became and the file's short hash."""

    token: str
    path: Path
    ids: list[int]
    hash: str  # A1111's "TI hashes" entry: the first 12 hex digits of the file's SHA-256


def add_embedding(
    tokenizer: Tokenizer, text_encoder: TextEncoder, token: str, vectors: torch.Tensor, whole_word: bool = False
) -> list[int]:
    """Make `token` a word of len(vectors) tokens whose token-table rows are `vectors` (n, d). Returns its ids.

    The lesson's three lines: tokenizer.add_tokens(token); text_encoder.resize_token_embeddings(…); the new rows
    set to the learned vectors. Refused in one line: a width other than the text encoder's (a 1024-wide SD 2.x
    embedding on SD v1), a word the tokenizer has, a tokenizer and text encoder of different vocabularies."""
    d = text_encoder.config.hidden_size
    if vectors.shape[-1] != d:
        found = TEXT_WIDTHS.get(vectors.shape[-1], "another text encoder")
        raise MinisdError(
            f"embedding {token!r} is {vectors.shape[-1]} wide ({found}); this model's text encoder is {d} wide"
        )
    rows = text_encoder.embeddings.token_embedding.num_embeddings
    if len(tokenizer) != rows:
        raise MinisdError(f"the tokenizer has {len(tokenizer)} ids but the text encoder {rows} rows: add words to both")
    ids = tokenizer.add_word(token, len(vectors), whole_word)  # refuses a word the tokenizer has
    new_ids = text_encoder.add_token_embeddings(vectors)
    assert new_ids == ids, "the tokenizer and the token table grow together"
    return ids


def load_textual_inversion(
    tokenizer: Tokenizer,
    text_encoder: TextEncoder,
    path: str | os.PathLike,
    token: str | None = None,
    whole_word: bool = False,
) -> LoadedEmbedding:
    """Read an embedding file (weights_convert.embeddings: diffusers' learned_embeds.bin/.safetensors, A1111's .pt
    and .safetensors) and add its word: `token`, or the name the file gives. Returns what was loaded."""
    if token is not None and not isinstance(token, str):
        raise MinisdError(f"token must be a str or None, got {type(token).__name__}")
    embedding = read_embedding(path)
    token = embedding.name if token is None else token
    ids = add_embedding(tokenizer, text_encoder, token, embedding.vectors.float(), whole_word)
    return LoadedEmbedding(token, Path(path).resolve(), ids, file_hash(path, digits=12))


class EmbeddingsFolder:
    """A1111's embeddings/ folder: each .pt/.bin/.safetensors file (sub-folders too) is an embedding named by its
    file stem, loaded the first time a prompt uses that name."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        if not folder.is_dir():
            raise MinisdError(f"embeddings folder {str(folder)!r} is not a folder")
        self.folder = folder
        self.files: dict[str, Path] = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES:
                self.files.setdefault(path.stem.lower(), path)  # the first of two same-named files wins, as in A1111

    def used_in(self, texts: list[str]) -> list[tuple[str, Path]]:
        """The (name, file) of every embedding whose name appears in one of `texts` as a word of its own."""
        text = "\n".join(texts).lower()
        return [
            (path.stem, path)
            for name, path in self.files.items()
            if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text)
        ]


def used_embeddings(tokenizer: Tokenizer, loaded: list[LoadedEmbedding], texts: list[str]) -> list[LoadedEmbedding]:
    """The loaded embeddings whose first id appears in the tokenized `texts` (what "TI hashes" lists)."""
    ids = {i for text in texts for i in tokenizer.encode(text)}
    return [e for e in loaded if e.ids[0] in ids]
