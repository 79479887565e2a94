"""CLIP's byte-pair-encoding tokenizer: prompt text -> 77 token ids for the text encoder.

Byte-pair encoding (BPE, Sennrich et al. 2016, arXiv:1508.07909) in four steps:
  1. clean up: Unicode NFC, every whitespace run becomes one space, lower-case;
  2. split into words: runs of letters, single digits, runs of other symbols, a few English contractions
     ('s 't 're 've 'm 'll 'd); the spaces themselves are dropped;
  3. write each word as its UTF-8 bytes, one visible character per byte (so no text is ever "unknown"), and mark
     the last one as ending a word: "cat" -> c a t</w>;
  4. merge neighbours by the 48,894 learned rules, earliest-learned (most frequent) pair first, until no rule
     applies: h o r s e</w> -> h or s e</w> -> h or se</w> -> hor se</w> -> horse</w>.
Each resulting piece is one id in the 49,408-entry vocabulary (openai/clip-vit-large-patch14's, the one SD v1
was trained with). Steps 1-4 run in HF `tokenizers` (Rust); this file only wires them up.

SD v1 convention (diffusers' `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`):
<|startoftext|> (BOS = 49406), the first 75 prompt tokens, <|endoftext|> (EOS = 49407), then EOS as padding
up to 77. A longer prompt loses its tail, never its EOS.

Where this differs from OpenAI's original clean-up (ftfy.fix_text, html.unescape twice, whitespace collapse,
lower-case): minisd does what transformers' CLIPTokenizer does (NFC, whitespace collapse, lower-case) and is
tested id-for-id against it. So HTML entities stay literal ("&amp;" is the three tokens "&", "amp", ";", where
OpenAI reads "&"), and what ftfy would repair is tokenized as written: mojibake ("cafÃ©"), curly quotes,
ligatures ("ﬁ"), full-width letters ("ＳＤ"). The literal strings <|startoftext|> and <|endoftext|> in a prompt
become the special ids, as in diffusers (OpenAI's also maps them typed in capitals; here those are plain text).
"""

import gzip
import os
from importlib import resources

import tokenizers
import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers.models import BPE

from minisd.errors import MinisdError

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>, also the padding id in SD v1
MAX_LENGTH = 77  # CLIP's position-embedding count: BOS + 75 prompt tokens + EOS
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes ending a word + 48,894 merges + BOS + EOS
N_MERGES = VOCAB_SIZE - 2 * 256 - 2

# CLIP's word split (step 2): the special tokens, contractions, letter runs, single digits, other-symbol runs.
WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def byte_chars() -> list[str]:
    """The 256 characters that stand for the bytes 0..255, in vocabulary order (GPT-2's byte-level trick).

    Bytes that print as a visible character stand for themselves and come first; the 68 others (controls, space,
    NBSP, soft hyphen) are moved to U+0100 onwards, so every byte is a visible, non-space character.

    >>> chars = byte_chars()
    >>> len(chars), chars[:3], chars[188], chars[188 + 32]  # byte 0 -> 'Ā'; byte 32 (space) -> 'Ġ'
    (256, ['!', '"', '#'], 'Ā', 'Ġ')
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    n_hidden = 256 - len(visible)
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(n_hidden)]


class Tokenizer:
    """SD v1's CLIP tokenizer. `tokenizer(prompts)` -> (b, 77) ids; `tokenizer.encode(text)` -> BPE ids only."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        """vocab: token -> id (49,408 entries); merges: token pairs, highest priority first."""
        for name, token_id in (("<|startoftext|>", BOS), ("<|endoftext|>", EOS)):
            if vocab.get(name) != token_id:
                raise MinisdError(f"vocab must map {name} to {token_id} (SD v1 CLIP), got {vocab.get(name)}")
        # unk_token is never produced (every byte, plain and with </w>, is in the vocabulary); set as transformers'.
        bpe = BPE(vocab, merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>")
        backend = tokenizers.Tokenizer(bpe)
        backend.normalizer = normalizers.Sequence(
            # (the whitespace collapse is CLIP's; it cannot change ids, as the split below drops spaces anyway)
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # invert=True: keep the pattern's matches as words, drop what lies between them (spaces)
                pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
                # each UTF-8 byte -> its byte_chars() char. It also re-splits words with GPT-2's pattern, which
                # only matters for "<|endoftext|>" typed in another case: "<|", "endoftext", "|>".
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Matched in the raw text before any clean-up, exactly as transformers registers them.
        specials = ["<|startoftext|>", "<|endoftext|>"]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        self.backend = backend

    @classmethod
    def from_default(cls) -> "Tokenizer":
        """The packaged vocabulary (open_clip's bpe_simple_vocab_16e6.txt.gz, the merges in priority order); offline."""
        gz = resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz"
        with gz.open("rb") as f:
            lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a "#version" header
        chars = byte_chars()
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return cls({token: i for i, token in enumerate(tokens)}, merges)

    @classmethod
    def from_files(cls, vocab_json_path: str | os.PathLike, merges_txt_path: str | os.PathLike) -> "Tokenizer":
        """A diffusers folder's tokenizer/vocab.json (token -> id) and tokenizer/merges.txt (one "a b" pair a line)."""
        for name, path in (("vocab_json_path", vocab_json_path), ("merges_txt_path", merges_txt_path)):
            if not os.path.isfile(path):
                raise MinisdError(f"{name} must be an existing file, got {os.fspath(path)!r}")
        vocab, merges = BPE.read_file(os.fspath(vocab_json_path), os.fspath(merges_txt_path))
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`: no BOS/EOS, no truncation, no padding.

        >>> Tokenizer.from_default().encode("A photo of an astronaut, riding a horse!")
        [320, 1125, 539, 550, 18376, 267, 6765, 320, 4558, 256]
        """
        if not isinstance(text, str):
            raise MinisdError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """ids -> text, as transformers' CLIPTokenizer.decode: the tokens' bytes joined, each "</w>" (end of a word)
        a space, start/end/padding dropped (skip_special_tokens). Lower case and CLIP's spacing: not the original.

        >>> tokenizer = Tokenizer.from_default()
        >>> tokenizer.decode(tokenizer("A photo of an astronaut, riding a horse!")[0])
        'a photo of an astronaut , riding a horse !'
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids):
            raise MinisdError(f"ids must be a list or 1-d tensor of ints in [0, {VOCAB_SIZE}), got {ids!r:.80}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in (BOS, EOS)]
        text = "".join(self.backend.id_to_token(i) for i in ids)
        chars = byte_chars()  # a visible byte stands for itself; the others, in byte order, for U+0100 onwards
        hidden = [b for b in range(256) if chr(b) not in chars]
        byte_of = {c: ord(c) if ord(c) < 256 else hidden[ord(c) - 256] for c in chars}
        pieces = [bytes(byte_of[c] for c in part) for part in text.split("</w>")]  # specials are kept as text
        return b" ".join(pieces).decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts: one str or a list of b strs. Returns (b, 77) int64: BOS, ≤ 75 prompt ids, EOS, EOS padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise MinisdError(f"prompts must be a str or a non-empty list of str, got {prompts!r:.80}")
        rows = []
        for prompt in prompts:
            ids = [BOS, *self.encode(prompt)[: MAX_LENGTH - 2], EOS]  # truncate the prompt, keep BOS and EOS
            rows.append(ids + [EOS] * (MAX_LENGTH - len(ids)))  # pad with EOS
        return torch.tensor(rows, dtype=torch.long)
