"""SD weights (v1 and 2.x) in from a file or a folder, out to a folder: one reader for the loader and the converter.

    read_weights(path)          a single file (official or minisd layout, .safetensors or .ckpt) or a diffusers
                                folder -> Weights: minisd-named state dicts (views of the file), what the source
                                is (detect.CheckpointInfo) and the three configs (configs.py)
    write_folder(state_dicts)   -> a diffusers-style folder: weights, config.json files, tokenizer, scheduler and
                                model_index.json, which diffusers' StableDiffusionPipeline.from_pretrained loads
    describe.describe(path)     what `python -m weights_convert info` and `minisd info` print (describe.py)

A diffusers folder:
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    text_encoder/  config.json + model[.fp16].safetensors (or pytorch_model.bin)
    tokenizer/     vocab.json + merges.txt (optional for loading: SD ships one vocabulary, minisd packages it),
                   special_tokens_map.json naming the padding token ("!" in SD 2.x folders)
    scheduler/     scheduler_config.json (optional): what the model predicts (prediction_type: epsilon or
                   v_prediction), whether its β are rescaled for zero terminal SNR (rescale_betas_zero_snr), and
                   the samplers' defaults (configs.scheduler_settings)
"""

from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file
from torch import Tensor

from minisd.errors import MinisdError
from minisd.samplers.base import check_prediction_type
from minisd.tokenizer import MAX_LENGTH, PAD_TOKENS, Tokenizer
from weights_convert.configs import (
    COMPONENTS,
    configs_from_metadata,
    configs_from_shapes,
    family,
    read_config_file,
    scheduler_settings,
    sd_config,
    write_config_file,
)
from weights_convert.detect import (
    ROUTES,
    CheckpointInfo,
    inspect_checkpoint,
    split_minisd_file,
)
from weights_convert.files import SAFETENSORS_SUFFIXES, read_state_dict
from weights_convert.keymap_diffusers import diffusers_to_minisd, minisd_to_diffusers
from weights_convert.official import kept_tensors, ldm_to_minisd

# A diffusers folder's weights, best first: "{v}" is "" or "." + variant ("fp16" -> *.fp16.safetensors).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "vae": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "text_encoder": ("model{v}.safetensors", "pytorch_model{v}.bin"),
}
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt")
SPECIAL_TOKENS_FILES = ("tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json")  # pad token, in order
SCHEDULER_FILE = "scheduler/scheduler_config.json"
VARIANTS = ("v1", "v1-inpainting", "v2", "v2-inpainting")


@dataclass
class Weights:
    """SD weights as read from a file or folder, before any network is built. `info.prediction_type` says what the
    source records about what the model predicts (None: an SD 2 file that cannot say ε from v)."""

    state_dicts: dict[str, dict[str, Tensor]]  # "unet", "vae", "text_encoder": minisd names, views of the file
    info: CheckpointInfo  # layout, variant, EMA, parameter counts, dtypes, prediction type
    configs: dict[str, dict]  # config.json dicts per component: the folder's, the file's metadata, or its shapes
    kept: dict[str, Tensor] = field(default_factory=dict)  # an official file's tensors minisd does not load
    metadata: dict[str, str] = field(default_factory=dict)  # a .safetensors file's metadata (read once)
    rescale_betas_zero_snr: bool = False  # a folder's scheduler_config: β rescaled for zero terminal SNR
    scheduler: dict[str, str] = field(default_factory=dict)  # a folder's sampler defaults (configs.scheduler_settings)


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
    has them (head counts and groups), else read off the shapes; minisd's files also record the variant and the
    prediction type ("minisd.variant", "minisd.prediction_type")."""
    state_dict = read_state_dict(path)
    metadata = file_metadata(path)
    try:
        info = inspect_checkpoint(state_dict)
        if info.layout == "ldm":
            state_dicts = ldm_to_minisd(state_dict, use_ema=use_ema)
        elif info.layout == "minisd":
            state_dicts = split_minisd_file(state_dict)
            info.variant = metadata_choice(metadata, "minisd.variant", VARIANTS) or info.variant
            info.prediction_type = metadata_choice(metadata, "minisd.prediction_type") or info.prediction_type
        elif info.layout == "diffusers-vae":
            raise MinisdError(f"this is {ROUTES['vae']}; it is not a whole SD model")
        else:
            raise MinisdError(
                f"holds only one part of a diffusers folder ({info.layout}); pass the folder with unet/, vae/, "
                "text_encoder/ instead"
            )
        configs = configs_from_metadata(metadata) or configs_from_shapes(state_dicts, info.variant)
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None
    return Weights(state_dicts, info, configs, kept_tensors(state_dict), metadata)


def metadata_choice(metadata: dict[str, str], key: str, allowed: tuple[str, ...] | None = None) -> str | None:
    """A minisd file's metadata entry checked against its allowed values (a prediction type when allowed is None);
    None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if allowed is None:
        try:
            return check_prediction_type(value)
        except MinisdError as error:
            raise MinisdError(f"its {key} metadata: {error}") from None
    if value not in allowed:
        raise MinisdError(f"its {key} metadata must be one of {', '.join(allowed)}, got {value!r:.40}")
    return value


def file_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata ({} for .ckpt files)."""
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def read_folder(folder: Path, variant: str | None = None) -> Weights:
    """A diffusers folder -> Weights: each component's weights renamed to minisd names, its config.json checked,
    and its scheduler_config's prediction_type and rescale_betas_zero_snr."""
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise MinisdError(
            f"{folder}: not a complete diffusers SD folder: no {', '.join(c + '/' for c in missing)} directory "
            f"(found: {_some(found) or 'no directories'})"
        )
    state_dicts, configs = {}, {}
    for component in COMPONENTS:
        config_path = folder / component / "config.json"
        configs[component] = sd_config(component, read_config_file(config_path), config_path)
        weights = _weights_file(folder / component, component, variant)
        state_dicts[component] = diffusers_to_minisd(component, read_state_dict(weights))
    try:
        unet_info = inspect_checkpoint(state_dicts["unet"])  # refuses LoRA / SDXL weights, finds the inpainting UNet
    except MinisdError as error:
        raise MinisdError(f"{folder / 'unet'}: {error}") from None
    prediction_type, zero_snr, scheduler = read_scheduler_config(folder)
    sd_variant = family(configs) + ("-inpainting" if unet_info.variant.endswith("inpainting") else "")
    info = CheckpointInfo(
        layout="diffusers",
        variant=sd_variant,
        has_ema=False,
        parameter_counts={c: sum(t.numel() for t in sd.values()) for c, sd in state_dicts.items()},
        dtypes={
            c: ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.is_floating_point()}))
            for c, sd in state_dicts.items()
        },
        prediction_type=prediction_type,
    )
    return Weights(state_dicts, info, configs, rescale_betas_zero_snr=zero_snr, scheduler=scheduler)


def prediction_of(info: CheckpointInfo, given: str | None, name: str) -> tuple[str, str | None]:
    """(what the model predicts, a one-line note when it was assumed): the one place this is decided.

    given (the caller's --prediction-type) wins, unless the source records another (a folder's scheduler_config,
    a minisd file's metadata): then a MinisdError. Else what the source records. Else the official releases'
    convention: every SD v1 file and SD 2's inpainting model predict ε; an SD 2 "v2" file cannot say ε from v
    (diffusers guesses from a .ckpt's global_step), so its file `name` decides: "768" in it (v2-1_768-ema-pruned,
    768-v-ema) means v-prediction, else ε, and the note says so.

    >>> prediction_of(CheckpointInfo("ldm", "v2", False), None, "v2-1_768-ema-pruned.safetensors")[0]
    'v_prediction'
    """
    recorded = info.prediction_type
    if given is not None:
        given = check_prediction_type(given)
        if recorded is not None and given != recorded:
            raise MinisdError(f"prediction_type {given} was given, but {name} records {recorded}")
        return given, None
    if recorded is not None:
        return recorded, None
    if info.variant != "v2":
        return "epsilon", None
    v = "768" in Path(name).name
    guess = "v_prediction (768 px) from '768' in its name" if v else "epsilon (512 px): no '768' in its name"
    note = f"{Path(name).name} is SD 2 and does not record whether it predicts ε or v: taking {guess}"
    return ("v_prediction" if v else "epsilon"), note + " (--prediction-type epsilon|v_prediction to choose)"


def read_scheduler_config(folder: Path) -> tuple[str | None, bool, dict[str, str]]:
    """(prediction_type, rescale_betas_zero_snr, sampler defaults) of a folder's scheduler/scheduler_config.json,
    read once: what the model predicts and whether its β are rescaled for zero terminal SNR (checked by
    samplers.base.check_prediction_type), and configs.scheduler_settings. (None, False, {}) without one; a one-line
    MinisdError for values minisd cannot honour."""
    path = folder / SCHEDULER_FILE
    if not path.is_file():
        return None, False, {}
    config = read_config_file(path)
    prediction_type, zero_snr = config.get("prediction_type", "epsilon"), config.get("rescale_betas_zero_snr", False)
    try:
        check_prediction_type(prediction_type, zero_snr)
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None
    return prediction_type, zero_snr, scheduler_settings(config, path)


def pad_token(folder: Path) -> str:
    """The padding token a folder's tokenizer names (special_tokens_map.json, then tokenizer_config.json, as
    transformers reads them): "!" in SD 2.x folders; SD v1's "<|endoftext|>" when neither names one."""
    for name in SPECIAL_TOKENS_FILES:
        path = folder / name
        if path.is_file():
            token = read_config_file(path).get("pad_token")
            token = token.get("content") if isinstance(token, dict) else token  # {"content": "!", ...} or "!"
            if token is not None:
                if not isinstance(token, str):
                    raise MinisdError(f"{path}: pad_token must be a string, got {token!r:.40}")
                return token
    return PAD_TOKENS["sd1"]


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


def write_tokenizer(folder: Path, pad: str = PAD_TOKENS["sd1"]) -> None:
    """tokenizer/vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json) from minisd's packaged
    CLIP vocabulary; pad: the family's padding token (tokenizer.PAD_TOKENS)."""
    folder.mkdir(exist_ok=True)
    Tokenizer.from_default().backend.model.save(str(folder))  # tokenizers' BPE writes vocab.json and merges.txt
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = pad
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, **special}
    write_config_file(folder / "tokenizer_config.json", {**config, "do_lower_case": True, "errors": "replace"})
    write_config_file(folder / "special_tokens_map.json", special)


# So diffusers' StableDiffusionPipeline.from_pretrained(folder) loads the folder too (runwayml/stable-diffusion-v1-5's
# model_index.json without the safety checker, and its PNDM scheduler config: SD's β schedule, v1-inference.yaml and
# v2-inference.yaml alike; write_configs adds what the model predicts).
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


def write_configs(
    state_dicts: dict[str, dict[str, Tensor]],
    out: Path,
    variant: str = "v1",
    prediction_type: str = "epsilon",
    sample_size: int = 512,
) -> None:
    """Everything of a diffusers-style folder but the weights: unet/, vae/, text_encoder/ config.json,
    tokenizer/, scheduler/ (with prediction_type) and model_index.json. Only names and shapes of `state_dicts` are
    read (meta tensors do). variant: "v1…" or "v2…" (detect); sample_size: the model's pixels per side."""
    out.mkdir(parents=True, exist_ok=True)
    for component, config in configs_from_shapes(state_dicts, variant, sample_size).items():
        (out / component).mkdir(exist_ok=True)
        write_config_file(out / component / "config.json", config)
    write_tokenizer(out / "tokenizer", PAD_TOKENS["sd2" if variant.startswith("v2") else "sd1"])
    (out / "scheduler").mkdir(exist_ok=True)
    scheduler = {**SCHEDULER_CONFIG, "prediction_type": check_prediction_type(prediction_type)}
    write_config_file(out / SCHEDULER_FILE, scheduler)
    inpainting = state_dicts["unet"]["conv_in.weight"].shape[1] == 9
    pipeline = "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"
    write_config_file(out / "model_index.json", {**MODEL_INDEX, "_class_name": pipeline})


def write_folder(
    state_dicts: dict[str, dict[str, Tensor]],
    out: Path,
    variant: str = "v1",
    prediction_type: str = "epsilon",
    sample_size: int = 512,
) -> list[str]:
    """A new diffusers-style folder: unet/, vae/, text_encoder/ (weights + config.json), tokenizer/, scheduler/ and
    model_index.json (write_configs' arguments). Returns what was written, for the command's message."""
    out.mkdir(parents=True)
    write_configs(state_dicts, out, variant, prediction_type, sample_size)
    written = []
    for component, names in WEIGHT_FILES.items():
        name = names[0].format(v="")
        state_dict = minisd_to_diffusers(component, state_dicts[component])
        save_safetensors(state_dict, out / component / name, {"format": "pt"})
        written.append(f"{component}/{name}")
    written.append("tokenizer/vocab.json, tokenizer/merges.txt, tokenizer/special_tokens_map.json")
    written.append("scheduler/scheduler_config.json, model_index.json")
    return written
