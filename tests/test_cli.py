"""The `minisd` command on tiny random weights (official key names, small shapes): files, bytes, errors.

The runs that make images go through subprocesses (`python -m minisd`), as a user runs them; the many bad-argument
cases call cli.main in-process (the same code, a second instead of seconds each) and check the same things: exit
status 2, exactly one line on stderr, no traceback.
"""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minisd import cli
from minisd.api import default_model
from minisd.images import read_png_parameters
from minisd.loading import load_components
from minisd.parameters import GenerationParameters
from minisd.train.evaluate import prompt_note
from tests.fakes import tiny_official_state_dict
from weights_convert.__main__ import main as weights_convert

ROOT = Path(__file__).resolve().parents[1]
# Tiny models: one thread is fastest, and the CI machine's 2 cores are shared with other test processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--steps", "2", "--height", "64", "--width", "64"]


def run_cli(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minisd", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with tiny.safetensors (official layout), inpainting.safetensors, folder/ (diffusers layout), a 64×64
    image, a matching mask and one of another size."""
    work = tmp_path_factory.mktemp("cli")
    save_file(tiny_official_state_dict("emaonly"), work / "tiny.safetensors", metadata={"format": "pt"})
    save_file(
        tiny_official_state_dict("inpainting", seed=1), work / "inpainting.safetensors", metadata={"format": "pt"}
    )
    assert weights_convert(["convert", str(work / "tiny.safetensors"), str(work / "folder")]) == 0
    gradient = Image.linear_gradient("L").resize((64, 64))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(work / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(work / "mask.png")
    Image.new("L", (32, 64)).save(work / "small-mask.png")
    Image.new("RGB", (61, 64)).save(work / "odd.png")  # not a multiple of the tiny VAE's 2 (SD v1's 8)
    return work


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Runs that make images (subprocesses)


def test_generate_same_seed_same_bytes_and_regenerate(work):
    args = ["generate", "a red cube, (shiny:1.2)", "--checkpoint", "tiny.safetensors", *SMALL, "--seed", "7"]
    args += ["--sampler", "Euler a", "--negative-prompt", "blurry", "--clip-skip", "1", "-o", "a.png"]
    first = run_cli(work, *args)
    assert_ok(first)
    assert first.stdout.strip() == "a.png  seed 7"
    params = GenerationParameters.from_text(read_png_parameters(work / "a.png"))
    assert (params.prompt, params.negative_prompt, params.sampler, params.seed) == (
        "a red cube, (shiny:1.2)",
        "blurry",
        "Euler a",
        7,
    )
    assert (params.num_inference_steps, params.width, params.height, params.clip_skip) == (2, 64, 64, 1)
    assert params.weights == str(work / "tiny.safetensors") and params.model_name == "tiny"
    assert "Clip skip: 2" in read_png_parameters(work / "a.png")  # A1111's numbering in the file

    second = run_cli(work, *args)  # the same again: a fresh name, not an error, and the same bytes
    assert_ok(second)
    assert second.stdout.strip() == "a-1.png  seed 7"
    assert "a.png exists, wrote a-1.png instead" in second.stderr
    assert (work / "a-1.png").read_bytes() == (work / "a.png").read_bytes()

    again = run_cli(work, "regenerate", "a.png", "-o", "r.png")
    assert_ok(again)
    assert (work / "r.png").read_bytes() == (work / "a.png").read_bytes()


def test_fast_is_recorded_and_regenerated_fast(work):
    args = ["generate", "a cat", "--checkpoint", "tiny.safetensors", *SMALL, "--seed", "3", "--fast", "-o", "f.png"]
    assert_ok(run_cli(work, *args))
    assert GenerationParameters.from_text(read_png_parameters(work / "f.png")).fast
    assert_ok(run_cli(work, "regenerate", "f.png", "-o", "f2.png"))  # runs fast again: the same bytes
    assert (work / "f2.png").read_bytes() == (work / "f.png").read_bytes()


def test_num_images_numbered_files_drawn_seed(work):
    result = run_cli(work, "generate", "a blue ball", "--model", "folder", *SMALL, "--num-images", "2")
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == [str(Path("outputs") / f"0000{i}.png") for i in (1, 2)]
    seed = int(lines[0].split()[-1])
    assert int(lines[1].split()[-1]) == seed + 1  # A1111's rule: image i has seed + i
    assert f"seed {seed} was drawn" in result.stderr
    assert (work / "outputs" / "00001.png").read_bytes() != (work / "outputs" / "00002.png").read_bytes()

    again = run_cli(work, "regenerate", Path("outputs") / "00002.png")  # the second image alone, from its seed
    assert_ok(again)
    assert again.stdout.split()[0] == str(Path("outputs") / "00003.png")
    assert (work / "outputs" / "00003.png").read_bytes() == (work / "outputs" / "00002.png").read_bytes()


def test_img2img_and_regenerate(work):
    result = run_cli(
        work, "img2img", "a watercolour", "--image", "in.png", "--strength", "0.5", "--steps", "4",
        "--checkpoint", "tiny.safetensors", "--seed", "3", "--sampler", "DDIM", "--eta", "0.5", "-o", "i.png",
    )  # fmt: skip
    assert_ok(result)
    params = GenerationParameters.from_text(read_png_parameters(work / "i.png"))
    assert (params.mode, params.strength, params.eta, params.image) == ("img2img", 0.5, 0.5, str(work / "in.png"))
    with Image.open(work / "i.png") as pil:
        assert pil.size == (64, 64)
    again = run_cli(work, "regenerate", "i.png", "-o", "i2.png")
    assert_ok(again)
    assert (work / "i2.png").read_bytes() == (work / "i.png").read_bytes()


def test_inpaint(work):
    result = run_cli(
        work, "inpaint", "a hat", "--image", "in.png", "--mask", "mask.png", "--steps", "2",
        "--checkpoint", "inpainting.safetensors", "--seed", "1", "-o", "p.png",
    )  # fmt: skip
    assert_ok(result)
    params = GenerationParameters.from_text(read_png_parameters(work / "p.png"))
    assert params.mode == "inpaint" and params.mask_image == str(work / "mask.png") and params.strength == 1.0


def test_no_weights_named_uses_the_nano_model(work, capsys, monkeypatch):
    """README's first command: the shipped nano model, at its own size; without it, a one-line hint."""
    bare = run_cli(work, "generate", "a red circle above a blue square", "--steps", "5", "--seed", "1", "-o", "n.png")
    assert_ok(bare)
    params = GenerationParameters.from_text(read_png_parameters(work / "n.png"))
    assert params.weights == str(default_model().resolve()) and (params.width, params.height) == (64, 64)
    assert params.guidance_scale == load_components(default_model()).guidance_scale  # the model's own default
    monkeypatch.setattr(cli, "default_model", lambda: None)  # as if minisd/data/nano.safetensors were removed
    assert cli.main(["generate", "a cat", "-o", str(work / "none.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint FILE" in err and "--model" in err


def test_nano_model_notes_a_prompt_outside_its_captions(work, capsys):
    """The nano model draws something for any prompt; outside its caption grammar it says so, and still draws."""
    tiny = ["--checkpoint", str(work / "tiny.safetensors"), *SMALL]
    assert cli.main(["generate", "a red circle above a blue square", "--steps", "2", "-o", str(work / "ok.png")]) == 0
    assert "note:" not in capsys.readouterr().err
    assert cli.main(["generate", "a cat", "--steps", "2", "--seed", "1", "-o", str(work / "cat.png")]) == 0
    err = capsys.readouterr().err
    assert "nano.safetensors knows only its training captions" in err and "'a cat'" in err
    assert (work / "cat.png").is_file()
    assert cli.main(["generate", "a cat", *tiny, "--seed", "1", "-o", str(work / "cat-tiny.png")]) == 0
    assert "knows only" not in capsys.readouterr().err  # weights not made by minisd.train: no grammar to hold to
    assert prompt_note(str(default_model()), "(a red circle:1.2) above a [blue] square") is None


def test_overwrite_replaces_and_unrecordable_prompt_is_noted(work, capsys):
    path = work / "over.png"
    path.write_bytes(b"old")
    argv = ["generate", " x ", "--checkpoint", str(work / "tiny.safetensors"), *SMALL, "--seed", "1", "-o", str(path)]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cannot be written exactly" in capsys.readouterr().err  # A1111's format strips the prompt's spaces


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback (in-process)


def bad_cases(work: Path) -> dict[str, list[str]]:
    tiny = ["--checkpoint", str(work / "tiny.safetensors")]
    image = ["--image", str(work / "in.png")]
    return {
        "steps 0": ["generate", "x", *tiny, "--steps", "0"],
        "steps not a number": ["generate", "x", *tiny, "--steps", "many"],
        "height 65": ["generate", "x", *tiny, "--height", "65"],
        "unknown sampler": ["generate", "x", *tiny, "--sampler", "Euler b"],
        "eta without DDIM": ["generate", "x", *tiny, "--eta", "0.5", "--sampler", "Euler"],
        "negative guidance": ["generate", "x", *tiny, "--guidance", "-1"],
        "negative seed": ["generate", "x", *tiny, "--seed", "-1"],
        "bad dtype": ["generate", "x", *tiny, "--dtype", "float8"],
        "bad device": ["generate", "x", *tiny, "--device", "banana"],
        "nonexistent checkpoint": ["generate", "x", "--checkpoint", str(work / "nope.safetensors")],
        "checkpoint is a folder": ["generate", "x", "--checkpoint", str(work / "folder")],
        "corrupt checkpoint": ["generate", "x", "--checkpoint", str(work / "corrupt.safetensors"), *SMALL],
        "not a model id": ["generate", "x", "--model", "no such model!"],
        "both checkpoint and model": ["generate", "x", *tiny, "--model", "a/b"],
        "output not png": ["generate", "x", *tiny, "-o", str(work / "out.jpg")],
        "output folder missing": ["generate", "x", *tiny, "-o", str(work / "nowhere" / "out.png")],
        "missing image": ["img2img", "x", *tiny, "--image", str(work / "missing.png")],
        "image not an image": ["img2img", "x", *tiny, "--image", str(work / "tiny.safetensors")],
        "width too large": ["generate", "x", *tiny, "--width", "100000"],
        "image size not a multiple of the VAE's factor": ["img2img", "x", *tiny, "--image", str(work / "odd.png")],
        "strength 1.5": ["img2img", "x", *tiny, *image, "--strength", "1.5"],
        "strength too small for steps": ["img2img", "x", *tiny, *image, "--strength", "0.1", "--steps", "2"],
        "mask size mismatch": ["inpaint", "x", *tiny, *image, "--mask", str(work / "small-mask.png")],
        "mask missing argument": ["inpaint", "x", *tiny, *image],
        "clip skip beyond the layers": ["generate", "x", *tiny, *SMALL, "--clip-skip", "5"],
        "regenerate a PNG without parameters": ["regenerate", str(work / "in.png")],
        "regenerate a missing file": ["regenerate", str(work / "missing.png")],
        "unknown command": ["paint", "x"],
    }


def test_bad_arguments_one_line_exit_2(work, capsys, monkeypatch):
    (work / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    monkeypatch.chdir(work)
    cases = bad_cases(work)
    assert len(cases) >= 15
    for name, argv in cases.items():
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("minisd"), (name, err)
        assert "Traceback" not in err, name


def test_bad_argument_in_a_subprocess(work):
    result = run_cli(work, "generate", "x", "--steps", "0")  # argparse's errors (MinisdError's: no weights, above)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_info(work, capsys, tmp_path, monkeypatch):
    assert cli.main(["info", str(work / "inpainting.safetensors")]) == 0
    assert "variant:    v1-inpainting" in capsys.readouterr().out
    assert cli.main(["info", str(work / "folder")]) == 0
    assert "layout:     diffusers" in capsys.readouterr().out
    # a hub id, from a Hugging Face cache laid out by hand, offline
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4"
    shutil.copytree(work / "folder", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["info", "CompVis/stable-diffusion-v1-4"]) == 0
    assert f"snapshots/{revision}" in capsys.readouterr().out
    assert cli.main(["info", "CompVis/not-cached"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def test_status_line():
    """Status lines on a terminal only (the denoising steps' bar is the API's tqdm, tests/test_api.py)."""
    stream = io.StringIO()
    status = cli.Status(stream, live=True)
    status.phase("loading tiny.safetensors")
    status.done("loaded tiny.safetensors")
    text = stream.getvalue()
    assert "loading tiny.safetensors ...\n" in text and "loaded tiny.safetensors (" in text and text.endswith("s)\n")
    quiet = io.StringIO()
    cli.Status(quiet, live=False).phase("loading")
    assert quiet.getvalue() == ""


def test_output_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert list(cli.output_paths(None, 2)) == [Path("outputs/00001.png"), Path("outputs/00002.png")]
    assert not (tmp_path / "outputs").exists()  # made when the first image is written, not before
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "00041-cat.png").write_bytes(b"")
    assert list(cli.output_paths(None, 1)) == [Path("outputs/00042.png")]
    assert list(cli.output_paths("cat.png", 2)) == [Path("cat-1.png"), Path("cat-2.png")]
    assert list(cli.output_paths(str(tmp_path), 1)) == [tmp_path / "00001.png"]
