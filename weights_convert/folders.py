"""SD v1 weights in from a file or a folder, out to a folder: one reader for the loader and the converter alike.

    read_weights(path)          a single file (official or minisd layout, .safetensors or .ckpt) or a diffusers
                                folder -> Weights: minisd-named state dicts (views of the file), what the source
                                is (detect.CheckpointInfo) and the three configs (configs.py)
    write_folder(state_dicts)   -> a diffusers-style folder: weights, config.json files, tokenizer, scheduler and
                                model_index.json, which diffusers' StableDiffusionPipeline.from_pretrained loads
    describe(path)              what `python -m weights_convert info` and `minisd info` print

A diffusers folder:
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    text_encoder/  config.json + model[.fp16].safetensors (or pytorch_model.bin)
    tokenizer/     vocab.json + merges.txt (optional for loading: SD v1 has one tokenizer, minisd ships it)
    scheduler/     scheduler_config.json (optional: the samplers' defaults, configs.scheduler_settings)
"""

from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file
from torch import Tensor

from minisd.errors import MinisdError
from minisd.tokenizer import MAX_LENGTH, Tokenizer
from weights_convert.configs import (
    COMPONENTS,
    configs_from_metadata,
    configs_from_shapes,
    read_config_file,
    scheduler_settings,
    sd_v1_config,
    write_config_file,
)
from weights_convert.detect import (
    LAYOUT_NAMES,
    ROUTES,
    CheckpointInfo,
    file_kind,
    inspect_checkpoint,
    split_minisd_file,
)
from weights_convert.embeddings import read_embedding
from weights_convert.files import SAFETENSORS_SUFFIXES, read_state_dict
from weights_convert.keymap_diffusers import diffusers_to_minisd, minisd_to_diffusers
from weights_convert.keymap_ldm import EMA_SCALARS, ldm_to_minisd
from weights_convert.vae_files import ldm_vae_to_minisd

# A diffusers folder's weights, best first: "{v}" is "" or "." + variant ("fp16" -> *.fp16.safetensors).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "vae": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "text_encoder": ("model{v}.safetensors", "pytorch_model{v}.bin"),
}
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt")


@dataclass
class Weights:
    """SD v1 weights as read from a file or folder, before any network is built."""

    state_dicts: dict[str, dict[str, Tensor]]  # "unet", "vae", "text_encoder": minisd names, views of the file
    info: CheckpointInfo  # layout, variant, EMA, parameter counts, dtypes
    configs: dict[str, dict]  # config.json dicts per component: the folder's, the file's metadata, or its shapes
    ema_scalars: dict[str, Tensor] = field(default_factory=dict)  # an official file's LitEma decay / num_updates
    metadata: dict[str, str] = field(default_factory=dict)  # a .safetensors file's metadata (read once)
    scheduler: dict[str, str] = field(
        default_factory=dict
    )  # a folder's scheduler settings (configs.scheduler_settings)


def read_weights(path: Path, use_ema: bool = True, variant: str | None = None) -> Weights:
    """A single weights file or a diffusers folder -> Weights (one-line MinisdError for anything not SD v1).

    use_ema: single files holding two UNets (`v1-5-pruned`): take the EMA copy (keymap_ldm.ldm_to_minisd).
    variant: folders only: "fp16" picks `*.fp16.safetensors` weights.
    """
    if path.is_dir():
        return read_folder(path, variant)
    if variant is not None:
        raise MinisdError(f"variant applies to diffusers folders and hub ids, not to a single file; got {variant!r}")
    return read_single_file(path, use_ema)


def read_single_file(path: Path, use_ema: bool = True) -> Weights:
    """One file in the official (CompVis) or minisd layout -> Weights; its configs from minisd's metadata when it
    has them (head counts and groups), else read off the shapes."""
    state_dict = read_state_dict(path)
    metadata = file_metadata(path)
    try:
        info = inspect_checkpoint(state_dict)
        if info.layout == "ldm":
            state_dicts = ldm_to_minisd(state_dict, use_ema=use_ema)
        elif info.layout == "minisd":
            state_dicts = split_minisd_file(state_dict)
        elif info.layout == "diffusers-vae":
            raise MinisdError(f"this is {ROUTES['vae']}; it is not a whole SD v1 model")
        else:
            raise MinisdError(
                f"holds only one part of a diffusers folder ({info.layout}); pass the folder with unet/, vae/, "
                "text_encoder/ instead"
            )
        configs = configs_from_metadata(metadata) or configs_from_shapes(state_dicts)
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None
    scalars = {name: state_dict[name] for name in EMA_SCALARS if name in state_dict}
    return Weights(state_dicts, info, configs, scalars, metadata)


def file_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata ({} for .ckpt files)."""
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def read_folder(folder: Path, variant: str | None = None) -> Weights:
    """A diffusers folder -> Weights: each component's weights renamed to minisd names, its config.json checked."""
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise MinisdError(
            f"{folder}: not a complete diffusers SD v1 folder: no {', '.join(c + '/' for c in missing)} directory "
            f"(found: {_some(found) or 'no directories'})"
        )
    state_dicts, configs = {}, {}
    for component in COMPONENTS:
        config_path = folder / component / "config.json"
        configs[component] = sd_v1_config(component, read_config_file(config_path), config_path)
        weights = _weights_file(folder / component, component, variant)
        state_dicts[component] = diffusers_to_minisd(component, read_state_dict(weights))
    try:
        unet_info = inspect_checkpoint(state_dicts["unet"])  # refuses LoRA / SD 2 / SDXL weights, finds the variant
    except MinisdError as error:
        raise MinisdError(f"{folder / 'unet'}: {error}") from None
    info = CheckpointInfo(
        layout="diffusers",
        variant=unet_info.variant,
        has_ema=False,
        parameter_counts={c: sum(t.numel() for t in sd.values()) for c, sd in state_dicts.items()},
        dtypes={
            c: ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.is_floating_point()}))
            for c, sd in state_dicts.items()
        },
    )
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = scheduler_settings(read_config_file(scheduler_path), scheduler_path) if scheduler_path.is_file() else {}
    return Weights(state_dicts, info, configs, scheduler=scheduler)


def _weights_file(component_dir: Path, component: str, variant: str | None) -> Path:
    suffix = "" if variant is None else f".{variant}"
    candidates = [component_dir / name.format(v=suffix) for name in WEIGHT_FILES[component]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in component_dir.iterdir() if p.is_file())
    raise MinisdError(
        f"{component_dir}: no weights file {' or '.join(c.name for c in candidates)} "
        f"(variant={variant!r}; found: {_some(found) or 'nothing'})"
    )


def _some(names: list[str], most: int = 8) -> str:
    """A few names for a one-line message: 'a, b, c' or 'a, b, … (12 more)'.

    >>> _some(["a", "b", "c"], most=2)
    'a, b, … (1 more)'
    """
    shown = ", ".join(names[:most])
    return shown + (f", … ({len(names) - most} more)" if len(names) > most else "")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def cast_floats(state_dict: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The floating tensors cast to dtype (None: unchanged); integer buffers stay as they are."""
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
    write_config_file(folder / "tokenizer_config.json", config)


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


def write_configs(state_dicts: dict[str, dict[str, Tensor]], out: Path) -> None:
    """Everything of a diffusers-style folder but the weights: unet/, vae/, text_encoder/ config.json,
    tokenizer/, scheduler/ and model_index.json. Only names and shapes of `state_dicts` are read (meta tensors do)."""
    out.mkdir(parents=True, exist_ok=True)
    for component, config in configs_from_shapes(state_dicts).items():
        (out / component).mkdir(exist_ok=True)
        write_config_file(out / component / "config.json", config)
    write_tokenizer(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    write_config_file(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    inpainting = state_dicts["unet"]["conv_in.weight"].shape[1] == 9
    pipeline = "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"
    write_config_file(out / "model_index.json", {**MODEL_INDEX, "_class_name": pipeline})


def write_folder(state_dicts: dict[str, dict[str, Tensor]], out: Path) -> list[str]:
    """A new diffusers-style folder: unet/, vae/, text_encoder/ (weights + config.json), tokenizer/, scheduler/ and
    model_index.json. Returns what was written, for the command's message."""
    out.mkdir(parents=True)
    write_configs(state_dicts, out)
    written = []
    for component, names in WEIGHT_FILES.items():
        name = names[0].format(v="")
        state_dict = minisd_to_diffusers(component, state_dicts[component])
        save_safetensors(state_dict, out / component / name, {"format": "pt"})
        written.append(f"{component}/{name}")
    written.append("tokenizer/vocab.json, tokenizer/merges.txt")
    written.append("scheduler/scheduler_config.json, model_index.json")
    return written


# ---------------------------------------------------------------------------------------------------------------
# Describing


def describe(path: Path) -> str:
    """What a weights file or diffusers folder holds: format, layout, variant, EMA, dtypes, parameter counts."""
    if path.is_dir():
        info, kind = read_folder(path).info, "folder of safetensors files"
    elif not path.exists():
        raise MinisdError(f"{path}: no such file or folder")
    else:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch pickle (read without running code)"
        try:
            info = inspect_checkpoint(read_state_dict(path))
        except MinisdError as error:
            addition = describe_addition(path)
            if addition is None:  # one line that names the file once
                raise MinisdError(str(error) if str(path) in str(error) else f"{path}: {error}") from None
            return "\n".join([f"file:       {path}", f"format:     {kind}", *addition])
    order = ("unet", "unet_ema", "vae", "text_encoder")
    counts = {c: info.parameter_counts[c] for c in order if c in info.parameter_counts}
    dtypes = {c: info.dtypes[c] for c in order if c in info.dtypes}
    lines = [
        f"file:       {path}",
        f"format:     {kind}",
        f"layout:     {info.layout}" + (f" - {LAYOUT_NAMES[info.layout]}" if info.layout in LAYOUT_NAMES else ""),
        f"variant:    {info.variant}",
        "ema:        "
        + (
            "EMA and raw UNet (EMA used by default; the raw one: use_ema=False in Python, or python -m "
            "weights_convert convert --raw-unet)"
            if info.has_ema
            else "no"
        ),
        "dtype:      " + ", ".join(f"{c} {d}" for c, d in dtypes.items()),
        "parameters:",
        *[f"  {c:<14}{n:>15,}" for c, n in counts.items()],
        f"  {'total':<14}{sum(n for c, n in counts.items() if c != 'unet_ema'):>15,}"
        + ("  (without the EMA copy)" if info.has_ema else ""),
    ]
    return "\n".join(lines)


def describe_addition(path: Path) -> list[str] | None:
    """What `info` prints for the files users add to a model (an embedding, a LoRA, a VAE); None for other files."""
    try:
        embedding = read_embedding(path)
        n, d = embedding.vectors.shape
        model = {768: "SD v1", 1024: "SD 2.x", 64: "minisd's nano model"}.get(d)
        if model is None:  # one tensor of no text encoder's width: not an embedding
            raise MinisdError(f"{d} wide")
        return [f"kind:       {ROUTES['embedding']}", f"name:       {embedding.name} ({embedding.format} format)",
                f"vectors:    {n} × {d} ({model})"]  # fmt: skip
    except MinisdError:
        pass
    try:
        state_dict = read_state_dict(path)
    except MinisdError:
        return None
    kind = file_kind(state_dict)
    if kind == "lora":
        downs = {k: t for k, t in state_dict.items() if k.endswith(("lora_down.weight", "lora_A.weight"))}
        text = sum(k.startswith(("lora_te", "text_encoder")) for k in downs)
        alphas = sorted({round(float(t), 4) for k, t in state_dict.items() if k.endswith(".alpha")})
        convs = sum(t.dim() == 4 and t.shape[-1] > 1 for t in downs.values())
        return [f"kind:       {ROUTES['lora']}", f"layers:     {len(downs) - text} UNet, {text} text encoder "
                f"({convs} 3×3 convolutions: LoCon)", f"ranks:      {sorted({t.shape[0] for t in downs.values()})}",
                f"alphas:     {alphas or 'none stored (alpha = rank)'}"]  # fmt: skip
    if kind == "vae":
        vae = ldm_vae_to_minisd(state_dict)
        return [f"kind:       {ROUTES['vae']}", f"parameters: {sum(t.numel() for t in vae.values()):,}"]
    return None
