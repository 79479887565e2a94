"""minisd.StableDiffusion on tiny random weights: the three calls, the seed rule, the recorded parameters."""

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minisd
from minisd.api import default_model
from minisd.errors import MinisdError
from minisd.parameters import GenerationParameters, pixels_hash, short_hash
from tests.fakes import tiny_official_state_dict
from weights_convert.__main__ import main as weights_convert

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    save_file(tiny_official_state_dict("emaonly"), work / "tiny.safetensors", metadata={"format": "pt"})
    assert weights_convert(["convert", str(work / "tiny.safetensors"), str(work / "folder")]) == 0
    gradient = Image.linear_gradient("L").resize((64, 64))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(work / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(work / "mask.png")
    return work


@pytest.fixture(scope="module")
def pipe(work):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine
    yield minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors")
    torch.set_num_threads(threads)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_txt2img_seed_rule_and_parameters(pipe, work):
    out = pipe("a cat", negative_prompt="a dog", sampler="Euler a", seed=5, num_images_per_prompt=2, **SMALL)
    assert len(out.images) == 2 and out.seeds == [5, 6] and out.images[0].size == (64, 64)
    alone = pipe("a cat", negative_prompt="a dog", sampler="euler_a", seed=6, **SMALL)  # image 1 is seed 6 alone
    assert same(alone.images[0], out.images[1])
    params = out.parameters[1]
    assert (params.mode, params.sampler, params.seed, params.dtype, params.device) == (
        "txt2img", "Euler a", 6, "float32", "cpu",
    )  # fmt: skip
    assert params.weights == str(work / "tiny.safetensors") and params.model_name == "tiny"
    assert params.model_hash == short_hash((work / "tiny.safetensors").read_bytes())
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params), out.images[1])


def test_img2img_and_inpaint_record_their_sources(pipe, work):
    out = pipe.img2img("a cat", work / "in.png", strength=0.5, seed=1, num_inference_steps=4)
    params = out.parameters[0]
    assert (params.mode, params.strength, params.image) == ("img2img", 0.5, str(work / "in.png"))
    with Image.open(work / "in.png") as pil:
        assert params.image_hash == pixels_hash(pil)
        from_pil = pipe.img2img("a cat", pil, strength=0.5, seed=1, num_inference_steps=4)
    assert same(from_pil.images[0], out.images[0])  # a path or the PIL image: the same run
    assert from_pil.parameters[0].image is None
    with pytest.raises(MinisdError, match="PIL image"):
        pipe.generate(from_pil.parameters[0])  # an image given as PIL cannot be found again
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params), out.images[0])

    painted = pipe.inpaint("a hat", work / "in.png", work / "mask.png", seed=2, num_inference_steps=2)
    params = painted.parameters[0]
    assert params.mode == "inpaint" and params.mask_image == str(work / "mask.png")
    assert GenerationParameters.from_text(params.text()) == params
    assert same(pipe.generate(params), painted.images[0])


def test_changed_source_image_is_refused(pipe, work, tmp_path):
    shutil.copy(work / "in.png", tmp_path / "in.png")
    params = pipe.img2img("a cat", tmp_path / "in.png", strength=0.5, seed=1, num_inference_steps=2).parameters[0]
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "in.png")
    with pytest.raises(MinisdError, match="has changed"):
        pipe.generate(params)


def test_folder_and_hub_id(work, tmp_path, monkeypatch):
    folder = minisd.StableDiffusion.from_pretrained(work / "folder")
    assert folder.model_name == "folder" and folder.model_hash is None
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(work / "folder", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = minisd.StableDiffusion.from_pretrained(REPO_ID, local_files_only=True)
    assert hub.weights == REPO_ID and hub.model_name == REPO_ID
    a = hub("a cat", seed=3, **SMALL)
    b = folder("a cat", seed=3, **SMALL)
    assert same(a.images[0], b.images[0])
    assert "Model: stable-diffusion-v1-5/stable-diffusion-v1-5" in a.parameters[0].text()


def test_bad_calls(pipe, work):
    for call, match in (
        (lambda: pipe(["a", "b"], **SMALL), "prompt must be a str"),
        (lambda: pipe("a", sampler="Euler b", **SMALL), "unknown sampler"),
        (lambda: pipe("a", num_images_per_prompt=0, **SMALL), "num_images_per_prompt"),
        (lambda: pipe("a", seed=-1, **SMALL), "seed"),
        (lambda: pipe.img2img("a", work / "missing.png"), "no such file"),
        (lambda: pipe.img2img("a", 3), "image must be a PIL image"),
        (lambda: pipe.inpaint("a", work / "in.png", Image.new("L", (32, 32))), "mask_image must be the image's size"),
        (lambda: GenerationParameters.from_text("just a prompt"), "parameters lack"),
    ):
        with pytest.raises(MinisdError, match=match):
            call()


def test_progress_bar_is_shown_and_can_be_hidden(pipe, capsys):
    """As diffusers' pipelines: a tqdm bar of the model calls on stderr, hidden by set_progress_bar_config."""
    pipe("a cat", seed=1, sampler="Heun", **SMALL)  # Heun: 2 steps are 3 model calls
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe("a cat", seed=1, **SMALL)
        assert capsys.readouterr().err == ""
        with pytest.raises(MinisdError, match="disable must be a bool"):
            pipe.set_progress_bar_config(disable="yes")
    finally:
        pipe.set_progress_bar_config(disable=False)


def test_default_model_hook():
    model = default_model()
    assert model is None or model.is_file()  # None until the nano model ships in minisd/data/


def test_fast_is_the_same_image_and_is_recorded(pipe, work):
    """fast=True (minisd.fast.make_fast on all three networks) changes only float rounding: the pixels agree to one
    8-bit level; the parameters say so, and generate() from them runs fast again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast = minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors", fast=True)
        out = fast("a cat", sampler="DDIM", seed=3, **SMALL)
        eager = pipe("a cat", sampler="DDIM", seed=3, **SMALL)
    finally:
        torch.set_num_threads(threads)
    a = torch.tensor(list(out.images[0].getdata()), dtype=torch.int16)
    b = torch.tensor(list(eager.images[0].getdata()), dtype=torch.int16)
    assert (a - b).abs().max() <= 1
    params = out.parameters[0]
    assert params.fast and "Fast: True" in params.text() and "Fast" not in eager.parameters[0].text()
    assert GenerationParameters.from_text(params.text()) == params
    with pytest.raises(MinisdError, match="fast must be True or False"):
        minisd.StableDiffusion.from_pretrained(work / "tiny.safetensors", fast="yes")
