"""A separate VAE (vae-ft-mse-840000, sd-vae-ft-ema, …): every place one lives -> minisd's VAE names and a config.

    source                                    what is read
    vae-ft-mse-840000-ema-pruned.ckpt or      LDM names: encoder.down.0.block.0.…, decoder.up.3.…, quant_conv.…
    .safetensors (a VAE-only file)            (or under first_stage_model.); loss.* and model_ema.* skipped
    diffusion_pytorch_model.safetensors       diffusers names (encoder.down_blocks.0.resnets.0.…): one file of a
                                              diffusers AutoencoderKL
    a diffusers AutoencoderKL folder          config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    an SD v1 diffusers folder                 its vae/ subfolder
A hub id ("stabilityai/sd-vae-ft-mse") is such a folder in the Hugging Face cache (minisd.loading.load_vae).
Single files carry no config: the sizes are read off the shapes (configs.vae_config), SD v1's choices for the rest.
Anything else (a whole SD checkpoint, a LoRA, an SDXL VAE's config) is refused in one line.
"""

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.configs import read_config_file, sd_config, vae_config
from weights_convert.files import read_state_dict
from weights_convert.keymap_diffusers import diffusers_to_minisd
from weights_convert.keymap_ldm import VAE_CONV_TO_LINEAR, VAE_PREFIX, unknown_keys_error, vae_layout, vae_table

# What a VAE-only file (vae-ft-mse-840000-ema-pruned.ckpt and its kind) holds beside the VAE, and why it is skipped.
IGNORED = {
    "loss.*": "the autoencoder's training loss (LPIPS network and discriminator weights), not part of the VAE",
    "model_ema.decay": "LitEma training state (the EMA rate), not a weight",
    "model_ema.num_updates": "LitEma training state (a step counter), not a weight",
}
FOLDER_WEIGHTS = ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin")


@dataclass
class VAEWeights:
    """A VAE as read: minisd-named tensors (views of the file), its config.json dict, and what the source was."""

    state_dict: dict[str, Tensor]
    config: dict
    layout: str  # "ldm" (VAE-only file), "diffusers" (one file), "folder"


def ldm_vae_to_minisd(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A VAE-only file in the LDM layout -> minisd VAE names (no copy; the mid-attention 1×1 convs viewed as linears,
    as keymap_ldm does for whole files). Keys in IGNORED are skipped; any other unknown key raises."""
    prefix = VAE_PREFIX if any(name.startswith(VAE_PREFIX) for name in state_dict) else ""
    names = [
        n.removeprefix(prefix)
        for n in state_dict
        if not n.startswith("loss.") and n not in IGNORED and n.startswith(prefix)
    ]
    table = vae_table(*vae_layout(names, ldm=True))
    unknown = [prefix + n for n in names if n not in table]
    if unknown:
        raise unknown_keys_error(unknown, "in the VAE file")
    out = {}
    for name in names:
        tensor, ours = state_dict[prefix + name], table[name]
        out[ours] = tensor[:, :, 0, 0] if ours.endswith(VAE_CONV_TO_LINEAR) and tensor.ndim == 4 else tensor
    return out


def read_vae(path: Path, variant: str | None = None) -> VAEWeights:
    """A VAE file or folder (see the table above) -> VAEWeights; a one-line MinisdError for anything else."""
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        config = sd_config("vae", read_config_file(folder / "config.json"), folder / "config.json")
        suffix = "" if variant is None else f".{variant}"
        files = [folder / name.format(v=suffix) for name in FOLDER_WEIGHTS]
        weights = next((f for f in files if f.is_file()), None)
        if weights is None:
            raise MinisdError(f"{folder}: no VAE weights ({' or '.join(f.name for f in files)})")
        return VAEWeights(diffusers_to_minisd("vae", read_state_dict(weights)), config, "folder")
    state_dict = read_state_dict(path)
    names = list(state_dict)
    try:
        if any(n.startswith(("model.diffusion_model.", "cond_stage_model.")) for n in names):
            raise MinisdError("this is a whole SD checkpoint, not a VAE (pass it as the model, or take its VAE apart)")
        if any(n.startswith(("encoder.down.", VAE_PREFIX + "encoder.down.")) for n in names):
            ours, layout = ldm_vae_to_minisd(state_dict), "ldm"
        elif any(n.startswith("encoder.down_blocks.") for n in names):
            ours, layout = diffusers_to_minisd("vae", state_dict), "diffusers"
        else:
            shown = ", ".join(names[:3])
            raise MinisdError(f"no VAE keys (encoder.down.… or encoder.down_blocks.…) found; keys such as {shown}")
        return VAEWeights(ours, vae_config(ours), layout)
    except (MinisdError, KeyError) as error:
        what = f"lacks {error}" if isinstance(error, KeyError) else str(error)
        raise MinisdError(f"{path}: {what}") from None
