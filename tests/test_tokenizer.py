"""minisd's tokenizer gives, id for id, what transformers' CLIPTokenizer gives inside diffusers' pipelines.

The reference is built offline from a fake diffusers folder (tokenizer/vocab.json, merges.txt, ...) that this
test writes from the packaged .gz with its own few lines, independent of minisd's conversion code.
"""

# The prompts use look-alike characters (curly quotes, full-width letters) on purpose.
# ruff: noqa: RUF001

import inspect
import json
import random

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from minisd.errors import MinisdError
from minisd.tokenizer import BOS, EOS, MAX_LENGTH, PAD_TOKENS, Tokenizer
from tests.reference import write_reference_tokenizer_folder

LONG_TAGS = (
    "masterpiece, best quality, ultra detailed, 8k, photorealistic, cinematic lighting, volumetric fog, "
    "a portrait of an old fisherman with a weathered face, wearing a yellow raincoat, standing on a wooden pier, "
    "stormy sea in the background, dramatic clouds, seagulls, by greg rutkowski and alphonse mucha, "
    "trending on artstation, octane render, unreal engine 5, sharp focus, depth of field, bokeh, film grain"
)

PROMPTS = [
    # plain SD prompts
    "a photo of an astronaut riding a horse on mars",
    "A painting of a squirrel eating a burger",
    "a red apple on a wooden table, studio lighting",
    "cat",
    "An oil painting of a lighthouse at dusk, in the style of Turner",
    "portrait of a woman, 85mm, f/1.8, golden hour",
    # empty and whitespace-only
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \t\n \r ",
    "\u00a0",
    "\u3000",
    "\u2003\u2009",
    "\u200b",
    # whitespace inside, around
    "  leading spaces",
    "trailing spaces   ",
    "a\tb\tc",
    "line one\nline two\n\nline four",
    "windows\r\nline ends",
    "many     spaces     between",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth\u200bspace",
    "\x0bvertical tab\x0cform feed",
    "next\u0085line and\u2028separator\u2029paragraph",
    # punctuation runs
    "wow!!!",
    "what?!?!",
    "...",
    "wait... what....",
    "a--b---c",
    "$$$ money $$$",
    "@@@###%%%^^^&&&***",
    "!!!??? ,,, ;;; :::",
    "(((((masterpiece)))))",
    "[[[[blurry]]]]",
    "{{{{hdr}}}}",
    "<<<>>>",
    "a/b\\c|d",
    "~`'\"",
    "-_-",
    ":-) ;-) :-(",
    "a.b.c.d",
    "end.",
    "....a....",
    # apostrophes and contractions
    "don't",
    "it's",
    "rock 'n' roll",
    "I'M HERE",
    "you'LL see",
    "we've they're I'd she'll",
    "o'clock",
    "'quoted'",
    "''",
    "'",
    "'s",
    "y'all'd've",
    "the cat's toy's color",
    "it’s a curly apostrophe",
    "“curly quotes” and ‘single’ ones",
    "l'été à paris",
    "rock'n'roll",
    "don''t",
    "'''s",
    "the 90's",
    "'S 'T 'RE 'VE 'M 'LL 'D",
    # numbers
    "1920s",
    "3.14159",
    "1,000,000",
    "4k 8k uhd",
    "2001: a space odyssey",
    "12345678901234567890",
    "0.5",
    "-42",
    "1e10",
    "½ ¾ ² ³ ① Ⅷ",
    "٣٤٥ arabic-indic digits",
    "१२३ devanagari digits",
    "１２３ full-width digits",
    "v1.5 vs v2.1",
    "100%",
    "#1 best",
    # accents and other Latin
    "café crème brûlée",
    "naïve façade",
    "Ångström",
    "Müller",
    "cafe\u0301",
    "e\u0301e\u0300e\u0302",
    "ﬁne ﬂower ligatures",
    "ǅemal",
    "Tiếng Việt",
    "Łódź",
    "straße STRASSE ẞ",
    "İstanbul",
    "ΣΊΣΥΦΟΣ",
    "ΟΔΟΣ",
    "cafÃ© mojibake",
    "ＳＤ full width letters",
    # other scripts
    "富士山",
    "東京の夜景、ネオン",
    "한국어 프롬프트",
    "中文提示词，高清，杰作",
    "привет мир",
    "Ελληνικά",
    "مرحبا بالعالم",
    "שלום עולם",
    "ภาษาไทย",
    "हिन्दी",
    "ქართული",
    "ᚠᚢᚦᚨᚱᚲ",
    # emoji
    "🐱",
    "a 🐶 and a 🐱",
    "👨\u200d👩\u200d👧\u200d👦 family",
    "🏳️\u200d🌈",
    "❤️ love",
    "👍🏽",
    "🇯🇵 flag",
    "🔥🔥🔥",
    "😀😃😄😁",
    # symbols
    "→ ← ↑ ↓ ∞ ≈ ≠",
    "™ © ®",
    "20°C",
    "μ Ω π",
    "∑ ∫ √",
    "♠ ♥ ♦ ♣",
    "x^2 + y^2 = z^2",
    # HTML entities (kept literal, as transformers does)
    "&amp;",
    "rock &amp; roll",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&quot;hello&quot;",
    "&#39;single&#39;",
    "&#x27;hex&#x27;",
    "&nbsp;",
    "&amp;amp;",
    "fish & chips",
    "<b>html tags</b>",
    # code, urls
    "https://example.com/path?x=1&y=2",
    "user@example.com",
    "C:\\path\\to\\file.txt",
    "#hashtag @user",
    "snake_case_name camelCaseName",
    "def f(x): return x**2",
    "\x00null\x01control\x7fdel",
    "\x1b[31mred\x1b[0m",
    "\ufeffbom",
    "\ufffd replacement char",
    # mixed case
    "HELLO World",
    "McDonald's",
    "iPhone iPad",
    "NASA ESA JAXA",
    "ThIs Is MiXeD cAsE",
    # special tokens written in the prompt
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "a<|endoftext|>b",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|>",
    "<|endoftext",
    "<|unk|>",
    "<|endoftext|><|endoftext|>",
    # A1111 style
    "(masterpiece:1.2), (best quality:1.4), [ugly], ((detailed)), {hdr}",
    "(cat:dog:0.5) AND bird BREAK landscape",
    "<lora:add_detail:0.8>, 1girl, solo, (smile:1.1)",
    "[cat|dog] [cat:dog:10] [from:to:0.25]",
    "(worst quality, low quality:1.4), (deformed, distorted, disfigured:1.3), poorly drawn",
    "\\(escaped parentheses\\)",
    "embedding:my-style, score_9, score_8_up",
    # long prompts: truncation keeps EOS
    LONG_TAGS,
    LONG_TAGS * 3,
    "word " * 200,
    "a" * 500,
    "supercalifragilisticexpialidocious " * 20,
    "东" * 300,
    "🐱" * 100,
    "!" * 1000,
    "1234567890" * 20,
    # around the 75-token boundary
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a " * 77,
    "a, " * 37,
    "a, " * 38,
]

# fmt: off
FRAGMENTS = [
    "a cat", "an old castle", "cyberpunk city", "(dramatic lighting:1.3)", "[low quality]", "don't", "it's",
    "rock 'n' roll", "8k", "1.5", "café", "東京", "🌸", "&amp;", "&lt;3", "HDR", "McDonald's", "!!!", "...",
    "((best quality))", "by Greg Rutkowski", "f/2.8", "50mm", "Ñandú", "ß", "naïve", "<|endoftext|>", "ＡＢＣ",
    "they'll", "we're", "#art", "@artist", "100%", "$5", "snow-covered", "x2", "½", "Ⅳ", "안녕", "👍🏽",
]
# fmt: on
SEPARATORS = [", ", " ", ",", "\n", "\t", "  ", " | ", "; ", ". ", "\u00a0", ""]


def generated_prompts(n: int, seed: int = 0) -> list[str]:
    """n random mixtures of FRAGMENTS and SEPARATORS, some long enough to be truncated."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = rng.choice([1, 2, 3, 5, 8, 13, 40])
        parts = [rng.choice(FRAGMENTS) for _ in range(k)]
        if rng.random() < 0.3:
            parts = [p.upper() if rng.random() < 0.5 else p.title() for p in parts]
        prompt = parts[0]
        for part in parts[1:]:
            prompt += rng.choice(SEPARATORS) + part
        prompts.append(prompt)
    return prompts


ALL_PROMPTS = list(dict.fromkeys(PROMPTS + generated_prompts(150)))  # without repeats


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A fake diffusers model folder holding tokenizer/, written from the packaged .gz without minisd's code."""
    root = tmp_path_factory.mktemp("sd")
    write_reference_tokenizer_folder(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def reference(diffusers_folder):
    """The class and loading call diffusers' StableDiffusionPipeline uses."""
    tokenizer_type = inspect.signature(StableDiffusionPipeline).parameters["tokenizer"].annotation
    assert tokenizer_type is CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(diffusers_folder, subfolder="tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == MAX_LENGTH
    return tokenizer


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_default()


def reference_ids(reference, prompts: list[str]) -> torch.Tensor:
    """Exactly the call in StableDiffusionPipeline.encode_prompt."""
    return reference(
        prompts, padding="max_length", max_length=reference.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def assert_same_rows(ours_ids: torch.Tensor, ref_ids: torch.Tensor, prompts: list[str]):
    assert ours_ids.shape == ref_ids.shape == (len(prompts), MAX_LENGTH)
    bad = [i for i in range(len(prompts)) if not torch.equal(ours_ids[i], ref_ids[i])]
    details = [f"{prompts[i]!r:.60}: ours {ours_ids[i].tolist()} ref {ref_ids[i].tolist()}" for i in bad[:3]]
    assert not bad, f"{len(bad)}/{len(prompts)} prompts differ, e.g.\n" + "\n".join(details)


def test_prompt_list_is_varied():
    assert len(ALL_PROMPTS) >= 200


def test_same_vocabulary_as_reference(ours, reference, diffusers_folder):
    assert ours.backend.get_vocab() == reference.get_vocab()
    assert len(reference.get_vocab()) == 49408
    merges_ours = json.loads(ours.backend.to_str())["model"]["merges"]
    merges_ref = json.loads(reference.backend_tokenizer.to_str())["model"]["merges"]
    assert merges_ours == merges_ref and len(merges_ours) == 48894


def test_ids_equal_reference(ours, reference):
    assert_same_rows(ours(ALL_PROMPTS), reference_ids(reference, ALL_PROMPTS), ALL_PROMPTS)


def test_encode_equals_reference_unpadded(ours, reference):
    """encode: the reference's ids without BOS/EOS, untruncated (the prompt-chunking code needs all of them)."""
    for prompt in ALL_PROMPTS:
        expected = reference(prompt, add_special_tokens=False).input_ids
        assert ours.encode(prompt) == expected, prompt
        # and the same as the middle of the full, unpadded reference row
        assert reference(prompt).input_ids == [BOS, *expected, EOS], prompt


def test_from_files_equals_default(ours, reference, diffusers_folder):
    folder = diffusers_folder / "tokenizer"
    from_files = Tokenizer.from_files(folder / "vocab.json", str(folder / "merges.txt"))
    assert from_files.backend.to_str() == ours.backend.to_str()
    assert_same_rows(from_files(ALL_PROMPTS), reference_ids(reference, ALL_PROMPTS), ALL_PROMPTS)


def test_truncation_keeps_end_token(ours, reference):
    long_prompts = [p for p in ALL_PROMPTS if len(ours.encode(p)) > MAX_LENGTH - 2]
    assert len(long_prompts) >= 10
    ids = ours(long_prompts)
    assert (ids[:, 0] == BOS).all() and (ids[:, -1] == EOS).all()
    for row, prompt in zip(ids, long_prompts, strict=True):
        assert row[1:-1].tolist() == ours.encode(prompt)[: MAX_LENGTH - 2]
    assert_same_rows(ids, reference_ids(reference, long_prompts), long_prompts)


def test_padding_and_shapes(ours):
    one = ours("a photo of a cat")
    assert one.shape == (1, MAX_LENGTH) and one.dtype == torch.long
    assert one[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (one[0, 6:] == EOS).all()
    empty = ours("")
    assert empty[0].tolist() == [BOS] + [EOS] * (MAX_LENGTH - 1)
    batch = ours(["a photo of a cat", "", "a photo of a cat"])
    assert batch.shape == (3, MAX_LENGTH)
    assert torch.equal(batch[0], one[0]) and torch.equal(batch[1], empty[0]) and torch.equal(batch[2], one[0])


def test_sd2_padding_equals_reference(tmp_path, reference):
    """SD 2.x: the same vocabulary, padded with "!" (id 0) after the end token, as transformers' CLIPTokenizer
    pads when the folder's special_tokens_map.json names "!" (stabilityai/stable-diffusion-2-1's tokenizer).

    One difference, on purpose: transformers registers the pad token "!" as a special token matched in the raw
    text, so a "!" typed in a prompt becomes id 0, the padding (and "wow!!!" three of them). SD 2 was trained with
    open_clip's tokenizer, where "!" is ordinary text (BPE: "!!!" is the one token 995) and only padding is 0;
    minisd tokenizes as open_clip does. Prompts without "!" get transformers' ids exactly; prompts with one get
    SD v1's BPE ids (the reference tokenizer with the end-token padding) followed by zeros, open_clip's rows."""
    folder = write_reference_tokenizer_folder(tmp_path / "tokenizer", pad_token="!")
    sd2_reference = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert sd2_reference.pad_token_id == 0
    ours = Tokenizer.from_default(pad_token=PAD_TOKENS["sd2"])
    assert ours.pad_id == 0
    plain = [p for p in ALL_PROMPTS if "!" not in p]
    exclaiming = [p for p in ALL_PROMPTS if "!" in p]
    assert len(plain) > 250 and len(exclaiming) > 20
    assert_same_rows(ours(plain), reference_ids(sd2_reference, plain), plain)
    open_clip_rows = reference_ids(reference, exclaiming)
    for row, prompt in zip(open_clip_rows, exclaiming, strict=True):  # open_clip: zeros after BOS, tokens, EOS
        n = min(len(reference(prompt, add_special_tokens=False).input_ids), MAX_LENGTH - 2)
        row[n + 2 :] = 0
    assert_same_rows(ours(exclaiming), open_clip_rows, exclaiming)
    assert not torch.equal(ours(["wow!!!"]), reference_ids(sd2_reference, ["wow!!!"]))  # the difference is real
    one = ours("a photo of a cat")[0]
    assert one[:8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, 0] and (one[7:] == 0).all()
    from_files = Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token="!")
    assert torch.equal(from_files(ALL_PROMPTS), ours(ALL_PROMPTS))
    assert ours.decode(one) == sd2_reference.decode(one, skip_special_tokens=True) == "a photo of a cat"


def test_bad_pad_token_raises():
    with pytest.raises(MinisdError, match="pad_token must be a token of the vocabulary"):
        Tokenizer.from_default(pad_token="<pad>")


@pytest.mark.parametrize("prompts", [123, None, b"a cat", ["a cat", 3], [], ["a cat", None], {"a cat"}])
def test_bad_prompts_raise(ours, prompts):
    with pytest.raises(MinisdError, match="prompts"):
        ours(prompts)


@pytest.mark.parametrize("text", [None, 1.5, b"a cat", ["a cat"]])
def test_bad_text_raises(ours, text):
    with pytest.raises(MinisdError, match="text"):
        ours.encode(text)


def test_bad_files_raise(tmp_path, diffusers_folder):
    merges = diffusers_folder / "tokenizer" / "merges.txt"
    with pytest.raises(MinisdError, match="vocab_json_path"):
        Tokenizer.from_files(tmp_path / "missing.json", merges)
    with pytest.raises(MinisdError, match="merges_txt_path"):
        Tokenizer.from_files(diffusers_folder / "tokenizer" / "vocab.json", tmp_path)
    not_clip = tmp_path / "vocab.json"
    not_clip.write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}))
    tiny_merges = tmp_path / "merges.txt"
    tiny_merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(MinisdError, match="49406"):
        Tokenizer.from_files(not_clip, tiny_merges)


def test_decode_equals_reference(ours, reference):
    """decode: transformers' CLIPTokenizer.decode on every prompt's ids, with and without the special tokens."""
    bad = []
    for prompt in ALL_PROMPTS:
        ids = ours(prompt)[0]
        for skip in (True, False):
            if ours.decode(ids, skip_special_tokens=skip) != reference.decode(ids, skip_special_tokens=skip):
                bad.append((prompt, skip, ours.decode(ids, skip), reference.decode(ids, skip_special_tokens=skip)))
    assert not bad, f"{len(bad)} differ, e.g. {bad[:2]}"
    with pytest.raises(MinisdError, match="ids must be"):
        ours.decode([49408])


def test_written_out_bpe_equals_the_fast_path(ours):
    """The four steps in plain Python (encode_reference: clean-up, split_words, bytes, the bpe_reference merge loop)
    give the Rust `tokenizers` path's ids, id for id, on every test prompt."""
    bad = [p for p in ALL_PROMPTS if ours.encode_reference(p) != ours.encode(p)]
    details = [f"{p!r:.60}: reference {ours.encode_reference(p)} fast {ours.encode(p)}" for p in bad[:3]]
    assert not bad, f"{len(bad)}/{len(ALL_PROMPTS)} prompts differ, e.g.\n" + "\n".join(details)
