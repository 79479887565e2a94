"""Teaching the nano model a new concept (minisd/train/concept.py, finetune.py): the diamond is drawn, parsed and
judged; the split keeps held-out scenes out; a few steps of textual inversion and of LoRA write files the public
loaders read (diffusers' and A1111's embeddings, a kohya LoRA), and they change the picture; the commands check
their arguments in one line."""

import pytest
import torch

import minisd
from minisd.api import NANO_MODEL
from minisd.loading import load_components
from minisd.train import checker, concept, shapes
from minisd.train.__main__ import main as train_main
from minisd.train.finetune import FinetuneConfig, train_lora, train_textual_inversion
from tests.test_shapes import degrade


def test_the_split_keeps_held_out_scenes_out():
    train, heldout = concept.split()
    assert (len(train), len(heldout)) == (28, 32)
    seen = {shapes.scene_key(shapes.parse_caption(c)) for c in train}
    assert not seen & {shapes.scene_key(shapes.parse_caption(c)) for c in heldout}
    assert all(concept.CONCEPT in c for c in train + heldout)
    assert concept.split() == (train, heldout), "fixed by SPLIT_SEED, never by a training seed"


def test_the_checker_knows_diamonds():
    """Every training and held-out caption rendered crisp and blurred: right captions accepted, a diamond called a
    square (and a square called a diamond) rejected for its shape."""
    train, heldout = concept.split()
    generator = torch.Generator().manual_seed(0)
    accepted = []
    for caption in train + heldout:
        pixels = shapes.render(caption, generator)
        for picture in (pixels, degrade(pixels[None], generator, 1.0)[0]):
            accepted.append(checker.check(picture, caption))
            wrong = caption.replace(concept.CONCEPT, "square")
            verdict = checker.check_details(picture, wrong)
            assert not verdict.ok and verdict.part == "shape", wrong
    assert sum(accepted) / len(accepted) >= 0.95
    square = shapes.render("a red square", 1)
    assert checker.check(square, "a red square") and not checker.check(square, "a red diamond")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def few_steps(**fields) -> FinetuneConfig:
    return FinetuneConfig(steps=2, batch_size=2, **fields)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_textual_inversion_file_loads_back(tmp_path, suffix):
    components = load_components(NANO_MODEL, dtype=torch.float32)
    out = tmp_path / f"diamond{suffix}"
    losses = train_textual_inversion(components, out, few_steps(num_vectors=2), progress=False)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    pipe = minisd.StableDiffusion.from_pretrained(NANO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.load_textual_inversion(out) == concept.TOKEN
    ids = pipe.tokenizer([concept.TOKEN])[0]
    rows = pipe.text_encoder.embeddings.token_embedding.weight[ids[1:3]]
    trained = components.text_encoder.embeddings.token_embedding.weight[-2:]  # the trainer's model uses v* too
    torch.testing.assert_close(rows, trained, rtol=0, atol=0)
    square = components.text_encoder.embeddings.token_embedding.weight[components.tokenizer.encode("square")[0]]
    assert not torch.equal(rows[0], square), "v* moved away from its initializer"


def test_lora_file_loads_back_and_changes_the_picture(tmp_path):
    components = load_components(NANO_MODEL, dtype=torch.float32)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    out = tmp_path / "diamond-lora.safetensors"
    train_lora(components, out, few_steps(lr=1e-2), progress=False)
    after = components.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the trainer leaves the model as it was"
    pipe = minisd.StableDiffusion.from_pretrained(NANO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a red diamond", num_inference_steps=3, seed=1).images[0]
    pipe.load_lora_weights(out)
    adapted = pipe("a red diamond", num_inference_steps=3, seed=1)
    assert adapted.images[0].tobytes() != plain.tobytes()
    assert set(adapted.parameters[0].lora_hashes) == {"diamond-lora"}
    adapter = pipe.additions.adapters.adapters["diamond-lora"]
    kinds = {network for network, _ in adapter.branches}
    assert kinds == {"unet", "text_encoder"} and any(b.conv for b in adapter.branches.values())  # LoCon convs too


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["lora", "--out", "x.pt"], "--out must be a .safetensors path"),
        (["textual-inversion", "--out", "nowhere/x.pt"], "in an existing folder"),
        (["lora", "--out", "x.safetensors", "--lr", "-1"], "lr must be >= 0"),
        (["lora", "--out", "x.safetensors", "--preserve", "-1"], "preserve must be >= 0"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert train_main([*args, "--eval-seeds", "0", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
