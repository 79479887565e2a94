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
was trained with). Steps 1-4 run in HF `tokenizers` (Rust), the fast path `Tokenizer.encode` takes; the same four
steps are written out in plain Python below it (`Tokenizer.encode_reference`, the merge loop `bpe_reference`), as
attention_reference is beside attention(), and tests/test_tokenizer.py checks they agree id for id.

SD convention (diffusers' `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`):
<|startoftext|> (BOS = 49406), the first 75 prompt tokens, <|endoftext|> (EOS = 49407), then padding up to 77:
EOS again in SD v1, id 0 ("!") in SD 2.x, whose OpenCLIP tokenizer pads with zeros (open_clip `tokenize`;
diffusers' SD 2 tokenizer folders say `"pad_token": "!"`). Same vocabulary, same merges: only the padding id
differs, and it matters, because padding tokens are ordinary tokens the text encoder reads. A longer prompt loses
its tail, never its EOS.

Where this differs from OpenAI's original clean-up (ftfy.fix_text, html.unescape twice, whitespace collapse,
lower-case): minisd does what transformers' CLIPTokenizer does (NFC, whitespace collapse, lower-case) and is
tested id-for-id against it. So HTML entities stay literal ("&amp;" is the three tokens "&", "amp", ";", where
OpenAI reads "&"), and what ftfy would repair is tokenized as written: mojibake ("cafÃ©"), curly quotes,
ligatures ("ﬁ"), full-width letters ("ＳＤ"). The literal strings <|startoftext|> and <|endoftext|> in a prompt
become the special ids, as in diffusers (OpenAI's also maps them typed in capitals; here those are plain text).
"""

import gzip
import os
import re
import unicodedata
from importlib import resources
from itertools import pairwise

import tokenizers
import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers.models import BPE

from minisd.errors import MinisdError

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>, also the padding id in SD v1
PAD_TOKENS = {"sd1": "<|endoftext|>", "sd2": "!"}  # the padding token of each family's tokenizer (id 49407, id 0)
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


def bpe_reference(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word, written out (step 4; CLIP's simple_tokenizer.bpe): start from its characters,
    the last one marked as ending the word, then merge the neighbour pair learned earliest (lowest rank) everywhere
    it occurs, again and again, until no pair of neighbours is a learned merge.

    word: one word of byte characters (byte_chars()), as the split gives it. ranks: (left, right) -> its merge's
    priority, 0 first. Returns the word's pieces, each one vocabulary entry.

    >>> ranks = {("o", "r"): 0, ("s", "e</w>"): 1, ("h", "or"): 2, ("hor", "se</w>"): 3}
    >>> bpe_reference("horse", ranks)  # h o r s e</w> -> h or s e</w> -> h or se</w> -> hor se</w> -> horse</w>
    ['horse</w>']
    >>> bpe_reference("horses", ranks)  # "se" only merges at a word's end: no ("s", "e") rule here
    ['hor', 's', 'e', 's</w>']
    """
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = set(pairwise(pieces))  # the neighbours (left, right)
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break  # no neighbours form a learned merge: done
        merged, i = [], 0
        while i < len(pieces):  # merge every occurrence of `best`, left to right
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def byte_to_char() -> dict[int, str]:
    """byte -> the character standing for it (byte_chars() in byte order): a visible byte is its own character.

    >>> table = byte_to_char()
    >>> table[ord("a")], table[32], table[0]
    ('a', 'Ġ', 'Ā')
    """
    chars = byte_chars()
    hidden = [b for b in range(256) if chr(b) not in chars]  # in byte order, as they follow the visible ones
    return {b: chr(b) for b in range(256) if chr(b) in chars} | {b: chr(256 + i) for i, b in enumerate(hidden)}


# Unicode's White_Space property, the `\s` of the regexes above (Python's str.isspace also counts \x1c-\x1f).
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)
}
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def char_kind(c: str) -> str:
    """Which run of the word split a character belongs to: "letter" (\\p{L}), "number" (\\p{N}), "space", "other"."""
    if c in WHITE_SPACE:
        return "space"
    return {"L": "letter", "N": "number"}.get(unicodedata.category(c)[0], "other")


def split_words(text: str) -> list[str]:
    """Step 2 written out: WORD_PATTERN's alternatives tried in order at each position, spaces dropped. A special
    token spelled in the cleaned-up text (typed in another case) is three words, "<|", "endoftext", "|>", as the
    byte-level step re-splits it.

    >>> split_words("it's a (red:1.2) cat!!")
    ['it', "'s", 'a', '(', 'red', ':', '1', '.', '2', ')', 'cat', '!!']
    """
    words, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        kind = char_kind(text[i])
        if special:
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
        elif contraction:
            words.append(contraction)
            i += len(contraction)
        elif kind == "number":  # one digit at a time
            words.append(text[i])
            i += 1
        elif kind == "space":
            i += 1
        else:  # a run of letters, or a run of other symbols
            j = i + 1
            while j < len(text) and char_kind(text[j]) == kind:
                j += 1
            words.append(text[i:j])
            i = j
    return words


class Tokenizer:
    """SD's CLIP tokenizer. `tokenizer(prompts)` -> (b, 77) ids; `tokenizer.encode(text)` -> BPE ids only."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = PAD_TOKENS["sd1"]):
        """vocab: token -> id (49,408 entries); merges: token pairs, highest priority first; pad_token: the token
        that fills a row after EOS ("<|endoftext|>" for SD v1, "!" for SD 2.x: PAD_TOKENS)."""
        for name, token_id in (("<|startoftext|>", BOS), ("<|endoftext|>", EOS)):
            if vocab.get(name) != token_id:
                raise MinisdError(f"vocab must map {name} to {token_id} (SD's CLIP), got {vocab.get(name)}")
        if not isinstance(pad_token, str) or pad_token not in vocab:
            raise MinisdError(
                f"pad_token must be a token of the vocabulary such as '!' or '<|endoftext|>', got {pad_token!r:.40}"
            )
        self.pad_id = vocab[pad_token]  # 49407 (SD v1) or 0 (SD 2.x)
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
        self.vocab = vocab
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}  # for encode_reference
        self.added: dict[int, list[int]] = {}  # a word added by add_word (its first id) -> all its ids

    @classmethod
    def from_default(cls, pad_token: str = PAD_TOKENS["sd1"]) -> "Tokenizer":
        """The packaged vocabulary (open_clip's bpe_simple_vocab_16e6.txt.gz, the merges in priority order); offline.
        SD v1 and SD 2.x share it; pad_token picks the family's padding (PAD_TOKENS)."""
        gz = resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz"
        with gz.open("rb") as f:
            lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a "#version" header
        chars = byte_chars()
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return cls({token: i for i, token in enumerate(tokens)}, merges, pad_token)

    @classmethod
    def from_files(
        cls, vocab_json_path: str | os.PathLike, merges_txt_path: str | os.PathLike, pad_token: str = PAD_TOKENS["sd1"]
    ) -> "Tokenizer":
        """A diffusers folder's tokenizer/vocab.json (token -> id) and tokenizer/merges.txt (one "a b" pair a line);
        pad_token as its special_tokens_map.json names it."""
        for name, path in (("vocab_json_path", vocab_json_path), ("merges_txt_path", merges_txt_path)):
            if not os.path.isfile(path):
                raise MinisdError(f"{name} must be an existing file, got {os.fspath(path)!r}")
        vocab, merges = BPE.read_file(os.fspath(vocab_json_path), os.fspath(merges_txt_path))
        return cls(vocab, merges, pad_token)

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`: no BOS/EOS, no truncation, no padding. A word added by add_word gives its ids.

        >>> Tokenizer.from_default().encode("A photo of an astronaut, riding a horse!")
        [320, 1125, 539, 550, 18376, 267, 6765, 320, 4558, 256]
        """
        if not isinstance(text, str):
            raise MinisdError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates: bytes a terminal could not decode (Python's escapes)
            raise MinisdError(f"text must be valid text, got undecodable bytes at character {error.start}") from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [j for i in ids for j in self.added.get(i, [i])] if self.added else ids

    def __len__(self) -> int:
        """Vocabulary size with the added words' ids: 49,408 for SD v1's; the next added id is len(tokenizer)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_word(self, word: str, n: int = 1, whole_word: bool = False) -> list[int]:
        """Add a word of n tokens (a textual-inversion embedding of n vectors): wherever `word` appears in a
        prompt it becomes the n ids len(tokenizer), …, len(tokenizer) + n − 1. Returns them.

        Matched as transformers' added tokens are: in the lower-cased text, before the BPE split, anywhere (also
        inside a longer word) unless whole_word. The extra ids are named word_1, …, word_{n−1}, as diffusers names
        them, and may be typed alone too. Refused: a word of the vocabulary or one added before.

        >>> tokenizer = Tokenizer.from_default()
        >>> tokenizer.add_word("<cat-toy>", n=2), tokenizer.encode("a <Cat-Toy> photo")
        ([49408, 49409], [320, 49408, 49409, 1125])
        """
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise MinisdError(f"an added word must be a non-empty str without spaces at its ends, got {word!r}")
        if not isinstance(n, int) or not 1 <= n <= MAX_LENGTH - 2:
            raise MinisdError(f"an added word has 1 to {MAX_LENGTH - 2} tokens, got {n!r}")
        names = [word] + [f"{word}_{i}" for i in range(1, n)]
        added = {token.content.lower() for token in self.backend.get_added_tokens_decoder().values()}
        taken = [name for name in names if name in self.vocab or name.lower() in added]
        if taken:
            raise MinisdError(f"the tokenizer already has the word {taken[0]!r}: choose another token")
        first = len(self)
        self.backend.add_tokens([AddedToken(name, normalized=True, single_word=whole_word) for name in names])
        ids = [self.backend.token_to_id(name) for name in names]
        assert ids == list(range(first, first + n)), "added words take the next ids"
        self.added[ids[0]] = ids
        return ids

    def encode_reference(self, text: str) -> list[int]:
        """encode(text), computed in plain Python instead of `tokenizers`: the four steps written out.

        >>> tokenizer = Tokenizer.from_default()
        >>> tokenizer.encode_reference("A photo of an astronaut, riding a horse!") == tokenizer.encode(
        ...     "A photo of an astronaut, riding a horse!")
        True
        """
        if not isinstance(text, str):
            raise MinisdError(f"text must be a str, got {type(text).__name__}")
        char_of_byte = byte_to_char()
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):  # special tokens as typed first
            if part in SPECIALS:
                ids.append(self.vocab[part])
                continue
            part = unicodedata.normalize("NFC", part)  # step 1: clean up (whitespace runs become one space)
            # each character lower-cased alone: str.lower would make a word's last Σ a ς, the fast path never does
            part = "".join(" " if c in WHITE_SPACE else c.lower() for c in part)
            for word in split_words(part):  # step 2: words
                word = "".join(char_of_byte[b] for b in word.encode("utf-8"))  # step 3: one character per byte
                ids += [self.vocab[piece] for piece in bpe_reference(word, self.merge_ranks)]  # step 4: merges
        return ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """ids -> text, as transformers' CLIPTokenizer.decode: the tokens' bytes joined, each "</w>" (end of a word)
        a space, start, end and padding dropped (skip_special_tokens: SD 2's "!" padding too, as transformers drops
        its pad token). Lower case and CLIP's spacing: not the original.

        >>> tokenizer = Tokenizer.from_default()
        >>> tokenizer.decode(tokenizer("A photo of an astronaut, riding a horse!")[0])
        'a photo of an astronaut , riding a horse !'
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(self) for i in ids):
            raise MinisdError(f"ids must be a list or 1-d tensor of ints in [0, {len(self)}), got {ids!r:.80}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in (BOS, EOS, self.pad_id)]
        char_of_byte = byte_to_char()

        def piece(i: int) -> str:  # an added word is plain text: written as its bytes' characters, a word's end
            token = self.backend.id_to_token(i)
            return token if i < VOCAB_SIZE else "".join(char_of_byte[b] for b in token.encode()) + "</w>"

        text = "".join(piece(i) for i in ids)
        byte_of = {c: b for b, c in byte_to_char().items()}
        pieces = [bytes(byte_of[c] for c in part) for part in text.split("</w>")]  # specials are kept as text
        return b" ".join(pieces).decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """prompts: one str or a list of b strs. Returns (b, 77) int64: BOS, ≤ 75 prompt ids, EOS, padding
        (pad_id: EOS for SD v1, 0 for SD 2.x)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise MinisdError(f"prompts must be a str or a non-empty list of str, got {prompts!r:.80}")
        rows = []
        for prompt in prompts:
            ids = [BOS, *self.encode(prompt)[: MAX_LENGTH - 2], EOS]  # truncate the prompt, keep BOS and EOS
            rows.append(ids + [self.pad_id] * (MAX_LENGTH - len(ids)))  # pad: EOS (SD v1) or 0 (SD 2.x)
        return torch.tensor(rows, dtype=torch.long)
