"""A separate VAE: a VAE-only file in the official layout (.safetensors and .ckpt, with the loss.* and model_ema.*
extras vae-ft-mse-840000-ema-pruned.ckpt carries), one diffusers file, a diffusers AutoencoderKL folder and a hub id
load into the VAE diffusers builds from the same file (its single-file converter, its folder loader); decoding and the
picture of a pipeline given `vae=` match diffusers'.

Tolerance: the same weights in the same layers, only the summation order of a few kernels differs: measured 1.2e-6
(tiny) and 3.1e-6 (full size) of the output's scale; the bar 1e-5 (tests/test_loading.py's single-file check) catches
a misplaced or transposed tensor (order 1).
"""

import os
from dataclasses import asdict

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from minisd.errors import MinisdError
from minisd.loading import load_vae
from minisd.pipelines.txt2img import txt2img
from minisd.vae import VAEConfig
from tests.fakes import random_official_state_dict, tiny_official_state_dict
from tests.parity import assert_parity
from tests.test_pipelines import SIZE, check_pixels, start_latents
from tests.twins import make_twins
from weights_convert.keymap_ldm import VAE_PREFIX

TOL = 1e-5


def reference_vae(config: VAEConfig, checkpoint: dict) -> AutoencoderKL:
    """diffusers' AutoencoderKL with the file's weights through diffusers' own single-file converter."""
    n = len(config.block_out_channels)
    ref = AutoencoderKL(**asdict(config), down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n)  # fmt: skip
    ref.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, ref.config), strict=True)
    return ref.eval()


def vae_only_file(seed: int = 0) -> dict:
    """A VAE-only file as vae-ft-mse-840000-ema-pruned.ckpt is laid out: the first_stage_model.* keys without
    the prefix, plus a training loss's weights and the LitEma scalars (skipped when loading)."""
    state_dict = {
        name.removeprefix(VAE_PREFIX): t
        for name, t in tiny_official_state_dict(seed=seed).items()
        if name.startswith(VAE_PREFIX)
    }
    state_dict["loss.logvar"] = torch.zeros(())
    state_dict["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    return state_dict


def test_every_vae_source_decodes_as_diffusers(tmp_path, monkeypatch):
    config = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)  # tests/fakes.py's TINY_VAE
    checkpoint = vae_only_file()
    ref = reference_vae(config, checkpoint)
    save_file(checkpoint, tmp_path / "vae-ft.safetensors")
    torch.save({"state_dict": checkpoint}, tmp_path / "vae-ft.ckpt")  # (Lightning's wrapper, as the official .ckpt)
    ref.save_pretrained(tmp_path / "folder")  # config.json + diffusion_pytorch_model.safetensors
    hub = tmp_path / "hub" / "models--org--sd-vae-ft-tiny"  # the Hugging Face cache layout, offline
    snapshot = hub / "snapshots" / ("0" * 40)
    ref.save_pretrained(snapshot)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(latents).sample
        for source in ("vae-ft.safetensors", "vae-ft.ckpt", "folder", "folder/diffusion_pytorch_model.safetensors"):
            vae = load_vae(tmp_path / source)
            assert_parity("test_every_vae_source", f"VAE decode from {source}", vae.decode(latents), want, TOL)
        vae = load_vae("org/sd-vae-ft-tiny")
        assert_parity("test_every_vae_source", "VAE decode from a hub id (cache)", vae.decode(latents), want, TOL)


def test_pipeline_with_a_separate_vae_matches_diffusers(tmp_path):
    twins = make_twins(tmp_path / "tokenizer")
    other = make_twins(tmp_path / "tokenizer", seed=7).ref.vae  # another VAE of the same sizes
    other.save_pretrained(tmp_path / "vae")
    twins.ours.vae = load_vae(tmp_path / "vae")
    twins.pipe.vae = other
    kwargs = dict(prompt="a photo of a cat", height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    got = txt2img(twins.ours, **kwargs, latents=start_latents(1, 2), sampler="DDIM")
    want = twins.pipe(**kwargs, latents=start_latents(1, 2)).images
    check_pixels("test_pipeline_with_a_separate_vae", "txt2img with a separate VAE (diffusers folder)", got, want)


def test_full_size_vae_file_matches_diffusers(tmp_path):
    """SD v1's VAE at full size (84 M parameters, random) in a VAE-only .safetensors file, decoded by both."""
    full = random_official_state_dict("emaonly", seed=3)
    checkpoint = {name.removeprefix(VAE_PREFIX): t for name, t in full.items() if name.startswith(VAE_PREFIX)}
    del full
    save_file(checkpoint, tmp_path / "vae-full.safetensors")
    ref = reference_vae(VAEConfig(), checkpoint)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, want = load_vae(tmp_path / "vae-full.safetensors").decode(latents), ref.decode(latents).sample
    assert_parity("test_full_size_vae_file", "full-size VAE decode from a VAE-only file", ours, want, TOL)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: save_file(tiny_official_state_dict(), p / "v.safetensors"), "a whole SD checkpoint"),
        (lambda p: save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, p / "v.safetensors"), "no VAE keys"),
        (
            lambda p: save_file({**vae_only_file(), "encoder.extra.weight": torch.zeros(1)}, p / "v.safetensors"),
            "neither mapped nor ignored",
        ),
        (lambda p: (p / "v.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "truncated or corrupt"),
        (lambda p: os.makedirs(p / "v"), "config.json: missing"),
    ],
    ids=["checkpoint", "lora", "unknown-key", "corrupt", "empty-folder"],
)
def test_bad_vae_sources_are_one_line(tmp_path, make, fragment):
    make(tmp_path)
    with pytest.raises(MinisdError, match=fragment) as error:
        load_vae(next(tmp_path.glob("v*")))
    assert "\n" not in str(error.value)
