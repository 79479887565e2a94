"""What users bring, through the command line and the Python API, on the shipped nano model: embeddings (a file, and
A1111's folder with names typed in either prompt), LoRAs (--lora FILE:WEIGHT, and <lora:name:w> with a folder) and a
separate VAE; the PNG records them as A1111 does (TI hashes, Lora hashes, VAE, VAE hash) and `regenerate` makes the
same bytes again from the record and the folder its files are in (found by hash: no path is recorded). Bad
input: one line, exit status 2.
"""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import minisd
from minisd import cli
from minisd.api import NANO_MODEL
from minisd.hashes import lora_hash
from minisd.images import read_png_parameters
from minisd.loading import load_components
from minisd.parameters import GenerationParameters
from tests.fakes import kohya_lora

SMALL = ["--steps", "3", "--seed", "11"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """LoRAs, embeddings (64 wide: the nano text encoder's) and a VAE for the nano model, in A1111's folders."""
    work = tmp_path_factory.mktemp("additions")
    nano = load_components(NANO_MODEL, dtype=torch.float32)
    (work / "Lora").mkdir()
    save_file(kohya_lora(nano.unet, nano.text_encoder, seed=1, rank=2), work / "Lora" / "ink.safetensors")
    save_file(kohya_lora(nano.unet, None, seed=2, rank=4), work / "style.safetensors")
    (work / "embeddings").mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 64, generator=g) * 0.3}, work / "embeddings" / "shiny.safetensors")
    torch.save({"<cat-toy>": torch.randn(64, generator=g) * 0.3}, work / "learned_embeds.bin")
    vae = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in nano.vae.state_dict().items()}
    save_file(vae, work / "nano-vae.safetensors")  # minisd's VAE names are diffusers' (a diffusers VAE file)
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, work / "loha.safetensors")
    torch.save({"<wide>": torch.zeros(1024)}, work / "sd2.pt")
    return work


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha(path, digits):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:digits]


def test_everything_recorded_and_regenerated_from_the_png(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    prompt = "a red <cat-toy> above a blue square, shiny <lora:ink:0.7>"
    args = ["generate", prompt, "--negative-prompt", "Shiny, a green circle", *SMALL, "-o", "a.png"]
    args += ["--embedding", "learned_embeds.bin", "--embeddings", "embeddings", "--lora-dir", "Lora"]
    args += ["--lora", "style.safetensors:-0.5", "--vae", "nano-vae.safetensors"]
    assert cli.main(args) == 0, capsys.readouterr().err
    text = read_png_parameters(work / "a.png")
    params = GenerationParameters.from_text(text)
    embeddings = work / "embeddings" / "shiny.safetensors"
    assert params.ti_hashes == {"<cat-toy>": sha(work / "learned_embeds.bin", 12), "shiny": sha(embeddings, 12)}
    assert f'TI hashes: "<cat-toy>: {sha(work / "learned_embeds.bin", 12)}, shiny: {sha(embeddings, 12)}"' in text
    ink, style = work / "Lora" / "ink.safetensors", work / "style.safetensors"
    assert params.lora_hashes == {"style": lora_hash(style), "ink": lora_hash(ink)}
    assert params.lora_weights == {"style": {"weight": -0.5, "fused": False}}  # ink's weight is in the prompt
    assert str(work) not in text and "safetensors" not in text.replace("VAE: nano-vae.safetensors", "")  # no paths
    assert (params.vae, params.vae_hash) == ("nano-vae.safetensors", sha(work / "nano-vae.safetensors", 10))
    assert "VAE: nano-vae.safetensors, VAE hash: " in text and params.prompt == prompt

    # the same bytes again, from the PNG and the folder its files are in (found by hash), in another directory
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    assert cli.main(["regenerate", str(work / "a.png"), "-o", "x.png"]) == 2  # no folder to find them in
    assert "--models-dir" in capsys.readouterr().err
    assert cli.main(["regenerate", str(work / "a.png"), "-o", "b.png", "--models-dir", str(work)]) == 0
    assert (work / "elsewhere" / "b.png").read_bytes() == (work / "a.png").read_bytes()

    # each addition changes the picture (the record is not decoration)
    assert cli.main(["generate", "a red <cat-toy> above a blue square, shiny", *SMALL, "-o", "c.png",
                     "--embedding", str(work / "learned_embeds.bin")]) == 0  # fmt: skip
    assert (work / "elsewhere" / "c.png").read_bytes() != (work / "a.png").read_bytes()
    ink.write_bytes(ink.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one weight changed: regenerate refuses
    assert cli.main(["regenerate", str(work / "a.png"), "-o", "d.png", "--models-dir", str(work)]) == 2
    assert "the LoRA 'ink' the PNG names (hash" in capsys.readouterr().err


def test_api_lora_fused_and_unloaded_bit_for_bit(work):
    pipe = minisd.StableDiffusion.from_pretrained(NANO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    kwargs = dict(num_inference_steps=3, seed=3)
    plain = pipe("a red circle", **kwargs).images[0]
    pipe.load_lora_weights(work / "Lora" / "ink.safetensors", weight=0.8)
    on_the_fly = pipe("a red circle", **kwargs)
    pipe.fuse_lora()
    fused = pipe("a red circle", **kwargs)
    assert on_the_fly.images[0].tobytes() != plain.tobytes()
    diff = (torch.tensor(list(on_the_fly.images[0].tobytes())) - torch.tensor(list(fused.images[0].tobytes()))).abs()
    assert diff.max() <= 1, "fused = on the fly up to float rounding (one 8-bit level at most)"
    assert fused.parameters[0].lora_weights["ink"] == {"weight": 0.8, "fused": True}
    pipe.unload_lora_weights()
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before), "every weight back, bit for bit"
    assert pipe("a red circle", **kwargs).images[0].tobytes() == plain.tobytes()


def test_info_describes_what_users_bring(work, capsys):
    for name, fragment in [
        ("Lora/ink.safetensors", "LoRA adapter"),
        ("embeddings/shiny.safetensors", "vectors:    2 × 64 (minisd's nano model)"),
        ("learned_embeds.bin", "name:       <cat-toy> (diffusers format)"),
    ]:
        assert cli.main(["info", str(work / name)]) == 0
        assert fragment in capsys.readouterr().out


def bad_cases(work) -> dict[str, tuple[list[str], str]]:
    return {
        "a LoRA as the model": (["--checkpoint", str(work / "style.safetensors")], "--lora FILE"),
        "an embedding as the model": (["--checkpoint", str(work / "learned_embeds.bin")], "--embedding FILE"),
        "a LoHa as a LoRA": (["--lora", str(work / "loha.safetensors")], "LoHa"),
        "a missing LoRA": (["--lora", str(work / "nope.safetensors:0.5")], "no such file"),
        "fast with a LoRA": (["--lora", str(work / "style.safetensors"), "--fast"], "--fast"),
        "an SD 2 embedding": (["--embedding", str(work / "sd2.pt")], "1024 wide"),
        "a LoRA as the VAE": (["--vae", str(work / "style.safetensors")], "no VAE keys"),
        "a tag with no folder": (["a red circle <lora:ink:0.5>"], "no LoRA file"),
        "a tag in the negative prompt": (
            ["--negative-prompt", "<lora:ink>", "--lora-dir", str(work / "Lora")],
            "negative",
        ),
        "a bad tag": (["a red circle <lora:ink:a:b:c>", "--lora-dir", str(work / "Lora")], "LoRA tags read"),
    }


def test_bad_input_is_one_line_exit_2(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    for name, (extra, fragment) in bad_cases(work).items():
        prompt = [] if extra and not extra[0].startswith("-") else ["a red circle"]
        code = cli.main(["generate", *prompt, *extra, *SMALL, "-o", str(work / "bad.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, (name, err)
        assert not (work / "bad.png").exists(), name
