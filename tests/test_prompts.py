"""A1111 prompt handling: emphasis parsing on A1111's own documented examples, chunking of long prompts, weights,
and, for plain prompts, exactly what diffusers' StableDiffusionPipeline.encode_prompt gives."""

import types
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.pipelines.prompts import BREAK, apply_weights, encode_prompt, parse_emphasis, prompt_chunks
from minisd.tokenizer import BOS, EOS, Tokenizer
from tests.reference import write_reference_tokenizer_folder

CAT, DOG, COMMA = 2368, 1929, 267  # "cat", "dog", "," are one token each
TINY = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)

# The examples in the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py), verbatim.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

# Worked out by hand from A1111's rules (weights multiply in the order brackets close; [ ] is ×(1/1.1)).
MORE_EXAMPLES = [
    ("", [("", 1.0)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 0.9090909090909091)]),
    ("[[word]]", [("word", 0.9090909090909091 * 0.9090909090909091)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 0.25 )", [("word", 0.25)]),  # spaces around the number are allowed
    ("(word:-1)", [("word", -1.0)]),
    ("((word:2))", [("word", 2.2)]),  # 1 × 2 × 1.1
    ("[(word)]", [("word", 1.1 * (1 / 1.1))]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),  # nothing to close: plain text
    ("word:1.5) x", [("word:1.5) x", 1.0)]),  # an explicit weight with no "(" is text too
    ("(a:b)", [("a:b", 1.1)]),  # ":" without a number is text
    ("[cat:dog:0.5]", [("cat:dog:0.5", 0.9090909090909091)]),  # prompt editing is not emphasis
    ("\\\\ and \\", [("\\ and ", 1.0)]),  # \\ is a backslash, a lone \ vanishes
    ("\\((x)\\)", [("(", 1.0), ("x", 1.1), (")", 1.0)]),
    ("(a [b] c", [("a ", 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1.1)]),  # "(" closes at the end
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAKFAST", [("a BREAKFAST", 1.0)]),  # BREAK only as a word of its own, in capitals
    ("a break b", [("a break b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # still a break inside brackets (A1111: not; see prompts.py)
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EXAMPLES + MORE_EXAMPLES)
def test_parse_emphasis(prompt, expected):
    assert parse_emphasis(prompt) == expected  # exact floats: the same products as A1111


@pytest.mark.parametrize("prompt", ["(word:1.2.3)", "(word:.)", "(word:..5)"])
def test_bad_weight_raises_one_line(prompt):
    with pytest.raises(MinisdError, match=r"weight must be a number") as info:
        parse_emphasis(prompt)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_default()


def chunk(ids, weights=None):
    """A 77-id chunk: BOS, ids, EOS padding; and its weights (1.0 where not given)."""
    weights = weights or [1.0] * len(ids)
    pad = 75 - len(ids)
    return [BOS, *ids, *[EOS] * (pad + 1)], [1.0, *weights, *[1.0] * (pad + 1)]


def test_short_prompt_is_one_chunk_as_the_tokenizer_makes_it(tokenizer):
    prompt = "a photo of an astronaut riding a horse on mars"
    (ids, weights), *rest = prompt_chunks(tokenizer, prompt)
    assert rest == [] and ids == tokenizer(prompt)[0].tolist() and weights == [1.0] * 77


def test_chunks_split_at_75_tokens(tokenizer):
    assert prompt_chunks(tokenizer, "cat " * 75) == [chunk([CAT] * 75)]
    assert prompt_chunks(tokenizer, "cat " * 75 + "dog") == [chunk([CAT] * 75), chunk([DOG])]
    assert prompt_chunks(tokenizer, "cat " * 160) == [chunk([CAT] * 75), chunk([CAT] * 75), chunk([CAT] * 10)]
    assert prompt_chunks(tokenizer, "") == [chunk([])]


@pytest.mark.parametrize("n_before", [55, 60, 74])
def test_chunk_ends_after_a_comma_in_its_last_20_tokens(tokenizer, n_before):
    """A full chunk whose last comma is ≤ 20 tokens back ends after it; the words after it start the next chunk."""
    prompt = "cat " * n_before + ", " + "dog " * 30
    assert prompt_chunks(tokenizer, prompt) == [chunk([CAT] * n_before + [COMMA]), chunk([DOG] * 30)]


@pytest.mark.parametrize("n_before", [40, 54])
def test_comma_further_back_does_not_move_words(tokenizer, n_before):
    prompt = "cat " * n_before + ", " + "dog " * 60
    tokens = [CAT] * n_before + [COMMA] + [DOG] * 60
    assert prompt_chunks(tokenizer, prompt) == [chunk(tokens[:75]), chunk(tokens[75:])]


def test_comma_that_would_open_a_chunk_stays_there(tokenizer):
    """A1111 forgets a comma that arrives when the chunk is full: it opens the next chunk, and nothing moves."""
    prompt = "cat " * 75 + ", " + "dog " * 80
    tokens = [CAT] * 75 + [COMMA] + [DOG] * 80
    assert prompt_chunks(tokenizer, prompt) == [chunk(tokens[:75]), chunk(tokens[75:150]), chunk(tokens[150:])]


def test_break_starts_a_new_chunk(tokenizer):
    assert prompt_chunks(tokenizer, "cat BREAK dog") == [chunk([CAT]), chunk([DOG])]
    assert prompt_chunks(tokenizer, "cat BREAK") == [chunk([CAT])]
    assert prompt_chunks(tokenizer, "BREAK dog") == [chunk([]), chunk([DOG])]  # A1111 keeps the empty chunk
    assert prompt_chunks(tokenizer, "BREAK") == [chunk([])]
    assert prompt_chunks(tokenizer, "cat BREAK BREAK dog") == [chunk([CAT]), chunk([]), chunk([DOG])]
    assert prompt_chunks(tokenizer, "(cat BREAK dog)") == [chunk([CAT], [1.1]), chunk([DOG], [1.1])]


def test_chunks_carry_weights_and_pieces_are_tokenized_apart(tokenizer):
    assert prompt_chunks(tokenizer, "(cat:1.5) dog") == [chunk([CAT, DOG], [1.5, 1.0])]
    assert prompt_chunks(tokenizer, "[red]dish") == [chunk([736, 4531], [1 / 1.1, 1.0])]  # not "reddish" (43383)


# -- encode_prompt against diffusers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on the real vocabulary, written from the packaged .gz without minisd's code."""
    folder = write_reference_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def encoders():
    """A random tiny transformers CLIPTextModel (SD v1's vocabulary and 77 positions) and minisd's with its weights."""
    torch.manual_seed(0)  # transformers' init draws from the global generator
    ref = CLIPTextModel(CLIPTextConfig(**asdict(TINY))).eval()
    with torch.no_grad():  # transformers' init leaves LayerNorms at (1, 0): redrawn, so the chunk mean is not ~0
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_((name.endswith("weight")) + 0.2 * torch.randn(p.shape))
    # diffusers 0.42.1 reads `text_encoder.text_model.final_layer_norm` for clip_skip, a path transformers 5.x's
    # CLIPTextModel no longer has (it holds final_layer_norm itself): give it that path to the same module.
    ref.text_model = types.SimpleNamespace(final_layer_norm=ref.final_layer_norm)
    ours = TextEncoder(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def diffusers_encode(reference_tokenizer, ref, prompts, negative_prompts=None, clip_skip=None):
    pipe = types.SimpleNamespace(tokenizer=reference_tokenizer, text_encoder=ref)
    with torch.no_grad():
        return StableDiffusionPipeline.encode_prompt(
            pipe,
            prompts,
            "cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=negative_prompts is not None,
            negative_prompt=negative_prompts,
            clip_skip=clip_skip,
        )


PLAIN = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "A painting of a squirrel eating a burger, by Greg Rutkowski, trending on artstation, 8k",
    "cat " * 75,  # exactly 75 tokens: still one chunk
]


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_plain_prompts_equal_diffusers_exactly(tokenizer, reference_tokenizer, encoders, clip_skip):
    ours, ref = encoders
    want, _ = diffusers_encode(reference_tokenizer, ref, PLAIN, clip_skip=clip_skip)
    with torch.no_grad():
        got = encode_prompt(tokenizer, ours, PLAIN, clip_skip=clip_skip)
    assert got.shape == want.shape == (len(PLAIN), 77, TINY.hidden_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same ids, same weights, no emphasis: bit-identical


def test_negative_prompts_equal_diffusers_exactly(tokenizer, reference_tokenizer, encoders):
    ours, ref = encoders
    negatives = ["blurry, lowres", "", "ugly", "bad anatomy"]
    want_positive, want_negative = diffusers_encode(reference_tokenizer, ref, PLAIN, negatives)
    with torch.no_grad():
        got = encode_prompt(tokenizer, ours, negatives + PLAIN)  # one call: the pipeline's batch for CFG
    torch.testing.assert_close(got, torch.cat([want_negative, want_positive]), rtol=0, atol=0)


def test_long_prompt_is_chunks_encoded_apart(tokenizer, reference_tokenizer, encoders):
    """100 one-token words, no comma: chunk 1 is diffusers' (truncated) encoding of the first 75, chunk 2 the rest."""
    ours, ref = encoders
    words = [("cat", "dog")[i % 3 == 0] for i in range(100)]
    with torch.no_grad():
        got = encode_prompt(tokenizer, ours, [" ".join(words)])
    first, _ = diffusers_encode(reference_tokenizer, ref, [" ".join(words)])
    second, _ = diffusers_encode(reference_tokenizer, ref, [" ".join(words[75:])])
    assert got.shape == (1, 154, TINY.hidden_size)
    torch.testing.assert_close(got, torch.cat([first, second], dim=1), rtol=0, atol=0)


def test_prompts_padded_to_equal_chunks_with_the_empty_prompt(tokenizer, encoders):
    ours, _ = encoders
    long = "cat, " * 40 + "BREAK dog BREAK fish"  # 80 tokens, then two breaks: 4 chunks
    with torch.no_grad():
        got = encode_prompt(tokenizer, ours, ["", long])
        empty = encode_prompt(tokenizer, ours, [""])
        alone = encode_prompt(tokenizer, ours, [long])
    assert got.shape == (2, 4 * 77, TINY.hidden_size)
    torch.testing.assert_close(got[0], empty[0].repeat(4, 1), rtol=0, atol=0)
    # Each prompt's embedding is its own (the mean is restored per prompt): only matmul blocking may differ.
    torch.testing.assert_close(got[1], alone[0], rtol=1e-6, atol=1e-6)


def test_emphasis_scales_tokens_and_keeps_the_chunk_mean(tokenizer, encoders):
    ours, _ = encoders
    with torch.no_grad():
        got = encode_prompt(tokenizer, ours, ["a (cat:1.5) on [[a mat]]"])
        plain = ours.prompt_embeds(tokenizer(["a cat on a mat"]))  # same ids: "(", ")", "[", "]" are syntax
    ratio = got / plain  # (1, 77, d): each token scaled by weight × one common factor
    factor = ratio[0, 0, 0]
    expected = torch.tensor([1.0, 1.0, 1.5, 1.0, 1 / 1.21, 1 / 1.21] + [1.0] * 71) * factor
    torch.testing.assert_close(ratio[0], expected[:, None].expand(77, TINY.hidden_size), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mean(), plain.mean(), rtol=1e-5, atol=1e-7)


def test_apply_weights_of_one_is_exact_and_keeps_dtype():
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_weights(z, torch.ones(2, 77)), z, rtol=0, atol=0)
    assert apply_weights(z.half(), torch.ones(2, 77)).dtype == torch.float16
    weights = torch.rand(2, 77, generator=torch.Generator().manual_seed(1)) + 0.5
    out = apply_weights(z, weights)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))  # the mean is restored per prompt


def test_apply_weights_leaves_a_zero_mean_chunk_alone():
    """An untrained final LayerNorm gives embeddings of mean 0: no 0/0, the chunk comes back as it was."""
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    torch.testing.assert_close(apply_weights(z, torch.tensor([[1.5, 1.0]])), z * torch.tensor([[[1.5], [1.0]]]))


@pytest.mark.parametrize("prompts", [[], "a cat", None, ["a", 1], ("a",)])
def test_bad_prompts_raise_one_line(tokenizer, encoders, prompts):
    with pytest.raises(MinisdError, match="prompts must be a non-empty list of str") as info:
        encode_prompt(tokenizer, encoders[0], prompts)
    assert "\n" not in str(info.value)


def test_bad_clip_skip_raises(tokenizer, encoders):
    with pytest.raises(MinisdError, match="clip_skip"):
        encode_prompt(tokenizer, encoders[0], ["a cat"], clip_skip=4)
