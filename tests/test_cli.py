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
from minisd.images import read_png_parameters, save_png
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
    assert params.model_name == "tiny" and params.threads == 1 and str(work) not in read_png_parameters(work / "a.png")
    assert "Clip skip: 2" in read_png_parameters(work / "a.png")  # A1111's numbering in the file

    second = run_cli(work, *args)  # the same again: a fresh name, not an error, and the same bytes
    assert_ok(second)
    assert second.stdout.strip() == "a-1.png  seed 7"
    assert "a.png exists, wrote a-1.png instead" in second.stderr
    assert (work / "a-1.png").read_bytes() == (work / "a.png").read_bytes()

    nowhere = run_cli(work, "regenerate", "a.png", "-o", "r.png")  # no path recorded: say where to look
    assert nowhere.returncode == 2 and "--models-dir" in nowhere.stderr and nowhere.stderr.count("\n") == 1
    again = run_cli(work, "regenerate", "a.png", "--models-dir", ".", "-o", "r.png")  # found by its hash
    assert_ok(again)
    assert (work / "r.png").read_bytes() == (work / "a.png").read_bytes()
    given = run_cli(work, "regenerate", "a.png", "--checkpoint", "tiny.safetensors", "-o", "r2.png")
    assert_ok(given)
    assert (work / "r2.png").read_bytes() == (work / "a.png").read_bytes()
    other = run_cli(work, "regenerate", "a.png", "--checkpoint", "inpainting.safetensors", "-o", "r3.png")
    assert other.returncode == 2 and "model hash" in other.stderr


def test_regenerate_under_another_thread_count(work, tmp_path):
    """The CPU's float sums depend on how torch splits the work between threads: the PNG records the thread count
    and regenerate computes with it, whatever the machine's default (here OMP_NUM_THREADS=2 against a 1-thread
    original: different bytes without the recorded count)."""
    args = ["generate", "a red cube", "--checkpoint", "tiny.safetensors", *SMALL, "--seed", "3", "-o", "t1.png"]
    assert_ok(run_cli(work, *args))
    assert "Threads: 1" in read_png_parameters(work / "t1.png")
    two = {**ENV, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "minisd", "regenerate", "t1.png", "--models-dir", ".", "-o", "t2.png"],
        cwd=work, env=two, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_ok(run)
    assert (work / "t2.png").read_bytes() == (work / "t1.png").read_bytes()


def test_regenerate_a1111_texts(work, tmp_path):
    """A PNG A1111 wrote (its parameters text, found by the model's hash in --models-dir) runs with the sampler and
    schedule it names; what minisd cannot honour is refused in one line naming the field."""
    from minisd.hashes import file_hash, legacy_file_hash
    from minisd.images import save_png

    model_hash = file_hash(work / "tiny.safetensors")
    base = "a cat\nNegative prompt: dog\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 9, "
    base += f"Size: 64x64, Model hash: {model_hash}, Model: sd15, Version: v1.10.1"
    pixels = Image.new("RGB", (64, 64))
    for name, text in (
        ("ok", base),
        ("hires", base + ", Denoising strength: 0.7, Hires upscale: 2"),
        ("unipc", base.replace("DPM++ 2M", "UniPC")),
        ("ays", base.replace("Karras", "Align Your Steps")),
    ):
        save_png(pixels, tmp_path / f"{name}.png", text)
    old_hash = legacy_file_hash(work / "tiny.safetensors")  # A1111's 8 digits (before 2022-12)
    save_png(pixels, tmp_path / "old.png", base.replace(model_hash, old_hash).replace(", Schedule type: Karras", ""))
    for name in ("ok", "old"):
        ok = run_cli(work, "regenerate", tmp_path / f"{name}.png", "--models-dir", work, "-o", tmp_path / "out.png",
                     "--overwrite")  # fmt: skip
        assert_ok(ok)
        params = GenerationParameters.from_text(read_png_parameters(tmp_path / "out.png"))
        schedule = "Karras" if name == "ok" else "Uniform"  # a 1.5-era "DPM++ 2M" ran Uniform
        assert (params.sampler, params.schedule_type, params.seed) == ("DPM++ 2M", schedule, 9)
        assert (params.model_name, params.model_hash) == ("tiny", model_hash)  # the 10 digits, found by the 8
        assert params.threads == 1  # A1111 records none: the new PNG says what it was made with
    for name, fragment in (
        ("hires", "hires fix"),
        ("unipc", "Sampler: 'UniPC' is an A1111 sampler"),
        ("ays", "Schedule type: 'Align Your Steps'"),
    ):
        result = run_cli(work, "regenerate", tmp_path / f"{name}.png", "--models-dir", work)
        assert result.returncode == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_grid_and_more_options(work):
    """--grid, --schedule-type, --timestep-spacing, --guidance-rescale, --vae-tiling: on the command line too."""
    result = run_cli(
        work, "generate", "a cat", "--checkpoint", "tiny.safetensors", *SMALL, "--seed", "2", "--num-images", "2",
        "--grid", "--sampler", "Euler", "--schedule-type", "SGM Uniform", "--guidance-rescale", "0.5",
        "--vae-tiling", "-o", "g.png",
    )  # fmt: skip
    assert_ok(result)
    assert "g-1-grid.png  grid of 2 images" in result.stdout
    with Image.open(work / "g-1-grid.png") as grid:
        assert grid.size == (128, 64) and "parameters" not in grid.text
    text = read_png_parameters(work / "g-2.png")
    assert "Schedule type: SGM Uniform" in text and "Guidance rescale: 0.5" in text and "VAE tiling: True" in text
    spaced = run_cli(work, "generate", "a cat", "--checkpoint", "tiny.safetensors", *SMALL, "--sampler", "Euler a",
                     "--timestep-spacing", "trailing", "--eta", "0.5", "-o", "s.png")  # fmt: skip
    assert_ok(spaced)
    assert "Timestep spacing: trailing" in read_png_parameters(work / "s.png")


def test_fast_is_recorded_and_regenerated_fast(work):
    args = ["generate", "a cat", "--checkpoint", "tiny.safetensors", *SMALL, "--seed", "3", "--fast", "-o", "f.png"]
    assert_ok(run_cli(work, *args))
    assert GenerationParameters.from_text(read_png_parameters(work / "f.png")).fast
    assert_ok(run_cli(work, "regenerate", "f.png", "--models-dir", ".", "-o", "f2.png"))  # fast again: same bytes
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

    # the second image alone, from its seed (a folder is found by its name in --models-dir)
    again = run_cli(work, "regenerate", Path("outputs") / "00002.png", "--models-dir", ".")
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
    assert (params.mode, params.strength, params.eta) == ("img2img", 0.5, 0.5)
    assert "Eta DDIM: 0.5" in read_png_parameters(work / "i.png")
    with Image.open(work / "i.png") as pil:
        assert pil.size == (64, 64)
    no_image = run_cli(work, "regenerate", "i.png", "--models-dir", ".", "-o", "i2.png")
    assert no_image.returncode == 2 and "give it again" in no_image.stderr
    again = run_cli(work, "regenerate", "i.png", "--models-dir", ".", "--image", "in.png", "-o", "i2.png")
    assert_ok(again)
    assert (work / "i2.png").read_bytes() == (work / "i.png").read_bytes()


def test_inpaint(work):
    result = run_cli(
        work, "inpaint", "a hat", "--image", "in.png", "--mask", "mask.png", "--steps", "2",
        "--checkpoint", "inpainting.safetensors", "--seed", "1", "-o", "p.png",
    )  # fmt: skip
    assert_ok(result)
    params = GenerationParameters.from_text(read_png_parameters(work / "p.png"))
    assert params.mode == "inpaint" and params.mask_hash is not None and params.strength == 1.0
    used_generate = run_cli(work, "generate", "a hat", "--checkpoint", "inpainting.safetensors", *SMALL)
    assert used_generate.returncode == 2 and "`minisd inpaint`" in used_generate.stderr
    args = ["--image", "in.png", "--mask", "mask.png", "--steps", "2", "--checkpoint", "inpainting.safetensors"]
    pasted = run_cli(work, "inpaint", "a hat", *args, "--seed", "1", "--paste-unmasked", "-o", "pp.png")
    assert_ok(pasted)
    assert "Paste unmasked: True" in read_png_parameters(work / "pp.png")
    with Image.open(work / "pp.png") as out, Image.open(work / "in.png") as source:
        outside = Image.new("L", (64, 64), 255)
        outside.paste(0, (16, 16, 48, 48))  # the mask's black part, where the image's own pixels go back
        rgb = out.convert("RGB")
        assert rgb.tobytes() != source.tobytes()
        assert Image.composite(source, rgb, outside).tobytes() == rgb.tobytes()  # outside: the source's bytes


def test_no_weights_named_uses_the_nano_model(work, capsys, monkeypatch):
    """README's first command: the shipped nano model, at its own size; without it, a one-line hint."""
    bare = run_cli(work, "generate", "a red circle above a blue square", "--steps", "5", "--seed", "1", "-o", "n.png")
    assert_ok(bare)
    params = GenerationParameters.from_text(read_png_parameters(work / "n.png"))
    assert params.model_name == "nano" and (params.width, params.height) == (64, 64)
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
    assert err.count("\n") == 1 and "nano.safetensors does not know 'cat'; it draws only captions '<a|the>" in err
    assert (work / "cat.png").is_file()
    assert cli.main(["generate", "a cat", *tiny, "--seed", "1", "-o", str(work / "cat-tiny.png")]) == 0
    assert "note:" not in capsys.readouterr().err  # weights not made by minisd.train: no grammar to hold to
    nano = str(default_model())
    for paraphrase in ["(a red circle:1.2) above a [blue] square", "The red circle left of the blue square."]:
        assert prompt_note(nano, paraphrase) is None
    note = prompt_note(nano, "a big red circle next to a blue square")
    assert "does not know 'big', 'next';" in note  # "to" is known: "to the left of"
    assert "knows every word of 'red circle above blue square', but" in prompt_note(
        nano, "red circle above blue square"
    )


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
    sd_png = work / "sd-parameters.png"  # an SD v1 record, for the regenerate cases
    save_png(Image.new("RGB", (64, 64)), sd_png, "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64",
             overwrite=True)  # fmt: skip
    return {
        "steps 0": ["generate", "x", *tiny, "--steps", "0"],
        "steps not a number": ["generate", "x", *tiny, "--steps", "many"],
        "height 65": ["generate", "x", *tiny, "--height", "65"],
        "unknown sampler": ["generate", "x", *tiny, "--sampler", "Euler b"],
        "eta without DDIM": ["generate", "x", *tiny, "--eta", "0.5", "--sampler", "Euler"],
        "unknown schedule type": ["generate", "x", *tiny, "--sampler", "Euler", "--schedule-type", "Beta"],
        "schedule type for DDIM": ["generate", "x", *tiny, "--sampler", "DDIM", "--schedule-type", "Karras"],
        "spacing with SGM": ["generate", "x", *tiny, "--sampler", "Euler SGM Uniform", "--timestep-spacing", "leading"],
        "regenerate: no such models dir": ["regenerate", str(work / "a.png"), "--models-dir", str(work / "nowhere")],
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
        "regenerate an SD PNG with --prior": ["regenerate", str(sd_png), *tiny, "--prior", str(work / "folder")],
        "regenerate an SD PNG naming no model": ["regenerate", str(sd_png)],
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


def test_help_version_and_info_texts(work, capsys):
    """Every option says what it does; --version; `minisd info` and `export --help` promise only what works."""
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps its subcommands there
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"minisd {name} {action.option_strings or action.dest}: no help text"
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("minisd 0.")
    assert "float32 on the CPU" in " ".join(commands["generate"].format_help().split())
    from weights_convert.__main__ import build_parser as weights_parser

    export = weights_parser()._subparsers._group_actions[0].choices["export"].format_help()
    assert "new .safetensors path" in export and "folder or" not in export.split("OUT")[-1]
    pruned = work / "pruned.safetensors"
    save_file(tiny_official_state_dict("pruned"), pruned, metadata={"format": "pt"})
    assert cli.main(["info", str(pruned)]) == 0
    out = capsys.readouterr().out
    assert "use_ema=False" in out and "python -m weights_convert convert --raw-unet" in out


def test_regenerate_finds_a_hub_model_in_the_cache(work, tmp_path, monkeypatch, capsys):
    """A PNG made from a hub id names it (Model: org/name, no hash, no path); regenerate reads it from the Hugging
    Face cache, offline, and makes the same bytes."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4"
    shutil.copytree(work / "folder", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, again = tmp_path / "hub.png", tmp_path / "hub-again.png"
    argv = ["generate", "a cat", "--model", "CompVis/stable-diffusion-v1-4", *SMALL, "--seed", "4", "-o", str(first)]
    assert cli.main(argv) == 0
    text = read_png_parameters(first)
    assert "Model: CompVis/stable-diffusion-v1-4" in text and "Model hash" not in text and str(tmp_path) not in text
    assert cli.main(["regenerate", str(first), "-o", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    capsys.readouterr()
