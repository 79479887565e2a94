"""SD 2.x files from the user's side, on tiny random weights laid out as the official files (tests/fakes.py):
`minisd generate --checkpoint v2-1_768-ema-pruned.safetensors` works unchanged (768 px, v-prediction, a one-line
note saying the name decided); the PNG records what regeneration needs and `minisd regenerate` makes the same bytes;
`python -m weights_convert` converts and exports SD 2 files (folders that diffusers and transformers load, with
scheduler_config's prediction_type; the official layout back bit for bit); folders and hub ids tell the prediction
type, zero-SNR and the tokenizer's padding through their own files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from minisd.api import StableDiffusion
from minisd.errors import MinisdError
from minisd.images import read_png_parameters
from minisd.loading import load_components
from minisd.parameters import GenerationParameters
from tests.fakes import tiny_sd2_official_state_dict
from weights_convert.__main__ import main as weights_convert
from weights_convert.official import ldm_to_minisd

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--sampler", "DDIM"]


def run(cwd: Path, module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """v2-1_768-ema-pruned.safetensors, v2-1_512-ema-pruned.ckpt (the same tiny weights), 512-inpainting-ema.ckpt."""
    work = tmp_path_factory.mktemp("sd2")
    state_dict = tiny_sd2_official_state_dict(seed=4)
    save_file(state_dict, work / "v2-1_768-ema-pruned.safetensors", metadata={"format": "pt"})
    torch.save({"state_dict": state_dict, "global_step": 110000}, work / "v2-1_512-ema-pruned.ckpt")
    torch.save({"state_dict": tiny_sd2_official_state_dict(inpainting=True)}, work / "512-inpainting-ema.ckpt")
    return work


def test_the_768_file_just_works_and_regenerates(work):
    result = run(work, "minisd", "generate", "a cat", "--checkpoint", "v2-1_768-ema-pruned.safetensors", *SMALL,
                 "--seed", "3", "-o", "cat.png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "v_prediction (768 px) from '768' in its name" in notes[0], result.stderr
    params = GenerationParameters.from_text(read_png_parameters(work / "cat.png"))
    assert (params.prediction_type, params.width, params.sampler) == ("v_prediction", 64, "DDIM")
    text = read_png_parameters(work / "cat.png")
    assert "Prediction type: v_prediction" in text and str(work) not in text and "Weights" not in text  # no path
    result = run(work, "minisd", "regenerate", "cat.png", "--models-dir", ".", "-o", "again.png")  # found by hash
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("note:")]  # the PNG said it
    assert Image.open(work / "cat.png").tobytes() == Image.open(work / "again.png").tobytes()


def test_api_defaults_notes_and_prediction_type(work):
    with pytest.warns(UserWarning, match="from '768' in its name"):
        pipe = StableDiffusion.from_pretrained(work / "v2-1_768-ema-pruned.safetensors")
    c = pipe.components
    assert (c.sample_size, c.prediction_type, c.info.variant, c.tokenizer.pad_id) == (768, "v_prediction", "v2", 0)
    assert c.unet.config.use_linear_projection and c.text_encoder.config.hidden_act == "gelu"
    base = load_components(work / "v2-1_512-ema-pruned.ckpt")
    assert (base.sample_size, base.prediction_type) == (512, "epsilon") and "no '768'" in base.note
    chosen = load_components(work / "v2-1_512-ema-pruned.ckpt", prediction_type="v_prediction")
    assert (chosen.prediction_type, chosen.sample_size, chosen.note) == ("v_prediction", 768, None)
    inpainting = load_components(work / "512-inpainting-ema.ckpt")
    assert (inpainting.info.variant, inpainting.prediction_type, inpainting.note) == ("v2-inpainting", "epsilon", None)
    image = StableDiffusion(chosen).__call__(
        "a dog", height=64, width=64, num_inference_steps=2, sampler="DDIM", seed=1
    )
    assert image.parameters[0].prediction_type == "v_prediction"


def test_convert_and_export(work, tmp_path):
    """official -> folder (diffusers loads it; scheduler_config says v; "!" padding) -> minisd loads it again with
    nothing assumed; official -> official bit for bit; a folder exports what can be rebuilt."""
    src = work / "v2-1_768-ema-pruned.safetensors"
    result = run(tmp_path, "weights_convert", "convert", src, tmp_path / "sd2")
    assert result.returncode == 0, result.stderr
    assert "note: v2-1_768-ema-pruned.safetensors is SD 2" in result.stdout
    folder = tmp_path / "sd2"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == 384  # 768 px / the tiny VAE's 2
    expected = ldm_to_minisd(tiny_sd2_official_state_dict(seed=4))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    for model, component in ((unet, "unet"), (text_encoder, "text_encoder")):
        ours = expected[component]
        assert sorted(model.state_dict()) == sorted(ours)
        assert all(torch.equal(model.state_dict()[k], t) for k, t in ours.items()), component
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True).pad_token_id == 0
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    loaded = load_components(folder)
    assert (loaded.prediction_type, loaded.note, loaded.sample_size, loaded.tokenizer.pad_id) == (
        "v_prediction",
        None,
        768,
        0,
    )

    official, again = tiny_sd2_official_state_dict(seed=4), tmp_path / "again.safetensors"
    assert weights_convert(["export", str(src), str(again)]) == 0
    exported = load_file(again)
    assert list(exported) == list(official) or sorted(exported) == sorted(official)
    assert all(torch.equal(exported[n], t) for n, t in official.items())
    from_folder = tmp_path / "from_folder.safetensors"
    assert weights_convert(["export", str(folder), str(from_folder)]) == 0
    rebuilt = load_file(from_folder)
    kept_aside = {n for n in official if n.startswith("model_ema.") or ".resblocks.2." in n}
    kept_aside |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    assert set(official) - set(rebuilt) == kept_aside  # a folder has no LitEma scalars, no unused OpenCLIP tensors
    assert all(torch.equal(rebuilt[n], official[n]) for n in rebuilt)

    minisd_file = tmp_path / "sd2-minisd.safetensors"
    assert weights_convert(["convert", str(work / "v2-1_512-ema-pruned.ckpt"), str(minisd_file)]) == 0  # ε by name
    assert load_components(minisd_file).prediction_type == "epsilon"
    assert weights_convert(["convert", str(minisd_file), str(tmp_path / "x"), "--prediction-type", "v_prediction"]) == 2


def test_folder_scheduler_config_zero_snr_and_bad_values(work, tmp_path):
    folder = tmp_path / "sd2"
    assert weights_convert(["convert", str(work / "v2-1_768-ema-pruned.safetensors"), str(folder)]) == 0
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    loaded = load_components(folder)
    assert loaded.rescale_betas_zero_snr and loaded.prediction_type == "v_prediction"
    pipe = StableDiffusion(loaded)
    out = pipe("a cat", height=64, width=64, num_inference_steps=2, sampler="Euler", seed=0)
    assert out.parameters[0].rescale_betas_zero_snr and "Zero terminal SNR: True" in out.parameters[0].text()
    with pytest.raises(MinisdError, match="the PLMS sampler cannot start from pure noise"):
        pipe("a cat", height=64, width=64, num_inference_steps=2, seed=0)
    config_path.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(MinisdError, match=r"scheduler_config\.json: prediction_type must be one of") as error:
        load_components(folder)
    assert "\n" not in str(error.value)
    config_path.write_text(json.dumps({**config, "prediction_type": "epsilon", "rescale_betas_zero_snr": True}))
    with pytest.raises(MinisdError, match="rescale_betas_zero_snr needs prediction_type v_prediction"):
        load_components(folder)
    config_path.unlink()  # no scheduler: SD 2 cannot say, the note says what was taken
    assert "does not record" in load_components(folder).note
    shutil.rmtree(folder / "tokenizer")  # no tokenizer: the packaged vocabulary with SD 2's padding
    assert load_components(folder).tokenizer.pad_id == 0


def test_cli_prediction_type_flag(work, tmp_path):
    result = run(work, "minisd", "generate", "a cat", "--checkpoint", "v2-1_512-ema-pruned.ckpt", *SMALL,
                 "--prediction-type", "v_prediction", "--seed", "1", "-o", tmp_path / "v.png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stderr
    assert GenerationParameters.from_text(read_png_parameters(tmp_path / "v.png")).prediction_type == "v_prediction"
    result = run(work, "minisd", "generate", "a cat", "--checkpoint", "v2-1_512-ema-pruned.ckpt", "--prediction-type",
                 "v", "-o", tmp_path / "x.png")  # fmt: skip
    assert result.returncode == 2 and "invalid choice: 'v'" in result.stderr and len(result.stderr.splitlines()) == 1


def test_hub_id_reads_the_scheduler_config_from_the_cache(work, tmp_path, monkeypatch):
    """ "stabilityai/stable-diffusion-2-1" through a Hugging Face cache laid out by hand (offline): the snapshot's
    scheduler_config says v, its tokenizer pads with "!", its UNet config says 768 px."""
    from tests.test_loading import write_hub_cache

    folder = tmp_path / "sd2"
    assert weights_convert(["convert", str(work / "v2-1_768-ema-pruned.safetensors"), str(folder)]) == 0
    write_hub_cache(tmp_path / "hf_home" / "hub", "stabilityai/stable-diffusion-2-1", folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    loaded = load_components("stabilityai/stable-diffusion-2-1", local_files_only=True)
    assert (loaded.prediction_type, loaded.note, loaded.tokenizer.pad_id, loaded.sample_size) == (
        "v_prediction", None, 0, 768,
    )  # fmt: skip
    assert loaded.info.variant == "v2" and loaded.unet.config.upcast_attention
