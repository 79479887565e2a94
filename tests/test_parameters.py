"""A1111's "parameters" text, both ways: A1111's own example written and read exactly, the layout, quoting and
key order, and a round-trip property over random prompts and values."""

import random

import pytest

from minisd.errors import MinisdError
from minisd.parameter_line import PARAMETER, key_values
from minisd.parameters import GenerationParameters, format_parameters, parse_parameters


def assert_one_line_error(call, fragment: str) -> None:
    with pytest.raises(MinisdError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


# The example in the docstring of A1111's parse_generation_parameters (modules/infotext_utils.py), verbatim.
A1111_PROMPT = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate"
)
A1111_NEGATIVE = (
    "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, "
    "mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing"
)
A1111_TEXT = (
    f"{A1111_PROMPT}\nNegative prompt: {A1111_NEGATIVE}\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def test_a1111_example_is_written_exactly():
    got = format_parameters(
        A1111_PROMPT, A1111_NEGATIVE, 20, "Euler a", 7.0, 965400086, 512, 512, model_hash="45dee52b"
    )
    assert got == A1111_TEXT


def test_a1111_example_is_read():
    assert parse_parameters(A1111_TEXT) == {
        "Prompt": A1111_PROMPT,
        "Negative prompt": A1111_NEGATIVE,
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_layout_key_order_quoting_and_extra():
    text = format_parameters(
        "a cat\non a mat",
        "",
        30,
        "DPM++ 2M Karras",
        7.5,
        1,
        768,
        512,
        model_name="my, model: v2",
        model_hash="6ce0161689",
        extra={"Denoising strength": 0.75, "Clip skip": 2, "Skipped": None, "Note": 'say "hi"'},
    )
    assert text == (
        "a cat\non a mat\n"  # no "Negative prompt:" line for an empty negative prompt
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 768x512, Model hash: 6ce0161689, "
        'Model: "my, model: v2", Denoising strength: 0.75, Clip skip: 2, Note: say "hi"'
    )
    fields = parse_parameters(text)
    assert fields["Prompt"] == "a cat\non a mat" and fields["Negative prompt"] == ""
    assert fields["Model"] == "my, model: v2" and fields["Note"] == 'say "hi"' and "Skipped" not in fields


def test_text_without_a_parameters_line_is_all_prompt():
    assert parse_parameters("just a prompt\nNegative prompt: x, y") == {
        "Prompt": "just a prompt",
        "Negative prompt": "x, y",
    }
    assert parse_parameters("Steps: 20, Sampler: Euler") == {
        "Prompt": "Steps: 20, Sampler: Euler",
        "Negative prompt": "",
    }


def test_lines_are_read_stripped_like_a1111():
    text = "  a cat  \n  on a mat\nNegative prompt:   dog \n\n  fish\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 0"
    fields = parse_parameters(text)
    assert fields["Prompt"] == "a cat\non a mat" and fields["Negative prompt"] == "dog\n\nfish"


def random_text(rng: random.Random, max_len: int, newlines: bool) -> str:
    alphabet = list("abcxyz  ,:()[]\"\\'é猫-/=\t") + ["BREAK", "Negative", "Steps: 3, "] + ["\n"] * newlines
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def readable_prompt(text: str) -> str:
    """What A1111's text can carry: lines without edge whitespace, no empty first line, none starting as the
    negative-prompt marker (a documented limit of the format)."""
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(line for line in lines if not line.startswith("Negative prompt:"))


def expected_value(value) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def test_round_trip_property():
    rng = random.Random(0)
    keys = ["Denoising strength", "Clip skip", "Hires upscaler", "ENSD", "Lora hashes", "Face restoration/x"]
    for _ in range(300):
        prompt = readable_prompt(random_text(rng, 60, newlines=True))
        negative = readable_prompt(random_text(rng, 30, newlines=True))
        sampler = rng.choice(["Euler a", "DPM++ 2M Karras", "a, b: c", '"quoted"', " spaced "])
        cfg_scale = rng.choice([7, 7.0, 7.5, 0.1 + 0.2, 30.0])
        extra = {k: rng.choice([rng.randint(0, 9), rng.random(), 2.0, random_text(rng, 12, True)]) for k in keys}
        extra = dict(rng.sample(sorted(extra.items()), rng.randint(0, len(keys))))
        args = (prompt, negative, rng.randint(1, 150), sampler, cfg_scale, rng.randint(0, 2**32 - 1), 64, 8)
        model_name = rng.choice([None, "v1-5-pruned-emaonly", "weird, name: here"])
        text = format_parameters(*args, model_name=model_name, model_hash="6ce0161689", extra=extra)
        fields = parse_parameters(text)
        want = {
            "Prompt": prompt,
            "Negative prompt": negative,
            "Steps": str(args[2]),
            "Sampler": sampler,
            "CFG scale": expected_value(cfg_scale),
            "Seed": str(args[5]),
            "Size": "64x8",
            "Model hash": "6ce0161689",
            **({} if model_name is None else {"Model": model_name}),
            **{k: expected_value(v) for k, v in extra.items()},
        }
        assert fields == want, text
        assert text.split("\n")[-1].startswith("Steps: ")  # the parameters are one line, whatever the values hold


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prompt": None}, "prompt must be a str"),
        ({"negative_prompt": 3}, "negative_prompt must be a str"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"steps": 20.0}, "steps must be an int >= 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"width": 0}, "width must be an int >= 1"),
        ({"sampler": ""}, "sampler must be a non-empty str"),
        ({"cfg_scale": "7"}, "cfg_scale must be a number"),
        ({"cfg_scale": float("nan")}, "finite"),
        ({"extra": {"Steps": 3}}, "extra keys"),
        ({"extra": {"bad:key": 3}}, "extra keys"),
        ({"extra": {"x": 3}}, "extra keys"),  # A1111 reads keys of 2+ characters only
        ({"extra": {"Lora": [1]}}, "Lora must be a str, int or float"),
        ({"extra": [("a", 1)]}, "extra must be a dict"),
    ],
)
def test_format_parameters_bad_input(kwargs, fragment):
    args = {"prompt": "a", "negative_prompt": "", "steps": 20, "sampler": "Euler", "cfg_scale": 7, "seed": 1}
    args.update(width=512, height=512)
    args.update(kwargs)
    assert_one_line_error(lambda: format_parameters(**args), fragment)


def test_parse_parameters_bad_input():
    assert_one_line_error(lambda: parse_parameters(b"Steps: 1"), "text must be a str")


def test_key_values_reads_what_a1111s_regex_reads():
    """key_values (linear) against PARAMETER.findall, A1111's `re_param` (quadratic on a long key run without ":"),
    on 20,000 random lines over the characters that matter: word characters, the key punctuation, quotes,
    backslashes, commas, colons and Unicode spaces and digits."""
    alphabet = ["a", "Z", "1", "_", " ", "-", "/", ":", ",", '"', "\\", "\t", "é", "\xa0", "²", ".", "\u3000"]
    generator = random.Random(0)
    for _ in range(20_000):
        line = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 40)))
        assert key_values(line) == PARAMETER.findall(line), repr(line)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("Eta: abc", "Eta: 'abc' is not a number"),
        ("Threads: 0", "Threads: must be an integer in [1, 1024], got '0'"),
        ("Threads: 5000000", "Threads: must be an integer in [1, 1024]"),  # set_num_threads would hang or crash
        ("Threads: two", "Threads: must be an integer"),
    ],
)
def test_tampered_values_are_one_line_errors(extra, fragment):
    """A value regenerate would act on before any pipeline check (Eta, the thread count it sets): one line."""
    text = f"a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, {extra}"
    assert_one_line_error(lambda: GenerationParameters.from_text(text), fragment)
    GenerationParameters.from_text(text.split(", " + extra)[0] + ", Eta: 0.5, Threads: 16")  # in range: read
