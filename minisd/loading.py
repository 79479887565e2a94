"""Weights -> ready minisd modules: one entry point, `load_components`, for every place SD v1 weights live.

    source                                        how it is read
    model.safetensors / model.ckpt                one file: the official CompVis layout (model.diffusion_model.*,
                                                  first_stage_model.*, cond_stage_model.*) or minisd's own
                                                  (unet.* / vae.* / text_encoder.*), layout found by detect.py
    a diffusers folder                            unet/ vae/ text_encoder/ (config.json + weights), tokenizer/
    "org/name" (a Hugging Face Hub id)            the same folder, from the Hugging Face cache (downloaded only
                                                  the files needed, unless offline)

Each network is built on the meta device from its config (config.json fields map one to one onto minisd's
dataclass configs; single files carry no config, so the sizes are read off the tensor shapes) and then takes the
file's tensors as its parameters: `load_state_dict(strict=True, assign=True)`. No random initialisation that is
thrown away, no second copy: the parameters are views of the memory-mapped file until a dtype or device is asked
for. Anything that is not SD v1 is refused with a one-line MinisdError saying what was found.
"""

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import safetensors
import torch
from torch import Tensor, nn

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.tokenizer import Tokenizer
from minisd.unet import UNet, UNetConfig
from minisd.vae import LATENT_SCALE, VAE, VAEConfig
from weights_convert.detect import CheckpointInfo, inspect_checkpoint, split_minisd_file
from weights_convert.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_state_dict
from weights_convert.keymap_diffusers import diffusers_to_minisd
from weights_convert.keymap_ldm import ldm_to_minisd

COMPONENTS = ("unet", "vae", "text_encoder")
# A diffusers folder's weights, best first: "{v}" is "" or "." + variant ("fp16" -> *.fp16.safetensors).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "vae": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "text_encoder": ("model{v}.safetensors", "pytorch_model{v}.bin"),
}
TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "org/name"


@dataclass
class Components:
    """The four SD v1 networks, ready to use (eval mode), and what was loaded (`info`)."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet
    info: CheckpointInfo
    sample_size: int = 512  # pixels per side the model was trained at: 512 for SD v1, 64 for minisd's nano model
    guidance_scale: float = 7.5  # the default guidance: SD v1's 7.5, or what a minisd-trained file recommends


def load_components(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    variant: str | None = None,
    local_files_only: bool = False,
) -> Components:
    """Load SD v1 from a single file, a diffusers folder or a Hugging Face Hub id.

    dtype: None keeps the file's float dtype (no conversion, no copy); torch.float16/bfloat16/float32 converts.
    device: where the parameters go (each tensor moved straight from the file's memory map).
    use_ema: for single files holding two UNets (`v1-5-pruned`), take the EMA copy (see keymap_ldm).
    variant: diffusers folders / hub ids only: "fp16" picks `*.fp16.safetensors` weights.
    local_files_only: hub ids only: use the Hugging Face cache, never the network (also when HF_HUB_OFFLINE=1).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MinisdError(f"dtype must be None or a torch floating dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MinisdError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    path = Path(source)
    if path.is_file():
        if variant is not None:
            raise MinisdError(
                f"variant applies to diffusers folders and hub ids, not to a single file; got {variant!r}"
            )
        state_dicts, info = _read_single_file(path, use_ema)
        metadata = file_metadata(path)
        configs = _configs_from_metadata(path, metadata) or _configs_from_shapes(state_dicts)
        sample_size, guidance_scale = _defaults_from_metadata(path, metadata)
        tokenizer = Tokenizer.from_default()
    else:
        if path.is_dir():
            folder = path
        elif HUB_ID.match(str(source)) and path.suffix not in WEIGHT_SUFFIXES:  # "org/name-2.0" is an id
            folder = hub_snapshot(str(source), variant, local_files_only)
        else:
            raise MinisdError(
                f"source must be a weights file, a diffusers folder or a hub id 'org/name'; {str(source)!r} is "
                "none of these (no such file or folder)"
            )
        state_dicts, configs, info = _read_folder(folder, variant)
        latent_size = _read_config(folder / "unet" / "config.json").get("sample_size", 64)
        factor = configs["vae"].downscale_factor
        sample_size, guidance_scale = latent_size * factor if isinstance(latent_size, int) else 512, 7.5
        tokenizer = _folder_tokenizer(folder)
    unet, vae, text_encoder = (
        _build(component, module_class, configs[component], state_dicts[component], dtype, device)
        for component, module_class in (("unet", UNet), ("vae", VAE), ("text_encoder", TextEncoder))
    )
    return Components(tokenizer, text_encoder, vae, unet, info, sample_size, guidance_scale)


# ---------------------------------------------------------------------------------------------------------------
# Single files


def _read_single_file(path: Path, use_ema: bool) -> tuple[dict[str, dict[str, Tensor]], CheckpointInfo]:
    """One file -> minisd state dicts {"unet", "vae", "text_encoder"} (views of the file) and what it is."""
    state_dict = read_state_dict(path)
    try:
        info = inspect_checkpoint(state_dict)
        if info.layout == "ldm":
            return ldm_to_minisd(state_dict, use_ema=use_ema), info
        if info.layout == "minisd":
            return split_minisd_file(state_dict), info
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None
    raise MinisdError(
        f"{path}: holds only one part of a diffusers folder ({info.layout}); pass the folder with unet/, vae/, "
        "text_encoder/ instead"
    )


def file_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata ({} for .ckpt files)."""
    if path.suffix not in SAFETENSORS_SUFFIXES:
        return {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def _configs_from_metadata(path: Path, metadata: dict[str, str]) -> dict[str, object] | None:
    """The configs minisd's trainer writes into its files' metadata ("minisd.config": JSON of the three dataclass
    configs), which hold what shapes cannot tell: head counts and GroupNorm groups. None for other files."""
    text = metadata.get("minisd.config")
    if text is None:
        return None
    try:
        configs = json.loads(text)
        classes = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": TextEncoderConfig}
        return {name: _fields_from(cls, configs[name]) for name, cls in classes.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise MinisdError(f"{path}: its minisd.config metadata is not valid ({error!r:.80})") from None


def _defaults_from_metadata(path: Path, metadata: dict[str, str]) -> tuple[int, float]:
    """The picture size and guidance scale a minisd-trained file records; SD v1's 512 and 7.5 for other files."""
    text = metadata.get("minisd.sample_size", "512")
    if not text.isdigit() or int(text) % 8 or not 8 <= int(text) <= 4096:
        raise MinisdError(f"{path}: its minisd.sample_size metadata must be a multiple of 8 pixels, got {text!r:.20}")
    guidance = metadata.get("minisd.guidance_scale", "7.5")[:20]
    if not re.fullmatch(r"\d{1,3}(\.\d+)?", guidance) or float(guidance) > 100:
        raise MinisdError(f"{path}: its minisd.guidance_scale metadata must be a number in [0, 100], got {guidance!r}")
    return int(text), float(guidance)


def _count(state_dict: dict[str, Tensor], prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the keys show (layers, ResNets, levels).

    >>> _count({"down_blocks.0.resnets.0.conv1.weight": 0, "down_blocks.1.resnets.0.conv1.weight": 0}, "down_blocks")
    2
    """
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state_dict) if m})


def _configs_from_shapes(state_dicts: dict[str, dict[str, Tensor]]) -> dict[str, object]:
    """Configs of a single file, read off its tensor shapes. Head counts and GroupNorm groups are not in the
    weights: they stay SD v1's (8 UNet heads, 12 CLIP heads, 32 groups), as for the tiny test models."""
    unet, vae, clip = state_dicts["unet"], state_dicts["vae"], state_dicts["text_encoder"]
    try:
        unet_levels = _count(unet, "down_blocks")
        vae_levels = _count(vae, "encoder.down_blocks")
        return {
            "unet": UNetConfig(
                in_channels=unet["conv_in.weight"].shape[1],
                out_channels=unet["conv_out.weight"].shape[0],
                block_out_channels=tuple(
                    unet[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(unet_levels)
                ),
                layers_per_block=_count(unet, "down_blocks.0.resnets"),
                cross_attention_dim=unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            ),
            "vae": VAEConfig(
                in_channels=vae["encoder.conv_in.weight"].shape[1],
                out_channels=vae["decoder.conv_out.weight"].shape[0],
                latent_channels=vae["post_quant_conv.weight"].shape[0],
                block_out_channels=tuple(
                    vae[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(vae_levels)
                ),
                layers_per_block=_count(vae, "encoder.down_blocks.0.resnets"),
            ),
            "text_encoder": TextEncoderConfig(
                vocab_size=clip["embeddings.token_embedding.weight"].shape[0],
                hidden_size=clip["embeddings.token_embedding.weight"].shape[1],
                intermediate_size=clip["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=_count(clip, "encoder.layers"),
                max_position_embeddings=clip["embeddings.position_embedding.weight"].shape[0],
            ),
        }
    except KeyError as error:
        raise MinisdError(f"cannot read the network sizes: the file lacks {error.args[0]}") from None


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders


def _read_folder(folder: Path, variant: str | None):
    """A diffusers folder -> minisd state dicts, minisd configs (from each config.json) and a CheckpointInfo."""
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
        configs[component] = CONFIG_READERS[component](_read_config(config_path), config_path)
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
    return state_dicts, configs, info


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise MinisdError(f"{path}: missing (every diffusers component folder has a config.json)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MinisdError(f"{path}: not valid JSON ({' '.join(str(error).split())})") from None


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
    """A few names for a one-line message: 'a, b, c' or 'a, b, … (12 more)'."""
    shown = ", ".join(names[:most])
    return shown + (f", … ({len(names) - most} more)" if len(names) > most else "")


def _fields_from(config_class, config: dict):
    """The dataclass config from a config.json dict: the fields of the same name (lists become tuples)."""
    values = {f.name: config[f.name] for f in fields(config_class) if config.get(f.name) is not None}
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _refuse(path: Path, what: str) -> None:
    raise MinisdError(f"{path}: not an SD v1 config: {what}")


def _unet_config(config: dict, path: Path) -> UNetConfig:
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        _refuse(path, f"_class_name {name}, expected UNet2DConditionModel")
    width = config.get("cross_attention_dim", 768)
    if isinstance(width, list) or width in (1024, 2048):
        model = "per level" if isinstance(width, list) else {1024: "SD 2.x", 2048: "SDXL"}[width]
        _refuse(path, f"cross_attention_dim {width} ({model}); SD v1 is 768")
    if isinstance(config.get("attention_head_dim"), list):
        _refuse(path, f"attention_head_dim {config['attention_head_dim']} per level (SD 2.x); SD v1 has 8 heads")
    for key, sd_v1 in (
        ("use_linear_projection", False),  # SD 2.x
        ("addition_embed_type", None),  # SDXL
        ("class_embed_type", None),  # unCLIP / upscalers
        ("num_class_embeds", None),
        ("transformer_layers_per_block", 1),  # SDXL
        ("time_cond_proj_dim", None),  # LCM-distilled UNets
    ):
        if config.get(key, sd_v1) != sd_v1:
            _refuse(path, f"{key} {config[key]!r}, SD v1 has {sd_v1!r}")
    levels = len(config.get("block_out_channels", UNetConfig.block_out_channels))
    down = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
    for key, sd_v1 in (("down_block_types", down), ("up_block_types", up)):
        if list(config.get(key, sd_v1)) != sd_v1:
            _refuse(path, f"{key} {config[key]}, SD v1 has {sd_v1}")
    unet_config = _fields_from(UNetConfig, config)
    if config.get("num_attention_heads") is not None:  # diffusers: num_attention_heads or attention_head_dim
        unet_config.attention_head_dim = config["num_attention_heads"]
    return unet_config


def _vae_config(config: dict, path: Path) -> VAEConfig:
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        _refuse(path, f"_class_name {name}, expected AutoencoderKL")
    scale = config.get("scaling_factor", LATENT_SCALE)
    if scale != LATENT_SCALE:
        _refuse(path, f"scaling_factor {scale} (0.13025 is SDXL's VAE); SD v1's is {LATENT_SCALE}")
    for key, sd_v1 in (("use_quant_conv", True), ("use_post_quant_conv", True), ("mid_block_add_attention", True)):
        if config.get(key, sd_v1) != sd_v1:
            _refuse(path, f"{key} {config[key]!r}, SD v1 has {sd_v1!r}")
    return _fields_from(VAEConfig, config)


def _text_encoder_config(config: dict, path: Path) -> TextEncoderConfig:
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        _refuse(path, f"architectures {architectures} (CLIPTextModelWithProjection is SDXL's); SD v1: CLIPTextModel")
    if config.get("hidden_act", "quick_gelu") != "quick_gelu":
        _refuse(path, f"hidden_act {config['hidden_act']!r} (OpenCLIP, SD 2.x); SD v1's CLIP uses quick_gelu")
    if config.get("hidden_size") == 1024:
        _refuse(path, "hidden_size 1024 (OpenCLIP ViT-H, SD 2.x); SD v1's CLIP ViT-L is 768")
    return _fields_from(TextEncoderConfig, config)


CONFIG_READERS = {"unet": _unet_config, "vae": _vae_config, "text_encoder": _text_encoder_config}


def _folder_tokenizer(folder: Path) -> Tokenizer:
    vocab, merges = (folder / name for name in TOKENIZER_FILES)
    if vocab.is_file() and merges.is_file():
        return Tokenizer.from_files(vocab, merges)
    return Tokenizer.from_default()  # SD v1 ships one tokenizer; folders without one get the packaged copy


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub ids


def _hub_cache_dir() -> str:
    """The Hugging Face cache, read from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(repo_id: str, variant: str | None, local_files_only: bool) -> Path:
    """Download (or find in the cache) just the files load_components reads: configs, one weights file per
    component (safetensors preferred, `variant` if given) and the tokenizer. Returns the snapshot folder.

    Offline (local_files_only, HF_HUB_OFFLINE=1, or the Hub unreachable) the cached snapshot of `main` is used,
    as diffusers does; what it lacks is reported by the folder reader.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    suffix = "" if variant is None else f".{variant}"
    cache_dir = _hub_cache_dir()
    offline = local_files_only or _hub_offline()
    why_offline = "downloads are off (local_files_only=True or HF_HUB_OFFLINE=1)"
    files: set[str] = set()
    if not offline:
        try:
            files = set(HfApi().list_repo_files(repo_id))
        except (RepositoryNotFoundError, GatedRepoError) as error:
            raise MinisdError(f"{repo_id}: {' '.join(str(error).split()[:12])} ...") from None
        except Exception as error:  # any transport failure (DNS, proxy, timeout): fall back to the cache
            offline, why_offline = True, f"the Hub cannot be reached ({type(error).__name__}: {error})"
    patterns = ["model_index.json", *TOKENIZER_FILES, *(f"{c}/config.json" for c in COMPONENTS)]
    for component, names in WEIGHT_FILES.items():
        candidates = [f"{component}/{name.format(v=suffix)}" for name in names]
        # online: the best file the repo has (never both formats); offline: whatever the cache holds
        patterns += candidates if offline else [next((c for c in candidates if c in files), candidates[0])]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=offline)
    except LocalEntryNotFoundError:
        message = f"{repo_id} is not in the Hugging Face cache ({cache_dir}) and {why_offline}"
        raise MinisdError(" ".join(f"{message}: download it once online, or pass a local path".split())) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise MinisdError(
            f"{repo_id}: cannot fetch from the Hugging Face Hub ({' '.join(str(error).split())})"
        ) from None
    return Path(folder)


# ---------------------------------------------------------------------------------------------------------------
# Building the networks


def _build(component: str, module_class, config, state_dict: dict[str, Tensor], dtype, device) -> nn.Module:
    """Build the network on the meta device (no memory, no random init), then give it the file's tensors as its
    parameters (strict; a one-line error on any mismatch)."""
    with torch.device("meta"):
        module = module_class(config)
    expected = module.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    wrong = [
        f"{name} {tuple(state_dict[name].shape)} vs {tuple(t.shape)}"
        for name, t in expected.items()
        if name in state_dict and state_dict[name].shape != t.shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong))
            if items
        ]
        raise MinisdError(f"{component}: the weights do not fit SD v1's {component}: {'; '.join(problems)}")
    # one step from the memory map to the target; .to() copies only when the dtype or device differs (None: keep)
    moved = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for k, t in state_dict.items()}
    with torch.no_grad():
        module.load_state_dict(moved, strict=True, assign=True)
    assert not any(t.is_meta for t in module.state_dict().values()), "every tensor must come from the file"
    return module.eval()
