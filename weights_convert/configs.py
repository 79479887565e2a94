"""Which SD is this? The three networks' sizes as config.json dicts (SD v1 and SD 2.x), and the refusal of every other
model.

One form for every source: the dicts of diffusers' / transformers' config.json files (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel), whose keys minisd's dataclass configs take by name (`fields_from`).

    source                        how its config is found                                    function
    a single file (official)      read off the tensor shapes; the family's fixed choices     configs_from_shapes
                                  for what shapes do not show (SD v1: 8 UNet heads, 12
                                  CLIP heads, quick-GELU; SD 2: 64-wide heads in both,
                                  GELU, attention upcast; 32 GroupNorm groups)
    minisd's own single file      the "minisd.config" metadata its trainer writes (head      configs_from_metadata
                                  counts and groups that shapes cannot tell)
    a diffusers folder            each component's config.json, checked to be SD's           sd_config
    writing a diffusers folder    configs_from_shapes, written by folders.write_configs      write_config_file

SD 2.x differs from SD v1 in config values only (a 1024-wide context, linear projections, heads per level, GELU;
family() tells them apart). A folder's scheduler/scheduler_config.json: what minisd's samplers follow (class,
timestep_spacing, Karras or exponential σ), refusing in one line what they cannot (scheduler_settings); its
prediction_type and rescale_betas_zero_snr are the model's (folders.read_scheduler_config).

Other families are refused in one line naming the key that gives them away: SDXL (2048-wide context, added
embeddings), LCM, unCLIP. The refusals by key names and shapes of a state dict (LoRA, SDXL single files) are
detect.py's.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import get_args

from torch import Tensor

from minisd.errors import MinisdError
from minisd.vae import LATENT_SCALE

COMPONENTS = ("unet", "vae", "text_encoder")  # SD's three networks, in the order files and folders list them
HEAD_WIDTH_SD2 = 64  # SD 2: every attention head 64 wide (v2-inference.yaml num_head_channels; OpenCLIP ViT-H too)

# ---------------------------------------------------------------------------------------------------------------
# Sizes read off tensor shapes (minisd names)


def count(names: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix.<i>.` the keys show (layers, ResNets, levels).

    >>> count({"down_blocks.0.resnets.0.conv1.weight": 0, "down_blocks.1.resnets.0.conv1.weight": 0}, "down_blocks")
    2
    """
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, names) if m})


def _dim(state_dict: dict[str, Tensor], name: str, dim: int) -> int:
    """state_dict[name].shape[dim], once the tensor has SD's number of dimensions for that weight: 2 for the
    linear layers and embedding tables sizes are read from, 4 for the convolutions."""
    ndim = 2 if name.endswith(("to_k.weight", "fc1.weight", "_embedding.weight")) else 4
    shape = tuple(state_dict[name].shape)
    if len(shape) != ndim:
        raise MinisdError(f"{name} has shape {shape}; SD's has {ndim} dimensions")
    return shape[dim]


def unet_config(unet: dict[str, Tensor], latent_size: int = 64) -> dict:
    """diffusers UNet2DConditionModel config.json for these weights: sizes read from shapes, the rest the family's.
    SD 2 shows itself by its Linear proj_in ([c, c], not a [c, c, 1, 1] conv): then 64-wide heads per level and
    attention upcast (Stability's SD 2 code computes attention in float32: ATTN_PRECISION "fp32")."""
    levels = count(unet, "down_blocks")
    attention = [f"down_blocks.{i}.attentions.0.norm.weight" in unet for i in range(levels)]
    channels = [_dim(unet, f"down_blocks.{i}.resnets.0.conv1.weight", 0) for i in range(levels)]
    proj_in = next((t for name, t in unet.items() if name.endswith("attentions.0.proj_in.weight")), None)
    sd2 = proj_in is not None and proj_in.ndim == 2
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": latent_size,  # latent pixels: 64 for 512 px, 96 for SD 2's 768 px
        "in_channels": _dim(unet, "conv_in.weight", 1),
        "out_channels": _dim(unet, "conv_out.weight", 0),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": count(unet, "down_blocks.0.resnets"),
        "cross_attention_dim": _dim(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", 1),
        # the number of heads (diffusers' historical name), not their width: SD v1's 8, or SD 2's one per level
        "attention_head_dim": [c // HEAD_WIDTH_SD2 for c in channels] if sd2 else 8,
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
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
    levels = count(vae, "encoder.down_blocks")
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": _dim(vae, "encoder.conv_in.weight", 1),
        "out_channels": _dim(vae, "decoder.conv_out.weight", 0),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [_dim(vae, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) for i in range(levels)],
        "layers_per_block": count(vae, "encoder.down_blocks.0.resnets"),
        "latent_channels": _dim(vae, "post_quant_conv.weight", 0),
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
        "scaling_factor": LATENT_SCALE,  # v1-inference.yaml scale_factor
    }


def text_encoder_config(text_encoder: dict[str, Tensor], dtype_name: str, variant: str = "v1") -> dict:
    """transformers CLIPTextModel config.json, sizes from shapes: openai/clip-vit-large-patch14's text part (SD v1),
    or OpenCLIP ViT-H's as stabilityai/stable-diffusion-2-1's text_encoder/config.json has it (variant "v2…":
    64-wide heads, GELU). The family cannot be read off minisd names and shapes, hence `variant`."""
    vocab_size, hidden_size = (_dim(text_encoder, "embeddings.token_embedding.weight", i) for i in (0, 1))
    sd2 = variant.startswith("v2")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": _dim(text_encoder, "encoder.layers.0.mlp.fc1.weight", 0),
        "num_hidden_layers": count(text_encoder, "encoder.layers"),
        "num_attention_heads": hidden_size // HEAD_WIDTH_SD2 if sd2 else 12,
        "max_position_embeddings": _dim(text_encoder, "embeddings.position_embedding.weight", 0),
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 512 if sd2 else 768,
        "bos_token_id": 0,  # the ids the CLIP config carries (not the tokenizer's 49406/49407)
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": dtype_name,
    }


def configs_from_shapes(
    state_dicts: dict[str, dict[str, Tensor]], variant: str = "v1", sample_size: int = 512
) -> dict[str, dict]:
    """The three config.json dicts of minisd-named state dicts {"unet", "vae", "text_encoder"}, read off their
    shapes (names and shapes only: meta tensors do). variant: detect's ("v1…" or "v2…", for the text encoder);
    sample_size: the model's pixels per side. The text encoder's torch_dtype is the UNet's float dtype."""
    try:
        float_dtype = next(t.dtype for t in state_dicts["unet"].values() if t.is_floating_point())
        dtype_name = str(float_dtype).removeprefix("torch.")
        vae = vae_config(state_dicts["vae"])
        downscale = 2 ** (len(vae["block_out_channels"]) - 1)  # 8 for SD's VAE (one halving per level but the last)
        return {
            "unet": unet_config(state_dicts["unet"], sample_size // downscale),
            "vae": vae,
            "text_encoder": text_encoder_config(state_dicts["text_encoder"], dtype_name, variant),
        }
    except (KeyError, StopIteration) as error:
        missing = error.args[0] if isinstance(error, KeyError) else "a floating-point UNet weight"
        raise MinisdError(f"cannot read the network sizes: the file lacks {missing}") from None


# ---------------------------------------------------------------------------------------------------------------
# config.json files


MAX_CONFIG_BYTES = 1 << 20  # a config.json, scheduler_config.json or special_tokens_map.json is a few KB


def read_config_file(path: Path) -> dict:
    """A config.json as a dict; a one-line MinisdError when it is missing, over MAX_CONFIG_BYTES, nested too deep
    for Python's parser or not a JSON object."""
    if not path.is_file():
        raise MinisdError(f"{path}: missing (every diffusers component folder has a config.json)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise MinisdError(f"{path}: {path.stat().st_size} bytes; a config file has at most {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise MinisdError(f"{path}: not valid JSON ({' '.join(str(error).split())})") from None
    if not isinstance(config, dict):
        raise MinisdError(f"{path}: not a config (a JSON {type(config).__name__}, not an object)")
    return config


def write_config_file(path: Path, config: dict) -> None:
    """A config dict as config.json (indented, as diffusers writes it)."""
    path.write_text(json.dumps(config, indent=2) + "\n")


def configs_from_metadata(metadata: dict[str, str]) -> dict[str, dict] | None:
    """The three configs minisd's trainer writes into its files' metadata ("minisd.config": JSON of the dataclass
    configs, whose keys are config.json keys), or None when the file has none."""
    text = metadata.get("minisd.config")
    if text is None:
        return None
    try:
        configs = json.loads(text)
        return {component: dict(configs[component]) for component in COMPONENTS}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise MinisdError(f"its minisd.config metadata is not valid ({error!r:.80})") from None


MAX_SIZE = 1 << 20  # any size in a config (channels, layers, vocabulary; SD v1's largest is 49,408)
MAX_LEVELS = 16  # entries of block_out_channels (SD v1 has 4)


def _valid(kind: type, value) -> bool:
    """Whether a config value has its field's type: int sizes in [1, MAX_SIZE], a positive finite float, a bool, a
    short str, or a list of 1 to MAX_LEVELS int sizes (bool is not an int here)."""
    if kind is int:
        return type(value) is int and 1 <= value <= MAX_SIZE
    if kind is float:
        return type(value) in (int, float) and 0 < value < MAX_SIZE
    if kind is bool:
        return type(value) is bool
    if kind is str:  # a name (hidden_act): the network's own check says which
        return type(value) is str and len(value) <= 64
    if isinstance(kind, UnionType):  # SD 2's attention_head_dim: one head count, or one per level
        return any(_valid(arm, value) for arm in get_args(kind))
    return type(value) in (list, tuple) and 1 <= len(value) <= MAX_LEVELS and all(_valid(int, v) for v in value)


def fields_from(config_class, config: dict):
    """The dataclass config from a config.json dict: the fields of the same name (lists become tuples), each of its
    field's type (a one-line MinisdError for "320" where 320 belongs, 1e9 layers, a list where an int goes).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Sizes:
    ...     channels: tuple[int, ...] = (1,)
    ...     layers: int = 2
    >>> fields_from(Sizes, {"channels": [8, 16], "act_fn": "silu"})
    Sizes(channels=(8, 16), layers=2)
    >>> fields_from(Sizes, {"layers": "2"})
    Traceback (most recent call last):
    minisd.errors.MinisdError: config key layers must be an integer in [1, 1048576], got '2'
    """
    values = {f.name: config[f.name] for f in fields(config_class) if config.get(f.name) is not None}
    for f in fields(config_class):
        if f.name in values and not _valid(f.type, values[f.name]):
            what = {int: f"an integer in [1, {MAX_SIZE}]", float: "a positive number", bool: "true or false"}
            levels = f"a list of 1 to {MAX_LEVELS} integers in [1, {MAX_SIZE}]"
            what = {**what, str: "a name (at most 64 characters)", int | tuple[int, ...]: f"{what[int]} or {levels}"}
            what = what.get(f.type, levels)
            raise MinisdError(f"config key {f.name} must be {what}, got {values[f.name]!r:.40}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_sizes_within(component: str, config, state_dict: dict[str, Tensor]) -> None:
    """A bound for networks without a size table (Kandinsky 2.2's): no integer in the dataclass `config` may exceed
    what its weights could show, the largest tensor side or the number of tensors, whichever is larger (defaults
    aside). A config saying a million layers is refused before a million layers are built (on the meta device:
    seconds, gigabytes)."""
    bound = max([len(state_dict), *(max(t.shape, default=1) for t in state_dict.values())])
    for f in fields(config):
        values = getattr(config, f.name)
        if values == f.default:  # a field the file did not set (or set to minisd's own default): a known size
            continue
        for value in values if isinstance(values, tuple) else (values,):
            if type(value) is int and value > bound:
                raise MinisdError(
                    f"{component}: the config says {f.name} {value}; its weights show no size over {bound}"
                )


# The config keys whose values the weights show (read by unet_config, vae_config, text_encoder_config).
SHAPE_KEYS = {  # use_linear_projection: SD 2's Linear proj_in ([c, c]) or SD v1's 1×1 conv ([c, c, 1, 1])
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
             "use_linear_projection"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"),
}  # fmt: skip


def check_config(component: str, config, state_dict: dict[str, Tensor]) -> None:
    """Before a network is built from its dataclass `config`: every size its weights show must be the config's
    (a config saying 40,000 layers would otherwise build them before any shape is compared), and the head counts
    (SD 2's: one per level) and GroupNorm groups, which the weights do not show, must divide each level's channels."""
    read = {"unet": unet_config, "vae": vae_config, "text_encoder": lambda sd: text_encoder_config(sd, "")}
    try:
        shown = read[component](state_dict)
    except KeyError as error:
        raise MinisdError(f"{component}: cannot read the network sizes: the weights lack {error.args[0]}") from None
    for key in SHAPE_KEYS[component]:
        said = getattr(config, key)
        seen = tuple(shown[key]) if isinstance(shown[key], list) else shown[key]
        if said != seen:
            raise MinisdError(f"{component}: the config says {key} {said}, the weights show {seen}")
    channels = getattr(config, "block_out_channels", ())
    heads = config.heads() if component == "unet" else (1,) * len(channels)
    groups = (getattr(config, "norm_num_groups", 1),) * len(channels)
    for key, parts in (("attention_head_dim", heads), ("norm_num_groups", groups)):
        if any(c % p for c, p in zip(channels, parts, strict=True)):
            raise MinisdError(
                f"{component}: {key} {getattr(config, key)} does not divide the channels {channels} of each level"
            )


def family(configs: dict[str, dict]) -> str:
    """ "v2" when the configs describe SD 2.x (OpenCLIP's GELU text encoder), else "v1".

    >>> family({"text_encoder": {"hidden_act": "gelu"}}), family({"text_encoder": {}})
    ('v2', 'v1')
    """
    return "v2" if configs["text_encoder"].get("hidden_act") == "gelu" else "v1"


# ---------------------------------------------------------------------------------------------------------------
# SD or not: the keys of a config.json that give other families away


def _refuse(where: str | Path, what: str) -> None:
    raise MinisdError(f"{where}: not an SD v1 or SD 2 config: {what}")


def _check_unet(config: dict, where: str | Path) -> dict:
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        _refuse(where, f"_class_name {name}, expected UNet2DConditionModel")
    width = config.get("cross_attention_dim", 768)
    if isinstance(width, list) or width == 2048:
        model = "per level" if isinstance(width, list) else "SDXL"
        _refuse(where, f"cross_attention_dim {width} ({model}); SD v1 is 768, SD 2 1024")
    for key, sd_v1 in (
        ("addition_embed_type", None),  # SDXL
        ("class_embed_type", None),  # unCLIP / upscalers
        ("num_class_embeds", None),
        ("transformer_layers_per_block", 1),  # SDXL
        ("time_cond_proj_dim", None),  # LCM-distilled UNets
    ):
        if config.get(key, sd_v1) != sd_v1:
            _refuse(where, f"{key} {config[key]!r}, SD v1 has {sd_v1!r}")
    channels = config.get("block_out_channels", (320, 640, 1280, 1280))
    if not isinstance(channels, list | tuple):
        _refuse(where, f"block_out_channels {channels!r:.40} is not a list")
    down = ["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(channels) - 1)
    for key, sd_v1 in (("down_block_types", down), ("up_block_types", up)):
        value = config.get(key, sd_v1)
        if not isinstance(value, list | tuple) or list(value) != sd_v1:
            _refuse(where, f"{key} {value!r:.200}, SD has {sd_v1}")
    if config.get("num_attention_heads") is not None:  # diffusers: num_attention_heads or attention_head_dim
        return {**config, "attention_head_dim": config["num_attention_heads"]}
    return config


def _check_vae(config: dict, where: str | Path) -> dict:
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        _refuse(where, f"_class_name {name}, expected AutoencoderKL")
    scale = config.get("scaling_factor", LATENT_SCALE)
    if scale != LATENT_SCALE:
        _refuse(where, f"scaling_factor {scale} (0.13025 is SDXL's VAE); SD v1's is {LATENT_SCALE}")
    for key, sd_v1 in (("use_quant_conv", True), ("use_post_quant_conv", True), ("mid_block_add_attention", True)):
        if config.get(key, sd_v1) != sd_v1:
            _refuse(where, f"{key} {config[key]!r}, SD v1 has {sd_v1!r}")
    return config


def _check_text_encoder(config: dict, where: str | Path) -> dict:
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        _refuse(where, f"architectures {architectures} (CLIPTextModelWithProjection is SDXL's); SD v1: CLIPTextModel")
    if config.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
        _refuse(where, f"hidden_act {config['hidden_act']!r}; SD v1's CLIP uses quick_gelu, SD 2's OpenCLIP gelu")
    if config.get("hidden_size") == 1280:
        _refuse(where, "hidden_size 1280 (OpenCLIP ViT-bigG, SDXL); SD v1's CLIP ViT-L is 768, SD 2's ViT-H 1024")
    return config


_CHECKS = {"unet": _check_unet, "vae": _check_vae, "text_encoder": _check_text_encoder}


def sd_config(component: str, config: dict, where: str | Path) -> dict:
    """A component's config.json dict if it describes SD v1's or SD 2's network (diffusers' alias
    num_attention_heads read as attention_head_dim); else a one-line MinisdError naming `where` and the key that
    shows another model."""
    return _CHECKS[component](config, where)


# ---------------------------------------------------------------------------------------------------------------
# scheduler/scheduler_config.json: what minisd follows, and what must be SD's

# Keys whose value must be what minisd's samplers compute (SD's β schedule, the solvers as written); any other value
# is refused in one line. Keys absent from the file are not checked (each class's default). prediction_type
# (epsilon or v_prediction) and rescale_betas_zero_snr are not here: they say what the model is, and
# folders.read_scheduler_config reads and checks them (samplers.base.check_prediction_type).
SCHEDULER_FIXED = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "thresholding": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,  # PNDM: PLMS without its Runge-Kutta warm-up, as SD v1 runs it
    "variance_type": ("fixed_small", None),
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
}
DPM_ALGORITHMS = {"dpmsolver++": "DPMSolverMultistepScheduler", "sde-dpmsolver++": "DPM++ 2M SDE"}


def scheduler_settings(config: dict, where: str | Path) -> dict[str, str]:
    """What a diffusers folder's scheduler_config.json asks of minisd's samplers, as diffusers'
    `XScheduler.from_config(pipe.scheduler.config)` passes it on to any scheduler: {"sampler": its class (or "DPM++ 2M
    SDE"), "timestep_spacing": when given, "schedule_type": "Karras" / "Exponential" for use_karras_sigmas /
    use_exponential_sigmas}. What minisd cannot follow (another β schedule, another solver, steps_offset other than
    1 with "leading" spacing, ...) is refused in one line naming the key."""
    for key, allowed in SCHEDULER_FIXED.items():
        values = allowed if isinstance(allowed, tuple) else (allowed,)
        if key in config and config[key] not in values:
            raise MinisdError(
                f"{where}: {key} {config[key]!r} is not followed by minisd's samplers (SD's: {allowed!r})"
            )
    settings = {"sampler": str(config.get("_class_name", "PNDMScheduler"))}
    if settings["sampler"] == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in DPM_ALGORITHMS:
            raise MinisdError(f"{where}: algorithm_type {algorithm!r}: minisd has dpmsolver++ and sde-dpmsolver++")
        settings["sampler"] = DPM_ALGORITHMS[algorithm]
    spacing = config.get("timestep_spacing")
    if spacing is not None:
        settings["timestep_spacing"] = str(spacing)
    if config.get("steps_offset", 1) != 1 and spacing in (None, "leading"):
        raise MinisdError(f"{where}: steps_offset {config['steps_offset']!r} with leading spacing; minisd's is 1")
    if config.get("use_karras_sigmas") and config.get("use_exponential_sigmas"):
        raise MinisdError(f"{where}: use_karras_sigmas and use_exponential_sigmas both set")
    if config.get("use_karras_sigmas"):
        settings["schedule_type"] = "Karras"
    elif config.get("use_exponential_sigmas"):
        settings["schedule_type"] = "Exponential"
    return settings
