"""Fake SD v1 and SD 2 checkpoints laid out like the official files, with random weights (no real weights in the repo).

- official_keys(variant): the exact (name, shape, dtype) list of an official file, from tests/data/sd15/*.json and
  tests/data/sd2/*.json ("sd2": v2-1_512 / v2-1_768-ema-pruned, "sd2-inpainting": 512-inpainting-ema).
- random_official_state_dict(variant, dtype, seed): full size (~1.07e9 values; 1.9e9 for "pruned"), cheap
  uniform random floats, the real schedule buffers (computed here with numpy the way LDM does), position_ids.
- tiny_official_state_dict(variant, dtype, seed): the same key NAMES at tiny sizes (TINY_* configs below), made
  by exporting random tiny minisd state dicts through minisd_to_ldm: fast files for CLI and loader tests. SD 2's
  (tiny_sd2_official_state_dict) get a random unused last OpenCLIP block, text_projection and logit_scale too.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from weights_convert.keymap_ldm import SCHEDULE_BUFFERS, ema_name
from weights_convert.keymap_openclip import OPENCLIP_PREFIX
from weights_convert.official import minisd_to_ldm

DATA = Path(__file__).parent / "data"
MANIFESTS = {
    "emaonly": "sd15/v1-5-pruned-emaonly.json",
    "pruned": "sd15/v1-5-pruned.json",
    "inpainting": "sd15/v1-5-inpainting.json",
    "sd2": "sd2/v2-1-ema-pruned.json",
    "sd2-inpainting": "sd2/512-inpainting-ema.json",
}
VARIANTS = ("emaonly", "pruned", "inpainting")  # SD v1's
SD2_VARIANTS = ("sd2", "sd2-inpainting")
POOL_SIZE = 2**26  # > the largest SD v1 tensor (the 49408 × 768 token embedding, 37.9M values)

# Tiny sizes: SD v1's structure with small numbers. Groups (32) and head counts (8 UNet, 12 CLIP) are SD v1's,
# so a config.json written for these sizes needs only what the shapes say.
TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48)
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
TINY_TEXT_ENCODER = TextEncoderConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=12)
# SD 2 with small numbers: 64-wide heads in both (what configs_from_shapes assumes for SD 2), linear projections,
# GELU; 2 OpenCLIP blocks loaded, a third one (the "24th") kept aside in the official files.
TINY_SD2_UNET = UNetConfig(
    block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(1, 2),
    use_linear_projection=True, upcast_attention=True,
)  # fmt: skip
TINY_SD2_TEXT_ENCODER = TextEncoderConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu"
)


def official_keys(variant: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of the official file, in file order."""
    manifest = json.loads((DATA / MANIFESTS[variant]).read_text())
    return [(name, tuple(shape), getattr(torch, dtype)) for name, shape, dtype in manifest["keys"]]


def ldm_schedule_buffers() -> dict[str, np.ndarray]:
    """The 12 buffers exactly as CompVis `LatentDiffusion.register_schedule` computes them: numpy float64
    (`make_beta_schedule("linear")` is a torch float64 linspace), v_posterior = 0, stored as float32."""
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - 0.0) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) + 0.0 * betas
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {name: values[name].astype(np.float32) for name in SCHEDULE_BUFFERS}


def _random(shape, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    return torch.empty(shape, dtype=dtype).uniform_(-0.1, 0.1, generator=generator)


def random_official_state_dict(variant: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Tensor]:
    """A full-size official-layout state dict with random weights; floats in `dtype`, integers as in the file."""
    generator = torch.Generator().manual_seed(seed)
    # Cheap randomness: one pool of random values; each tensor copies a window at a random offset, so tensors
    # of the same shape still differ (a swapped pair of keys is caught) at memcpy speed instead of RNG speed.
    pool = _random(POOL_SIZE, dtype, generator)
    schedule = ldm_schedule_buffers()
    state_dict = {}
    for name, shape, file_dtype in official_keys(variant):
        if name in schedule:
            state_dict[name] = torch.from_numpy(schedule[name]).to(dtype)
        elif name.endswith("position_ids"):
            state_dict[name] = torch.arange(77, dtype=file_dtype)[None]
        elif name == "model_ema.decay":
            state_dict[name] = torch.tensor(0.9999, dtype=dtype)
        elif name == "model_ema.num_updates":
            state_dict[name] = torch.tensor(840000, dtype=file_dtype)
        else:
            numel = int(np.prod(shape))
            offset = int(torch.randint(0, POOL_SIZE - numel + 1, (1,), generator=generator))
            state_dict[name] = pool[offset : offset + numel].reshape(shape).clone()
    return state_dict


def tiny_components(in_channels: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0, sd2: bool = False):
    """Random minisd state dicts {"unet", "vae", "text_encoder"} at the TINY_* sizes (TINY_SD2_* with sd2)."""
    generator = torch.Generator().manual_seed(seed)
    unet_config = dataclasses.replace(TINY_SD2_UNET if sd2 else TINY_UNET, in_channels=in_channels)
    text_config = TINY_SD2_TEXT_ENCODER if sd2 else TINY_TEXT_ENCODER
    with torch.device("meta"):
        models = {"unet": UNet(unet_config), "vae": VAE(TINY_VAE), "text_encoder": TextEncoder(text_config)}
    return {
        component: {name: _random(t.shape, dtype, generator) for name, t in model.state_dict().items()}
        for component, model in models.items()
    }


def tiny_official_state_dict(variant: str = "emaonly", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Official key names at tiny sizes: "emaonly" (with the model_ema scalars), "pruned" (plus a distinct
    random EMA UNet under model_ema.*) or "inpainting" (9-channel UNet input)."""
    components = tiny_components(9 if variant == "inpainting" else 4, dtype, seed)
    scalars = {
        "model_ema.decay": torch.tensor(0.9999, dtype=dtype),
        "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
    }
    state_dict = minisd_to_ldm(components, kept=scalars)
    if variant == "pruned":
        generator = torch.Generator().manual_seed(seed + 1)
        unet_keys = [name for name in state_dict if name.startswith("model.diffusion_model.")]
        state_dict.update({ema_name(k): _random(state_dict[k].shape, dtype, generator) for k in unet_keys})
    return state_dict


def tiny_sd2_official_state_dict(inpainting: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD 2's official key names at the TINY_SD2_* sizes: a tiny minisd SD 2 exported through minisd_to_ldm, with what
    an official file keeps beside it (LitEma's scalars, a random last OpenCLIP block, text_projection, logit_scale)."""
    components = tiny_components(9 if inpainting else 4, dtype, seed, sd2=True)
    generator = torch.Generator().manual_seed(seed + 2)
    d, n = TINY_SD2_TEXT_ENCODER.hidden_size, TINY_SD2_TEXT_ENCODER.num_hidden_layers
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{n}."
    mlp = TINY_SD2_TEXT_ENCODER.intermediate_size
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,)}
    shapes |= {"attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,)}
    shapes |= {
        "mlp.c_fc.weight": (mlp, d),
        "mlp.c_fc.bias": (mlp,),
        "mlp.c_proj.weight": (d, mlp),
        "mlp.c_proj.bias": (d,),
    }
    kept = {
        OPENCLIP_PREFIX + "text_projection": _random((d, d), dtype, generator),
        OPENCLIP_PREFIX + "logit_scale": torch.tensor(4.6052, dtype=dtype),
        **{block + name: _random(shape, dtype, generator) for name, shape in shapes.items()},
        "model_ema.decay": torch.tensor(0.9999, dtype=dtype),
        "model_ema.num_updates": torch.tensor(220000, dtype=torch.int32),
    }
    return minisd_to_ldm(components, variant="v2-inpainting" if inpainting else "v2", kept=kept)


# ---------------------------------------------------------------------------------------------------------------
# LoRA files for the networks at hand (random factors; the reference loaders read the names)

LORA_TARGETS = ("attn1.to_", "attn2.to_", "proj_in", "proj_out", "ff.net", "conv1", "conv2", "time_emb_proj")


def lora_targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, module path, module) of what a typical LoRA adapts: the UNet's attention, projections, feed-forward
    and (LoCon) ResNet convolutions and time projections; every Linear of the text encoder."""
    targets = [
        ("unet", name, m)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(t in name for t in LORA_TARGETS)
    ]
    if text_encoder is not None:
        targets += [("text_encoder", n, m) for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    return targets


def kohya_lora(unet, text_encoder, seed: int, rank: int = 4, ldm_unet=None, alphas: str = "trainer") -> dict:
    """A kohya/A1111 LoRA (lora_unet_… / lora_te_text_model_…, lora_down/lora_up/alpha) with random factors;
    3×3 convolutions get 3×3 down factors (LoCon). ldm_unet: {minisd name: LDM name} to write the UNet's keys in the
    official file's names instead (lora_unet_input_blocks_1_1_proj_in).

    alphas: "trainer" as sd-scripts / LyCORIS write them, one network_alpha (rank / 2) for the linear layers and one
    conv_alpha (1) for the 3×3 convolutions; "per-layer" a different alpha from layer to layer; "folded" the
    per-layer alphas multiplied into B and alpha = rank (the same ΔW = (α / r) · B A, written with α / r = 1)."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {}
    for i, (component, name, module) in enumerate(lora_targets(unet, text_encoder)):
        if component == "unet":
            key = "lora_unet_" + (ldm_unet[name] if ldm_unet else name).replace(".", "_")
        else:
            key = "lora_te_text_model_" + name.replace(".", "_")
        out_features, in_features, *kernel = module.weight.shape
        down = torch.randn(rank, in_features, *kernel, generator=g) / in_features**0.5
        up = torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=g) * 0.3
        alpha = float(1 + i % rank) if alphas != "trainer" else (1.0 if kernel[:1] == [3] else rank / 2)
        if alphas == "folded":
            up, alpha = up * alpha / rank, float(rank)
        state_dict |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
    return state_dict
