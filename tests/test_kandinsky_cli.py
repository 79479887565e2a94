"""Kandinsky 2.2 from the command line and the Python API, on tiny random weights saved by diffusers: the three
commands write PNGs whose parameters make the same bytes again (`minisd regenerate`), the API's images equal the
pipelines', and options that mean nothing for Kandinsky are one line, exit 2."""

import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from minisd import cli
from minisd.errors import MinisdError
from minisd.images import read_png_parameters
from minisd.kandinsky.api import Kandinsky, KandinskyParameters, is_kandinsky_text
from minisd.kandinsky.pipelines.inpaint import inpaint
from tests.kandinsky_reference import save_tiny_repos, tiny_reference
from tests.reference import write_reference_tokenizer_folder
from tests.test_cli import ENV

SMALL = ["--steps", "3", "--prior-steps", "2", "--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("kandinsky_cli")
    save_tiny_repos(root, tiny_reference(write_reference_tokenizer_folder(root / "tokenizer")))
    Image.effect_mandelbrot((70, 50), (-2, -1.2, 1, 1.2), 40).convert("RGB").save(root / "cat.png")
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (20, 10, 50, 40))
    mask.save(root / "mask.png")
    return root


def run_cli(cwd, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "minisd", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_commands_write_pngs_that_regenerate_to_the_same_bytes(work, command):
    decoder = work / ("decoder-inpaint" if command == "inpaint" else "decoder")
    images = {"generate": [], "img2img": ["--image", work / "cat.png", "--strength", "0.7"],
              "inpaint": ["--image", work / "cat.png", "--mask", work / "mask.png"]}[command]  # fmt: skip
    out = work / f"{command}.png"
    result = run_cli(work, command, "a cat wizard", *images, "--model", decoder, "--prior", work / "prior", *SMALL,
                     "--seed", 7, "--negative-prompt", "blurry", "-o", out)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    params = KandinskyParameters.from_text(read_png_parameters(out))
    assert (params.mode, params.seed, params.prior_steps, params.width, params.height) == (command.replace(
        "generate", "txt2img"), 7, 2, 48, 32)  # fmt: skip
    # named, never by path: the decoder and prior by folder name, the source images by hash
    assert (params.prior, params.model_name, params.negative_prompt) == ("prior", decoder.name, "blurry")
    assert str(work) not in read_png_parameters(out)
    again = work / f"{command}-again.png"
    sources = [arg for arg in images if arg not in ("--strength", "0.7")]  # the source images, given again
    result = run_cli(work, "regenerate", out, "--models-dir", work, *sources, "-o", again)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).tobytes() == Image.open(again).tobytes()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--clip-skip", "1"], "--clip-skip is an SD option"),
        (["--sampler", "Euler a"], "--sampler must be one of DDPM, DDIM"),
        (["--height", "36"], "height must be a multiple of 8 pixels"),  # the pipeline's check, in its words
        (["--prior", "nowhere/missing-prior"], "is not in the Hugging Face cache"),
        (["--schedule-type", "Karras", "--grid"], "--schedule-type, --grid: SD v1 options"),
        (["--eta", "0.5"], "--eta is an SD option"),
    ],
)
def test_bad_options_are_one_line_exit_2(work, capsys, monkeypatch, extra, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(work / "no_home"))
    args = ["generate", "a cat", "--model", str(work / "decoder"), "--steps", "2", "--prior-steps", "2", *extra]
    if "--prior" not in extra:
        args += ["--prior", str(work / "prior")]
    assert cli.main([*args, "-o", str(work / "bad.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err, err


def test_api_images_equal_the_pipelines_and_parameters_read_back(work):
    pipe = Kandinsky.from_pretrained(work / "decoder-inpaint", prior=work / "prior")
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 3, "prior_num_inference_steps": 2}
    out = pipe.inpaint("a hat", work / "cat.png", work / "mask.png", seed=11, num_images_per_prompt=2, **kwargs)
    assert out.seeds == [11, 12]
    for i, image in enumerate(out.images):  # image i is made alone from seed + i
        want = inpaint(pipe.components, "a hat", image=Image.open(work / "cat.png"),
                       mask_image=Image.open(work / "mask.png"), seed=11 + i, **kwargs)[0]  # fmt: skip
        assert image.tobytes() == want.tobytes()
    text = out.parameters[1].text()
    assert is_kandinsky_text(text) and KandinskyParameters.from_text(text) == out.parameters[1]
    again = pipe.generate(out.parameters[1], work / "cat.png", work / "mask.png")  # the sources, given again
    assert again.tobytes() == out.images[1].tobytes()
    with pytest.raises(MinisdError, match="not written for a Kandinsky"):
        KandinskyParameters.from_text("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64")
    ddim = text.replace("Sampler: DDPM", "Sampler: DDIM")
    for extra, fragment in (  # SD v1's schedule, η and options: refused in one line, not silently ignored
        ("Schedule type: Karras", "Schedule type: an SD v1 field"),
        ("Eta DDIM: 0.5", "Eta DDIM: an SD v1 field"),
        ("Eta: 0.5", "Eta: an SD v1 field"),  # with DDIM (DDPM takes none: refused as GenerationParameters does)
        ("Timestep spacing: trailing, Clip skip: 2", "Timestep spacing, Clip skip: SD v1 fields"),
        ("Guidance rescale: 0.7, VAE tiling: True, Fast: True", "Guidance rescale, VAE tiling, Fast: SD v1 fields"),
    ):
        with pytest.raises(MinisdError, match=re.escape(fragment)) as info:
            KandinskyParameters.from_text(ddim + ", " + extra)
        assert "\n" not in str(info.value)
    with pytest.raises(MinisdError, match=re.escape("Sampler: 'Euler a'; Kandinsky 2.2's decoder has DDPM, DDIM")):
        KandinskyParameters.from_text(text.replace("Sampler: DDPM", "Sampler: Euler a"))
    assert pipe.dtype == torch.float32  # dtype None on the CPU: float32, as StableDiffusion
