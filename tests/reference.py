"""Reference-side helpers shared by the tests: things built without minisd's code, so they can referee it."""

import gzip
import json
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from tokenizers import pre_tokenizers
from torch import nn

from minisd.vae import VAEConfig


def write_reference_tokenizer_folder(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a diffusers-style tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) from the packaged .gz with a few lines of its own, so transformers' CLIPTokenizer
    can be built offline from the same vocabulary minisd ships. pad_token: SD v1's "<|endoftext|>", or "!" as the
    SD 2.x folders (stabilityai/stable-diffusion-2-1) name it. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with (resources.files("minisd") / "data" / "bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").splitlines()
    merges = lines[1:48895]  # line 0 is the header; 49408 = 2 * 256 + 48894 merges + 2 special tokens
    # The 256 byte stand-ins in id order: visible bytes keep their code point (< U+0100), the 68 others were moved
    # to U+0100..U+0143, both in byte order, so code-point order is id order.
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # What SD folders (e.g. runwayml/stable-diffusion-v1-5) carry beside the two files.
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace"}
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **special}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder


# SD v1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5): the settings every diffusers twin
# of a minisd sampler is built from. It has no timestep_spacing key, so each scheduler keeps its own default
# ("leading" for DDPM/DDIM/PNDM, "linspace" for the σ samplers); steps_offset only matters for "leading".
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# A1111's sampler name -> the diffusers scheduler class minisd's sampler of that name is step-equal to.
TWIN_CLASSES = {
    "DDPM": DDPMScheduler,
    "DDIM": DDIMScheduler,
    "PLMS": PNDMScheduler,
    "LMS": LMSDiscreteScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "Heun": HeunDiscreteScheduler,
    "DPM++ 2M": DPMSolverMultistepScheduler,
}


def diffusers_twin(name: str, **options):
    """The diffusers scheduler twin of minisd's sampler `name` (every name of minisd.samplers.sampler_names(), and
    A1111's 1.5-era "... Karras" names), built from SD v1.5's config and `options` (timestep_spacing, ...):
    "Karras" sets use_karras_sigmas, "SDE" algorithm_type "sde-dpmsolver++"."""
    if name.endswith(" Karras"):
        options["use_karras_sigmas"] = True
    if " SDE" in name:
        options["algorithm_type"] = "sde-dpmsolver++"
    return TWIN_CLASSES[name.removesuffix(" Karras").removesuffix(" SDE")].from_config(SD15_SCHEDULER_CONFIG, **options)


def reference_vae(config: VAEConfig, seed: int) -> AutoencoderKL:
    """diffusers' AutoencoderKL at `config`, every parameter re-drawn so that every weight matters.

    The default init leaves GroupNorm at weight 1, bias 0; here every conv/linear weight is N(0, 1/fan_in)
    (keeps activations O(1) through the depth), every norm weight 1 + N(0, 0.2²), every bias N(0, 0.1²).
    """
    n = len(config.block_out_channels)
    ref = AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in**0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    return ref
