"""`python -m weights_convert`: inspect SD v1 weights and convert them between layouts.

    python -m weights_convert info FILE_OR_FOLDER
    python -m weights_convert convert IN OUT_FOLDER        # -> a diffusers-style folder
    python -m weights_convert convert IN OUT.safetensors   # -> minisd's single file (unet.* vae.* text_encoder.*)
    python -m weights_convert export IN OUT.safetensors    # -> the official single-file layout

IN may be an official single file (.safetensors / .ckpt), a minisd single file or a diffusers-style folder.
An existing OUT is never replaced unless --overwrite is given. Errors: one line on stderr, exit status 2.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from minisd.errors import MinisdError
from minisd.tokenizer import MAX_LENGTH, Tokenizer
from weights_convert.detect import (
    MINISD_METADATA,
    CheckpointInfo,
    inspect_checkpoint,
    join_minisd_file,
    split_minisd_file,
)
from weights_convert.files import read_state_dict
from weights_convert.keymap_diffusers import diffusers_to_minisd, minisd_to_diffusers
from weights_convert.keymap_ldm import COMPONENTS, EMA_SCALARS, ldm_to_minisd, minisd_to_ldm

# A diffusers folder: component -> (subfolder, file names tried in order).
FOLDER_FILES = {
    "unet": ("unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "vae": ("vae", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": ("text_encoder", ("model.safetensors", "pytorch_model.bin")),
}
LAYOUT_NAMES = {
    "ldm": "official single file (CompVis/LDM names)",
    "minisd": "minisd single file (unet.* vae.* text_encoder.*)",
    "diffusers": "diffusers-style folder",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (argparse prints the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# Reading any supported input into minisd components.


def read_folder(folder: Path) -> dict[str, dict[str, Tensor]]:
    """A diffusers-style folder's unet/, vae/, text_encoder/ weights, renamed to minisd names."""
    components = {}
    for component, (subfolder, names) in FOLDER_FILES.items():
        path = next((folder / subfolder / n for n in names if (folder / subfolder / n).is_file()), None)
        if path is None:
            raise MinisdError(f"{folder} is not a diffusers-style SD v1 folder: no {subfolder}/{names[0]}")
        components[component] = diffusers_to_minisd(component, read_state_dict(path))
    return components


def read_input(path: Path, use_ema: bool) -> tuple[dict[str, dict[str, Tensor]], str, dict[str, Tensor]]:
    """Any supported input -> (minisd components, layout, the LitEma scalars of an official file if any)."""
    if path.is_dir():
        return read_folder(path), "diffusers", {}
    state_dict = read_state_dict(path)
    info = inspect_checkpoint(state_dict)
    if info.layout == "ldm":
        scalars = {name: state_dict[name] for name in EMA_SCALARS if name in state_dict}
        return ldm_to_minisd(state_dict, use_ema=use_ema), "ldm", scalars
    if info.layout == "minisd":
        return split_minisd_file(state_dict), "minisd", {}
    component = info.layout.removeprefix("diffusers-")
    raise MinisdError(f"{path} holds only a diffusers {component}; pass the whole diffusers folder instead")


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def _cast(state_dict: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return state_dict
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in state_dict.items()}


def save_safetensors(state_dict: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors wants one contiguous storage per tensor; tensors read from a .ckpt are views of one big
    mapped storage, so those are copied first."""
    uses: dict[int, int] = {}
    for t in state_dict.values():
        uses[t.untyped_storage().data_ptr()] = uses.get(t.untyped_storage().data_ptr(), 0) + 1
    ready = {}
    for name, t in state_dict.items():
        shared = uses[t.untyped_storage().data_ptr()] > 1 or t.untyped_storage().nbytes() != t.nbytes
        ready[name] = t.contiguous().clone() if shared or not t.is_contiguous() else t
    save_file(ready, path, metadata=metadata)


def _channels(state_dict: dict[str, Tensor], name: str, dim: int = 0) -> int:
    return state_dict[name].shape[dim]


def unet_config(unet: dict[str, Tensor]) -> dict:
    """diffusers UNet2DConditionModel config.json for these weights: sizes read from shapes, the rest SD v1's."""
    levels = len({name.split(".")[1] for name in unet if name.startswith("down_blocks.")})
    channels = [_channels(unet, f"down_blocks.{i}.resnets.0.conv2.weight") for i in range(levels)]
    attention = [f"down_blocks.{i}.attentions.0.norm.weight" in unet for i in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": 64,  # 512 px / 8
        "in_channels": _channels(unet, "conv_in.weight", 1),
        "out_channels": _channels(unet, "conv_out.weight"),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": sum(
            1 for n in unet if n.startswith("down_blocks.0.resnets.") and n.endswith("conv1.weight")
        ),
        "cross_attention_dim": _channels(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", 1),
        "attention_head_dim": 8,  # SD v1: the number of heads (diffusers' historical name), not their width
        "norm_num_groups": 32,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_eps": 1e-5,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }


def vae_config(vae: dict[str, Tensor]) -> dict:
    """diffusers AutoencoderKL config.json for these weights (SD v1's fixed choices for what shapes do not say)."""
    levels = len({name.split(".")[2] for name in vae if name.startswith("encoder.down_blocks.")})
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": _channels(vae, "encoder.conv_in.weight", 1),
        "out_channels": _channels(vae, "decoder.conv_out.weight"),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [
            _channels(vae, f"encoder.down_blocks.{i}.resnets.0.conv2.weight") for i in range(levels)
        ],
        "layers_per_block": sum(
            1 for n in vae if n.startswith("encoder.down_blocks.0.resnets.") and n.endswith("conv1.weight")
        ),
        "latent_channels": _channels(vae, "post_quant_conv.weight"),
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
        "scaling_factor": 0.18215,  # v1-inference.yaml scale_factor
    }


def text_encoder_config(text_encoder: dict[str, Tensor], dtype: torch.dtype) -> dict:
    """transformers CLIPTextModel config.json (openai/clip-vit-large-patch14's text part, sizes from shapes)."""
    vocab_size, hidden_size = text_encoder["embeddings.token_embedding.weight"].shape
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": _channels(text_encoder, "encoder.layers.0.mlp.fc1.weight"),
        "num_hidden_layers": len({n.split(".")[2] for n in text_encoder if n.startswith("encoder.layers.")}),
        "num_attention_heads": 12,
        "max_position_embeddings": _channels(text_encoder, "embeddings.position_embedding.weight"),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 0,  # the ids the CLIP config carries (not the tokenizer's 49406/49407)
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_tokenizer(folder: Path) -> None:
    """tokenizer/vocab.json + merges.txt (+ tokenizer_config.json) from minisd's packaged CLIP vocabulary."""
    folder.mkdir(exist_ok=True)
    Tokenizer.from_default().backend.model.save(str(folder))  # tokenizers' BPE writes vocab.json and merges.txt
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# So diffusers' StableDiffusionPipeline.from_pretrained(folder) loads the folder too (runwayml/stable-diffusion-v1-5's
# model_index.json without the safety checker, and its PNDM scheduler config: SD v1's β schedule, v1-inference.yaml).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def write_configs(components: dict[str, dict[str, Tensor]], out: Path) -> None:
    """Everything of a diffusers-style folder but the weights: unet/, vae/, text_encoder/ config.json,
    tokenizer/, scheduler/ and model_index.json. Only names and shapes of `components` are read (meta tensors do)."""
    out.mkdir(parents=True, exist_ok=True)
    float_dtype = next(t.dtype for t in components["unet"].values() if t.is_floating_point())
    configs = {
        "unet": unet_config(components["unet"]),
        "vae": vae_config(components["vae"]),
        "text_encoder": text_encoder_config(components["text_encoder"], float_dtype),
    }
    for component, (subfolder, _) in FOLDER_FILES.items():
        (out / subfolder).mkdir(exist_ok=True)
        (out / subfolder / "config.json").write_text(json.dumps(configs[component], indent=2) + "\n")
    write_tokenizer(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    inpainting = components["unet"]["conv_in.weight"].shape[1] == 9
    pipeline = "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"
    model_index = {**MODEL_INDEX, "_class_name": pipeline}
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def write_folder(components: dict[str, dict[str, Tensor]], out: Path) -> list[str]:
    """A diffusers-style folder: unet/, vae/, text_encoder/ (weights + config.json), tokenizer/, scheduler/ and
    model_index.json."""
    out.mkdir(parents=True)
    write_configs(components, out)
    written = []
    for component, (subfolder, names) in FOLDER_FILES.items():
        state_dict = minisd_to_diffusers(component, components[component])
        save_safetensors(state_dict, out / subfolder / names[0], {"format": "pt"})
        written.append(f"{subfolder}/{names[0]}")
    written.append("tokenizer/vocab.json, tokenizer/merges.txt")
    written.append("scheduler/scheduler_config.json, model_index.json")
    return written


def _check_out(src: Path, out: Path, overwrite: bool, want_file: bool) -> None:
    """Refuse a bad OUT before any work is done (an existing OUT stays until the new data is ready)."""
    if want_file and out.suffix != ".safetensors":
        raise MinisdError(f"OUT must be a .safetensors file path, got {str(out)!r}")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise MinisdError(f"IN and OUT are the same path ({out}); write to a new path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MinisdError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise MinisdError(f"the folder {out.parent} for OUT does not exist")


def _remove(out: Path) -> None:
    """Delete an existing OUT (only reached with --overwrite), just before writing the new one."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()


# ---------------------------------------------------------------------------------------------------------------
# The three commands.


def _format_info(path: Path, info: CheckpointInfo, kind: str) -> str:
    order = ("unet", "unet_ema", "vae", "text_encoder")
    counts = {c: info.parameter_counts[c] for c in order if c in info.parameter_counts}
    dtypes = {c: info.dtypes[c] for c in order if c in info.dtypes}
    lines = [
        f"file:       {path}",
        f"format:     {kind}",
        f"layout:     {info.layout}" + (f" - {LAYOUT_NAMES[info.layout]}" if info.layout in LAYOUT_NAMES else ""),
        f"variant:    {info.variant}",
        "ema:        "
        + ("EMA and raw UNet (EMA used by default; --raw-unet for the raw one)" if info.has_ema else "no"),
        "dtype:      " + ", ".join(f"{c} {d}" for c, d in dtypes.items()),
        "parameters:",
        *[f"  {c:<14}{n:>15,}" for c, n in counts.items()],
        f"  {'total':<14}{sum(n for c, n in counts.items() if c != 'unet_ema'):>15,}"
        + ("  (without the EMA copy)" if info.has_ema else ""),
    ]
    return "\n".join(lines)


def command_info(path: Path) -> str:
    if path.is_dir():
        components = read_folder(path)
        infos = [inspect_checkpoint(minisd_to_diffusers(c, components[c])) for c in COMPONENTS]
        info = CheckpointInfo(
            layout="diffusers",
            variant=infos[0].variant,
            has_ema=False,
            parameter_counts={c: i.parameter_counts[c] for c, i in zip(COMPONENTS, infos, strict=True)},
            dtypes={c: i.dtypes.get(c, "") for c, i in zip(COMPONENTS, infos, strict=True)},
        )
        return _format_info(path, info, "folder of safetensors files")
    if not path.exists():
        raise MinisdError(f"{path}: no such file or folder")
    info = inspect_checkpoint(read_state_dict(path))
    kind = "safetensors" if path.suffix == ".safetensors" else "torch pickle (read without running code)"
    return _format_info(path, info, kind)


def command_convert(src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool) -> str:
    to_file = out.suffix == ".safetensors"
    _check_out(src, out, overwrite, want_file=False)
    components, layout, _ = read_input(src, use_ema)
    components = {c: _cast(sd, dtype) for c, sd in components.items()}
    _remove(out)
    if to_file:
        variant = "v1-inpainting" if components["unet"]["conv_in.weight"].shape[1] == 9 else "v1"
        save_safetensors(join_minisd_file(components), out, {**MINISD_METADATA, "minisd.variant": variant})
        return f"wrote {out} (minisd single file, from the {LAYOUT_NAMES[layout]})"
    written = write_folder(components, out)
    return f"wrote {out}/: {', '.join(written)} (from the {LAYOUT_NAMES[layout]})"


def command_export(src: Path, out: Path, use_ema: bool, dtype: torch.dtype | None, overwrite: bool) -> str:
    _check_out(src, out, overwrite, want_file=True)
    components, layout, scalars = read_input(src, use_ema)
    state_dict = _cast(minisd_to_ldm(components, model_ema_scalars=scalars), dtype)
    _remove(out)
    save_safetensors(state_dict, out, {"format": "pt"})
    return f"wrote {out} (official SD v1 layout, {len(state_dict)} tensors, from the {LAYOUT_NAMES[layout]})"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m weights_convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    info = commands.add_parser("info", help="what a weights file or folder holds")
    info.add_argument("path", type=Path, metavar="FILE", help="a weights file or a diffusers-style folder")
    for name, help_text in (
        ("convert", "to a diffusers-style folder, or (OUT ending in .safetensors) minisd's single file"),
        ("export", "to the official single-file layout (.safetensors)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("src", type=Path, metavar="IN", help="official .safetensors/.ckpt, minisd file or folder")
        command.add_argument("out", type=Path, metavar="OUT", help="a new folder or .safetensors path")
        command.add_argument("--raw-unet", action="store_true", help="take the non-EMA UNet of a v1-5-pruned file")
        command.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            message = command_info(args.path)
        else:
            run = command_convert if args.command == "convert" else command_export
            dtype = DTYPES[args.dtype] if args.dtype else None
            message = run(args.src, args.out, not args.raw_unet, dtype, args.overwrite)
    except (MinisdError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
