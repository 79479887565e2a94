"""`python -m weights_convert` on tiny fake files (official key names, small shapes), through a subprocess.

The diffusers-style folder that `convert` writes must load in diffusers' and transformers' own from_pretrained
(offline, local folder) with exactly the tensors the key map gives.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from minisd.tokenizer import Tokenizer
from tests.fakes import tiny_official_state_dict
from weights_convert.__main__ import main
from weights_convert.keymap_ldm import ema_name
from weights_convert.official import ldm_to_minisd

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weights_convert", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny official-layout files: emaonly .safetensors, pruned .ckpt (Lightning dict), fp16 inpainting."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {name: folder / name for name in ("emaonly.safetensors", "pruned.ckpt", "inpainting.safetensors")}
    save_file(tiny_official_state_dict("emaonly"), paths["emaonly.safetensors"], metadata={"format": "pt"})
    torch.save({"state_dict": tiny_official_state_dict("pruned"), "global_step": 840000}, paths["pruned.ckpt"])
    inpainting = tiny_official_state_dict("inpainting", torch.float16)
    save_file(inpainting, paths["inpainting.safetensors"], metadata={"format": "pt"})
    return paths


def assert_same(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref), sorted(set(ours) ^ set(ref))[:5]
    for name in ref:
        assert ours[name].dtype == ref[name].dtype, name
        assert torch.equal(ours[name], ref[name]), name


def test_info(files):
    result = run_cli("info", files["pruned.ckpt"])
    assert result.returncode == 0, result.stderr
    assert "layout:     ldm" in result.stdout
    assert "EMA and raw UNet" in result.stdout
    assert "torch pickle" in result.stdout
    components = ldm_to_minisd(tiny_official_state_dict("pruned"))
    for component, state_dict in components.items():
        count = sum(t.numel() for t in state_dict.values())
        assert f"{component:<14}{count:>15,}" in result.stdout
    result = run_cli("info", files["inpainting.safetensors"])
    assert result.returncode == 0, result.stderr
    assert "variant:    v1-inpainting" in result.stdout
    assert "unet float16" in result.stdout


def test_convert_to_folder_loads_in_diffusers_and_transformers(files, tmp_path):
    out = tmp_path / "sd"
    result = run_cli("convert", files["pruned.ckpt"], out)
    assert result.returncode == 0, result.stderr
    expected = ldm_to_minisd(tiny_official_state_dict("pruned"))  # the EMA UNet by default
    for model_class, component in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        model = model_class.from_pretrained(out / component, local_files_only=True)
        assert_same(model.state_dict(), expected[component])
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder", local_files_only=True)
    assert_same(text_encoder.state_dict(), expected["text_encoder"])

    prompt = "a photograph of an astronaut riding a horse"
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, Tokenizer.from_default()(prompt))
    assert json.loads((out / "unet" / "config.json").read_text())["layers_per_block"] == 1
    pipeline = DiffusionPipeline.from_pretrained(out, local_files_only=True)  # model_index.json + scheduler/
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    assert_same(pipeline.unet.state_dict(), expected["unet"])


def test_convert_raw_unet_and_dtype_in_process(files, tmp_path):
    out = tmp_path / "raw.safetensors"
    assert main(["convert", str(files["pruned.ckpt"]), str(out), "--raw-unet", "--dtype", "float16"]) == 0
    state_dict = tiny_official_state_dict("pruned")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    minisd_file = load_file(out)
    assert torch.equal(minisd_file["unet.conv_in.weight"], state_dict[key].half())
    assert not torch.equal(state_dict[key], state_dict[ema_name(key)])


def test_minisd_file_and_export_round_trip(files, tmp_path):
    """official -> minisd file -> official, and official -> folder -> official: the same tensors."""
    official = tiny_official_state_dict("emaonly")
    minisd_file, exported = tmp_path / "minisd.safetensors", tmp_path / "official.safetensors"
    assert run_cli("convert", files["emaonly.safetensors"], minisd_file).returncode == 0
    with safe_open(minisd_file, framework="pt") as f:
        assert f.metadata()["minisd.layout"] == "minisd"
        assert {name.split(".")[0] for name in f.keys()} == {"unet", "vae", "text_encoder"}
    result = run_cli("export", minisd_file, exported)
    assert result.returncode == 0, result.stderr
    # A minisd file does not carry LitEma's training scalars; everything else comes back bit for bit.
    assert_same(load_file(exported), {n: t for n, t in official.items() if not n.startswith("model_ema.")})

    # Straight from an official file (the scalars are carried), and from a diffusers folder.
    again = tmp_path / "again.safetensors"
    assert main(["export", str(files["emaonly.safetensors"]), str(again)]) == 0
    assert_same(load_file(again), official)
    folder, from_folder = tmp_path / "folder", tmp_path / "from_folder.safetensors"
    assert main(["convert", str(files["inpainting.safetensors"]), str(folder)]) == 0
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert main(["export", str(folder), str(from_folder)]) == 0
    inpainting = tiny_official_state_dict("inpainting", torch.float16)
    assert_same(load_file(from_folder), {n: t for n, t in inpainting.items() if not n.startswith("model_ema.")})


def test_never_overwrites(files, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("export", files["emaonly.safetensors"], out)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["convert", str(files["emaonly.safetensors"]), str(folder)]) == 2
    assert list(folder.iterdir()) == []
    assert main(["export", str(files["emaonly.safetensors"]), str(out), "--overwrite"]) == 0
    assert "model_ema.decay" in load_file(out)


def _bad_files(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, state_dict in {
        "random.safetensors": {"layer.0.weight": torch.zeros(3)},
        "lora.safetensors": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
        "unet_only.safetensors": {"model.diffusion_model.out.2.bias": torch.zeros(4)},
    }.items():
        save_file(state_dict, folder / name)
        paths[name] = folder / name
    paths["empty.ckpt"] = folder / "empty.ckpt"
    paths["empty.ckpt"].write_bytes(b"")
    return paths


BAD_ARGUMENTS = [
    ((), "the following arguments are required"),
    (("translate", "a", "b"), "invalid choice"),
    (("info", "{tmp}/missing.safetensors"), "no such file"),
    (("info", "{tmp}/random.safetensors"), "no Stable Diffusion keys"),
    (("convert", "{tmp}/lora.safetensors", "{tmp}/out"), "LoRA"),
    (("export", "{tmp}/unet_only.safetensors", "{tmp}/out.safetensors"), "no the VAE"),
    (("info", "{tmp}/empty.ckpt"), "empty"),
    (("export", "{emaonly}", "{tmp}/out.ckpt"), "must be a .safetensors file"),
    (("convert", "{emaonly}"), "required: OUT"),
    (("export", "{emaonly}", "{emaonly}", "--overwrite"), "IN and OUT are the same path"),
    (("export", "{emaonly}", "{tmp}/out.safetensors", "--dtype", "int8"), "invalid choice"),
]


def _main_exit_code(args) -> int:
    try:
        return main(args)
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(files, tmp_path, capsys, args, message):
    """In process (fast): status 2 and one line on stderr naming the problem."""
    _bad_files(tmp_path)
    args = [a.format(tmp=tmp_path, emaonly=files["emaonly.safetensors"]) for a in args]
    assert _main_exit_code(args) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr


@pytest.mark.parametrize("case", [0, 4, 6])
def test_bad_arguments_through_the_command_line(files, tmp_path, case):
    """The same through `python -m weights_convert`: no traceback reaches the terminal."""
    _bad_files(tmp_path)
    args, message = BAD_ARGUMENTS[case]
    result = run_cli(*[a.format(tmp=tmp_path, emaonly=files["emaonly.safetensors"]) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
