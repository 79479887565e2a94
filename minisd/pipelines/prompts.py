"""Prompts the AUTOMATIC1111 (A1111) way: emphasis weights, BREAK, and prompts longer than 75 tokens.

    "a (red:1.3) fox, forest BREAK oil painting"
      ──parse_emphasis──▶  [("a ", 1.0), ("red", 1.3), (" fox, forest", 1.0), BREAK, ("oil painting", 1.0)]
      ──prompt_chunks───▶  chunks of 77 ids and 77 weights: BOS, ≤ 75 prompt tokens, EOS, padding
      ──encode_prompt───▶  each chunk through the text encoder, weights applied, chunks side by side: (b, 77·k, d)

Emphasis syntax (A1111's modules/prompt_parser.py, `parse_prompt_attention`):
    (word) ×1.1      ((word)) ×1.1² = 1.21      [word] ×(1/1.1)      (word:1.5) ×1.5 (any number, even 0 or < 0)
    \\( \\) \\[ \\] the bracket itself      \\\\ a backslash      BREAK (capitals, a word of its own): a new chunk
Brackets nest (weights multiply); a bracket left open is closed at the end of the prompt, and a closing bracket
with nothing to close is plain text. A1111's prompt editing ([cat:dog:0.5]), alternation ([cat|dog]) and
composable "AND" belong to its sampler loop, not to emphasis: here they are plain text ([ ] still weighs 1/1.1).

Weights (A1111's "Original" emphasis, modules/sd_emphasis.py): every token's 768-vector is multiplied by its
weight, then the whole chunk is rescaled so its mean value is what it was before. Emphasis thus changes the
tokens' relative sizes, not the overall scale the UNet was trained on.

Long prompts (A1111's sd_hijack_clip.py): CLIP sees at most 77 positions, so the tokens are cut into chunks of 75;
when a chunk fills up and a comma lies within its last 20 tokens, the words after that comma move to the next
chunk (A1111's default "comma padding backtrack" = 20), so a phrase is not cut in two. Each chunk is encoded on
its own and the results are concatenated along the sequence: the UNet's cross-attention takes any context length.
Every prompt of one call gets the same number of chunks (missing ones are the empty prompt's chunk, as A1111 pads
a batch), so pass the negative and positive prompts in ONE call to get equal context lengths for one UNet batch.

Where minisd differs from A1111, on purpose:
  - the mean is restored per prompt and chunk; A1111 takes it over its whole batch, which is the same thing when the
    batch holds copies of one prompt (A1111 encodes the positive and the negative prompts in separate batches);
  - BREAK inside brackets still breaks (A1111 multiplies its BREAK marker's weight by the bracket's, after which
    the marker is no longer recognised and is encoded as the word "break" with a negative weight);
  - positive and negative prompts are padded to the same number of chunks, like A1111 with its "pad prompt/negative
    prompt" option (pad_cond_uncond) on; with it off (the default) A1111 runs the UNet twice when they differ;
  - no textual-inversion embeddings.
A plain prompt of ≤ 75 tokens gives exactly what diffusers' StableDiffusionPipeline.encode_prompt gives. With
clip_skip, diffusers skips layers for the positive prompt only; minisd, like A1111, for every prompt.
"""

import re

import torch
from torch import Tensor

from minisd.clip import TextEncoder
from minisd.errors import MinisdError
from minisd.tokenizer import BOS, EOS, MAX_LENGTH, Tokenizer

CHUNK_LENGTH = MAX_LENGTH - 2  # 75 prompt tokens between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default
ROUND_MULTIPLIER = 1.1  # (word)
SQUARE_MULTIPLIER = 1 / 1.1  # [word]: A1111 multiplies by 1/1.1 (not divides by 1.1), which rounds differently
BREAK = ("BREAK", -1.0)  # the marker A1111 puts in the parsed list for the BREAK keyword

# One token of the emphasis syntax per match, tried in this order.
EMPHASIS_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\]?)        # \( \) \[ \] \\ stand for the character; a lone \ stands for nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ":1.5)" closes a round bracket with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)         # plain text; a ":" not followed by a weight is text too
    """,
    re.VERBOSE,
)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")  # the keyword eats the spaces around it
# Bounds on what a prompt may ask (A1111 has none; the hostile prompts they stop are no one's real prompt):
MAX_OPEN_BRACKETS = 100  # brackets open at once: each close multiplies every piece inside (quadratic past this)
MAX_WEIGHT = 100.0  # |weight| of a piece after every bracket has multiplied in (finite: 1e400 reads as inf)
MAX_CHUNKS = 256  # 75-token chunks, 19,200 tokens: ~14,000 words; the UNet attends to all 77·k of them each step


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, A1111's `parse_prompt_attention`; neighbours of equal weight merge.

    BREAK becomes the pair `BREAK` = ("BREAK", -1.0). Weights are the products A1111 computes, rounding included.

    >>> parse_emphasis("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_emphasis("a [dim] (house:1.3) BREAK sky")
    [('a ', 1.0), ('dim', 0.9090909090909091), (' ', 1.0), ('house', 1.3), ('', 1.0), ('BREAK', -1.0), ('sky', 1.0)]
    """
    if not isinstance(prompt, str):
        raise MinisdError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: bytes a terminal could not decode (Python's escapes)
        raise MinisdError(f"prompt must be valid text, got undecodable bytes at character {error.start}") from None
    pieces: list[list] = []  # [text, weight, is_break]
    open_round: list[int] = []  # for each open "(": the index of the first piece inside it
    open_square: list[int] = []

    def multiply(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:  # a BREAK keeps its marker weight, so it still breaks inside brackets
                piece[1] *= multiplier

    for match in EMPHASIS_TOKEN.finditer(prompt):
        if match["escaped"] is not None:
            pieces.append([match["escaped"], 1.0, False])
        elif match["open"] and len(open_round) + len(open_square) == MAX_OPEN_BRACKETS:
            raise MinisdError(f"prompt emphasis opens more than {MAX_OPEN_BRACKETS} brackets at once")
        elif match["open"] == "(":
            open_round.append(len(pieces))
        elif match["open"] == "[":
            open_square.append(len(pieces))
        elif match["weight"] is not None and open_round:
            multiply(open_round.pop(), _weight(match["weight"]))
        elif match["close"] == ")" and open_round:
            multiply(open_round.pop(), ROUND_MULTIPLIER)
        elif match["close"] == "]" and open_square:
            multiply(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a bracket or ":1.5)" with nothing to close
            for i, part in enumerate(BREAK_WORD.split(match[0])):
                if i > 0:
                    pieces.append([*BREAK, True])
                pieces.append([part, 1.0, False])
    for start in open_round:  # brackets left open close at the end: round ones first, outermost first, as A1111
        multiply(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply(start, SQUARE_MULTIPLIER)

    for text, weight, is_break in pieces:
        if not is_break and not abs(weight) <= MAX_WEIGHT:  # NaN and inf fail too
            raise MinisdError(
                f"prompt emphasis weights must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight} for {text[:40]!r}"
            )
    merged: list[list] = []
    for piece in pieces or [["", 1.0, False]]:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight, _ in merged]


def _weight(text: str) -> float:
    """The number in "(word:1.5)"; the pattern allows digit-and-dot strings that are not numbers ("1.2.3")."""
    try:
        return float(text)
    except ValueError:
        raise MinisdError(f"prompt emphasis weight must be a number as in (word:1.5), got {text!r}") from None


def prompt_chunks(tokenizer: Tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """A prompt's token ids and weights, cut into chunks as A1111 does: [(77 ids, 77 weights), ...], at least one.

    Each chunk is BOS, ≤ 75 prompt tokens, EOS, padding (tokenizer.pad_id; weight 1.0 for BOS, EOS and padding).
    A chunk ends at 75 tokens, at BREAK, or, when a chunk is full and a comma lies within its last 20 tokens, just
    after that comma. Each piece of parse_emphasis is tokenized on its own, as in A1111 ("(red)dish" is "red" +
    "dish", not "reddish").
    """
    comma = tokenizer.encode(",")[0]  # 267, ",</w>"
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []  # the chunk being filled, without BOS and EOS
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the chunk's last comma; -1 for none

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        padding = CHUNK_LENGTH - len(ids)
        # A1111 fills with EOS, then sets every id after the first EOS to the pad id (0 for SD 2's OpenCLIP)
        chunks.append(([BOS, *ids, EOS, *[tokenizer.pad_id] * padding], [1.0, *weights, 1.0, *[1.0] * padding]))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_emphasis(prompt):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]  # the words after it
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            if len(chunks) == MAX_CHUNKS:
                raise MinisdError(f"prompt must fit in {MAX_CHUNKS} chunks of {CHUNK_LENGTH} tokens, got a longer one")
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def apply_weights(prompt_embeds: Tensor, weights: Tensor) -> Tensor:
    """Multiply each token's embedding by its weight, then restore each prompt's mean (A1111's "Original" emphasis).

    prompt_embeds: (b, 77, d); weights: (b, 77). Returns (b, 77, d) in prompt_embeds' dtype (computed in float32).
    All weights 1.0 return the input values exactly. (A1111 restores the mean over its whole batch; see the top.)

    >>> z = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    >>> apply_weights(z, torch.tensor([[2.0, 1.0]]))  # token 0 doubled, then all scaled by mean 2 / mean 3
    tensor([[[1.3333, 4.0000],
             [1.3333, 1.3333]]])
    """
    z = prompt_embeds.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)  # (b, 1, 1)
    z = z * weights.float()[:, :, None]  # (b, 77, 1) broadcasts over d
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    # A mean of exactly 0 (an untrained final LayerNorm centres each token) would give 0/0: such rows stay as is.
    z = z * torch.where(new_mean == 0, 1.0, original_mean / new_mean)
    return z.to(prompt_embeds.dtype)


def encode_prompt(
    tokenizer: Tokenizer, text_encoder: TextEncoder, prompts: list[str], clip_skip: int | None = None
) -> Tensor:
    """Prompts with A1111 emphasis and any length -> the UNet's context (b, 77·k, d), k the most chunks of any prompt.

    prompts: b strs (e.g. the negative prompts then the positive ones, so both get the same k). clip_skip as in
    TextEncoder.prompt_embeds (A1111's "Clip skip: 2" is clip_skip=1). The ids go to the text encoder's device.
    """
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise MinisdError(f"prompts must be a non-empty list of str, got {prompts!r:.80}")
    all_chunks = [prompt_chunks(tokenizer, prompt) for prompt in prompts]
    n_chunks = max(len(chunks) for chunks in all_chunks)
    empty_chunk = prompt_chunks(tokenizer, "")[0]  # the empty prompt "", as A1111 pads a batch
    device = text_encoder.embeddings.token_embedding.weight.device
    prompt_embeds = []
    for i in range(n_chunks):  # chunk i of every prompt in one batch, as A1111 (and diffusers for one chunk)
        batch = [chunks[i] if i < len(chunks) else empty_chunk for chunks in all_chunks]
        input_ids = torch.tensor([ids for ids, _ in batch], device=device)  # (b, 77)
        weights = torch.tensor([w for _, w in batch], device=device)  # (b, 77)
        z = text_encoder.prompt_embeds(input_ids, clip_skip=clip_skip)  # (b, 77, d)
        prompt_embeds.append(apply_weights(z, weights))
    context = torch.cat(prompt_embeds, dim=1)  # (b, 77·k, d)
    if not context.isfinite().all():  # emphasis weights whose mean nearly cancels rescale a chunk past float range
        raise MinisdError(
            "the prompt embedding holds NaN or inf: emphasis weights whose mean is near 0 (or a broken text encoder)"
        )
    return context
