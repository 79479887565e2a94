"""Textual inversion: every common embedding format gives the prompt embeddings and the picture diffusers'
load_textual_inversion gives, the A1111 way (an embeddings folder, names typed in prompts) included; the text
encoder's two halves (ids -> input embeddings -> hidden states) let a reader put a vector in by hand.

Tolerance: an added word is one more row of the token table, read by the same layers on both sides: measured 0
(bit-equal); the bar, 1e-6 of the output's scale, would catch a wrong row, a wrong id or a lost vector (order 1).
Pictures: tests/test_pipelines.py's 1e-3 on [0, 1] pixels.
"""

import pickle
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.pipelines.prompts import encode_prompt
from minisd.pipelines.txt2img import txt2img
from minisd.textual_inversion import EmbeddingsFolder, load_textual_inversion
from minisd.tokenizer import Tokenizer
from tests.parity import assert_parity
from tests.test_pipelines import SIZE, check_pixels, random_full_size, start_latents
from tests.twins import make_twins
from weights_convert.embeddings import read_embedding

TOL = 1e-6  # of the output's scale; see the module docstring
WIDTH = 32  # the tiny text encoder's


@pytest.fixture
def fresh(tmp_path_factory):
    return make_twins(tmp_path_factory.getbasetemp() / "tokenizer")


def write_embeddings(folder, width: int = WIDTH, seed: int = 0) -> dict[str, tuple]:
    """One file of each format: {file name: (token to pass to diffusers or None, number of vectors)}."""
    g = torch.Generator().manual_seed(seed)
    torch.save({"<cat-toy>": torch.randn(width, generator=g)}, folder / "learned_embeds.bin")  # sd-concepts-library
    save_file({"<birb-style>": torch.randn(3, width, generator=g)}, folder / "learned_embeds.safetensors")  # diffusers
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(2, width, generator=g).requires_grad_()},  # saved while training
        "name": "watercolour",
        "step": 3000,
        "sd_checkpoint": "cc6cb27103",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(a1111, folder / "watercolour.pt")
    save_file({"emb_params": torch.randn(4, width, generator=g)}, folder / "easynegative.safetensors")  # A1111, civitai
    return {
        "learned_embeds.bin": (None, 1),
        "learned_embeds.safetensors": (None, 3),
        "watercolour.pt": (None, 2),
        "easynegative.safetensors": ("easynegative", 4),  # diffusers would name it "emb_params"; A1111 by the stem
    }


PROMPTS = [
    "a photo of a <cat-toy> in <birb-style>",
    "watercolour, a <cat-toy> on a table",
]  # (no emphasis: diffusers has none)
NEGATIVE = "easynegative, blurry"


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_every_format_matches_diffusers(tmp_path_factory, tmp_path, sd2):
    """Every embedding format on SD v1's text encoder, and on an SD 2-shaped one (GELU, "!" padding: the added words
    must not change the padding): prompt and negative embeddings and a picture against diffusers."""
    fresh = make_twins(tmp_path_factory.getbasetemp() / ("tokenizer-sd2" if sd2 else "tokenizer"), sd2=sd2)
    width, what = fresh.ours.text_encoder.config.hidden_size, "SD 2 " if sd2 else ""
    files = write_embeddings(tmp_path, width=width)
    for name, (token, n) in files.items():
        fresh.pipe.load_textual_inversion(str(tmp_path / name), token=token)
        loaded = load_textual_inversion(fresh.ours.tokenizer, fresh.ours.text_encoder, tmp_path / name)
        assert len(loaded.ids) == n and read_embedding(tmp_path / name).vectors.shape == (n, width)
    if sd2:
        ids = fresh.ours.tokenizer([PROMPTS[0]])[0]
        assert ids[-1] == 0 and (ids == 0).sum() > 60, "SD 2 pads with '!' (id 0) after the added words"
    # (diffusers' encode_prompt spells a multi-vector word out itself, maybe_convert_prompt; minisd's tokenizer does)
    with torch.no_grad():
        want, want_negative = fresh.pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * 2)
        ours = encode_prompt(fresh.ours.tokenizer, fresh.ours.text_encoder, [NEGATIVE] * 2 + PROMPTS)
    assert_parity("test_every_format", f"{what}prompt embeddings with 4 embeddings, 10 vectors", ours[2:], want, TOL)
    assert_parity("test_every_format", f"{what}negative prompt embedding (A1111 .safetensors)", ours[:2],
                  want_negative, TOL)  # fmt: skip

    kwargs = dict(prompt=PROMPTS[0], negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=3)
    got = txt2img(fresh.ours, **kwargs, output_type="np", latents=start_latents(1, 5), sampler="DDIM")
    want = fresh.pipe(**kwargs, output_type="np", latents=start_latents(1, 5)).images
    check_pixels("test_every_format", f"{what}txt2img with textual-inversion words in both prompts", got, want)


def test_a1111_folder_names_typed_in_prompts(fresh, tmp_path):
    """The A1111 way: the folder's files by their stems, loaded when a prompt uses them, whole words only."""
    write_embeddings(tmp_path)
    folder = EmbeddingsFolder(tmp_path)
    assert [name for name, _ in folder.used_in(["a Watercolour cat", "EasyNegative"])] == ["easynegative",
                                                                                          "watercolour"]  # fmt: skip
    assert folder.used_in(["watercolours", "un-easynegative"]) == [
        ("easynegative", tmp_path / "easynegative.safetensors")
    ]
    for name, path in folder.used_in(["watercolour", "easynegative"]):
        load_textual_inversion(fresh.ours.tokenizer, fresh.ours.text_encoder, path, name, whole_word=True)
        fresh.pipe.load_textual_inversion(str(path), token=name)
    prompts = ["watercolour, a cat", "a cat in watercolour style"]
    with torch.no_grad():
        want, _ = fresh.pipe.encode_prompt(prompts, "cpu", 1, False)
        ours = encode_prompt(fresh.ours.tokenizer, fresh.ours.text_encoder, prompts)
    assert_parity("test_a1111_folder", "prompt embeddings, A1111 folder embedding by name", ours, want, TOL)
    assert fresh.ours.tokenizer.encode("watercolours") == Tokenizer.from_default().encode("watercolours")


def test_two_halves_and_a_vector_put_in_by_hand(fresh, tmp_path):
    """The lesson's get_output_embeds: input embeddings (token + position) with one row replaced by the learned
    vector, then the transformer, equals the added word; the first half equals transformers' embeddings module."""
    write_embeddings(tmp_path)
    ids = fresh.ours.tokenizer(["a photo of a toy"])
    text_encoder = fresh.ours.text_encoder
    with torch.no_grad():
        input_embeddings = text_encoder.input_embeddings(ids)
        assert_parity("test_two_halves", "input embeddings (token + position)", input_embeddings,
                      fresh.ref.text_encoder.embeddings(input_ids=ids), TOL)  # fmt: skip
        assert torch.equal(text_encoder.output_embeddings(input_embeddings).last_hidden_state,
                           text_encoder(ids).last_hidden_state)  # fmt: skip
        toy = fresh.ours.tokenizer.encode("toy")[0]
        vector = read_embedding(tmp_path / "learned_embeds.bin").vectors[0]
        input_embeddings[0, ids[0] == toy] = vector + text_encoder.embeddings.position_embedding.weight[ids[0] == toy]
        by_hand = text_encoder.output_embeddings(input_embeddings).last_hidden_state
        load_textual_inversion(fresh.ours.tokenizer, text_encoder, tmp_path / "learned_embeds.bin")
        added = text_encoder(fresh.ours.tokenizer(["a photo of a <cat-toy>"])).last_hidden_state
    assert torch.equal(by_hand, added)


def test_full_size_embedding_matches_diffusers(fresh, tmp_path):
    """CLIP ViT-L/14's text encoder at SD v1's size, random weights, a 2-vector 768-wide embedding."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.rand(2**26, generator=generator) * 2 - 1
    ref_text = CLIPTextModel(CLIPTextConfig(**asdict(TextEncoderConfig()))).eval()
    ref_text.load_state_dict(random_full_size(ref_text, pool, generator), strict=True)
    del pool
    text_encoder = TextEncoder(TextEncoderConfig()).eval()
    text_encoder.load_state_dict(ref_text.state_dict(), strict=True)
    fresh.pipe.text_encoder = ref_text
    torch.save({"<full>": torch.randn(2, 768, generator=generator) * 0.02}, tmp_path / "full.bin")
    fresh.pipe.load_textual_inversion(str(tmp_path / "full.bin"))
    load_textual_inversion(fresh.ours.tokenizer, text_encoder, tmp_path / "full.bin")
    prompt = "a photograph of <full> riding a horse"
    with torch.no_grad():
        want, _ = fresh.pipe.encode_prompt(prompt, "cpu", 1, False)
        ours = encode_prompt(fresh.ours.tokenizer, text_encoder, [prompt])
    assert_parity("test_full_size_embedding", "full-size prompt embeddings with a 2-vector embedding", ours, want, TOL)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: torch.save({"<sd2>": torch.zeros(1024)}, p / "e.pt"), "1024 wide .SD 2.x"),
        (lambda p: torch.save({"cat": torch.zeros(WIDTH)}, p / "e.pt"), "already has the word 'cat'"),
        (
            lambda p: save_file(
                {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "b": torch.zeros(1)}, p / "e.safetensors"
            ),
            "not a textual-inversion embedding",
        ),
        (lambda p: torch.save({"<x>": torch.zeros(80, WIDTH)}, p / "e.pt"), "1 to 75 float vectors"),
        (
            lambda p: (p / "e.pt").write_bytes(pickle.dumps({"<x>": Exploit()})),
            "refusing to unpickle global posix.system",
        ),
        (lambda p: (p / "e.pt").write_bytes(b"not a pickle"), "e.pt"),
        (lambda p: torch.save({"clip_l": torch.zeros(768), "clip_g": torch.zeros(1280)}, p / "e.pt"), "SDXL"),
    ],
    ids=["sd2-width", "in-vocabulary", "a-lora", "too-many-vectors", "malicious-pickle", "corrupt", "sdxl"],
)
def test_bad_embeddings_are_one_line(fresh, tmp_path, make, fragment):
    make(tmp_path)
    path = next(tmp_path.glob("e.*"))
    rows = fresh.ours.text_encoder.embeddings.token_embedding.num_embeddings
    with pytest.raises(MinisdError, match=fragment) as error:
        load_textual_inversion(fresh.ours.tokenizer, fresh.ours.text_encoder, path)
    assert "\n" not in str(error.value)
    assert len(fresh.ours.tokenizer) == rows == fresh.ours.text_encoder.embeddings.token_embedding.num_embeddings
