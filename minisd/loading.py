"""Weights -> ready minisd modules: one entry point, `load_components`, for every place SD v1 / SD 2.x weights live.

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
for. With a dtype on the CPU, each tensor is read from the file on its own and converted (weights_convert.converted),
so the file's pages never sit in memory beside the converted copies. Anything that is not SD v1 or SD 2.x is
refused with a one-line MinisdError saying what was found.

Beside the networks, what the model needs from the samplers: what it predicts (ε or v; weights_convert.folders.
prediction_of decides, from the caller, the source's own record, or an SD 2 file's name with a note) and whether its
β are rescaled for zero terminal SNR (a folder's scheduler_config).
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.tokenizer import PAD_TOKENS, Tokenizer
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from weights_convert.configs import COMPONENTS, check_config, fields_from
from weights_convert.detect import CheckpointInfo
from weights_convert.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from weights_convert.folders import (
    SCHEDULER_FILE,
    SPECIAL_TOKENS_FILES,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    pad_token,
    prediction_of,
    read_weights,
)
from weights_convert.vae_files import FOLDER_WEIGHTS as VAE_FOLDER_WEIGHTS
from weights_convert.vae_files import read_vae

WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "org/name"
# The network each component is, and its dataclass config (whose fields are config.json keys).
NETWORKS = {"unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig), "text_encoder": (TextEncoder, TextEncoderConfig)}


@dataclass
class Components:
    """The four SD networks, ready to use (eval mode), what was loaded (`info`: layout, variant "v1…"/"v2…"), and
    what the samplers need to know about the model."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet
    info: CheckpointInfo
    sample_size: int = 512  # pixels per side the model was trained at: 512 (SD 2's v models 768), nano 64
    guidance_scale: float = 7.5  # the default guidance: SD's 7.5, or what a minisd-trained file recommends
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction" (samplers/base.py)
    rescale_betas_zero_snr: bool = False  # a folder's scheduler_config: β rescaled for zero terminal SNR
    note: str | None = None  # what loading had to assume, in one line (an SD 2 file's prediction type from its name)
    # a folder's scheduler_config.json as the samplers' defaults: {"sampler": class or name, "timestep_spacing": ...,
    # "schedule_type": ...} (weights_convert.configs.scheduler_settings); a single file's: SD v1's PLMS
    scheduler: dict[str, str] = field(default_factory=lambda: {"sampler": "PLMS"})

    @property
    def recorded_prediction_type(self) -> str | None:
        """What an image's record says about the prediction type: SD 2's always (its single files cannot say it),
        any v-prediction model's; None for SD v1's ε (the default)."""
        sd2 = self.info.variant.startswith("v2")
        return self.prediction_type if sd2 or self.prediction_type != "epsilon" else None


def load_components(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    variant: str | None = None,
    local_files_only: bool = False,
    prediction_type: str | None = None,
) -> Components:
    """Load SD v1 or SD 2.x from a single file, a diffusers folder or a Hugging Face Hub id.

    dtype: None keeps the file's float dtype (no conversion, no copy); torch.float16/bfloat16/float32 converts; on
    the CPU one tensor at a time as it is read (peak memory: the converted weights plus one tensor).
    device: where the parameters go (a GPU takes each tensor straight from the file's memory map).
    use_ema: for single files holding two UNets (`v1-5-pruned`), take the EMA copy (see keymap_ldm).
    variant: diffusers folders / hub ids only: "fp16" picks `*.fp16.safetensors` weights.
    local_files_only: hub ids only: use the Hugging Face cache, never the network (also when HF_HUB_OFFLINE=1).
    prediction_type: "epsilon" or "v_prediction", for SD 2 single files that do not record it (None: the source's
    record, else the official files' convention; an SD 2 file's name decides, 768 = v, and Components.note says so).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MinisdError(f"dtype must be None or a torch floating dtype, got {dtype!r}")
    device = check_device(device)
    path = Path(source)
    read_as = dtype if device.type == "cpu" else None  # the CPU's weights are the converted copies themselves
    if path.is_file():
        weights = read_weights(path, use_ema, variant, read_as)
        prediction, note = prediction_of(weights.info, prediction_type, str(path))
        sd2_v = weights.info.variant == "v2" and prediction == "v_prediction"
        sample_size, guidance_scale = _defaults_from_metadata(path, weights.metadata, 768 if sd2_v else 512)
        tokenizer = Tokenizer.from_default(PAD_TOKENS["sd2" if weights.info.variant.startswith("v2") else "sd1"])
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
        weights = read_weights(folder, use_ema, variant, read_as)
        prediction, note = prediction_of(weights.info, prediction_type, str(source))
        latent_size = weights.configs["unet"].get("sample_size", 64)
        if type(latent_size) is not int or not 1 <= latent_size <= 512:
            raise MinisdError(
                f"{folder}: unet config sample_size must be an integer in [1, 512], got {latent_size!r:.20}"
            )
        factor = fields_from(VAEConfig, weights.configs["vae"]).downscale_factor
        sample_size, guidance_scale = latent_size * factor, 7.5
        tokenizer = _folder_tokenizer(folder, weights.info.variant)
    try:  # every config checked against its weights before any network is built
        configs = {c: _checked_config(c, weights.configs[c], weights.state_dicts[c]) for c in COMPONENTS}
        unet, vae, text_encoder = (
            _build(component, configs[component], weights.state_dicts[component], dtype, device)
            for component in COMPONENTS  # unet, vae, text_encoder
        )
    except MinisdError as error:
        raise MinisdError(f"{source}: {error}") from None
    return Components(
        tokenizer, text_encoder, vae, unet, weights.info, sample_size, guidance_scale, prediction,
        weights.rescale_betas_zero_snr, note, scheduler=weights.scheduler or {"sampler": "PLMS"},
    )  # fmt: skip


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """cpu, cuda, cuda:N or mps, present on this machine, as a torch.device (meta, xla and the like hold no
    numbers: the weights could not go there)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise MinisdError(f"{name} must be cpu, cuda, cuda:N or mps, got {str(device)!r:.40}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise MinisdError(f"{name} {device}: CUDA is not available on this machine (use cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise MinisdError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise MinisdError(f"{name} {device}: MPS is not available on this machine (use cpu)")
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# What a file or folder says beyond its weights


def _defaults_from_metadata(path: Path, metadata: dict[str, str], size: int = 512) -> tuple[int, float]:
    """The picture size and guidance scale a minisd-trained file records; `size` (512, or 768 for SD 2's v models)
    and SD's 7.5 for other files."""
    text = metadata.get("minisd.sample_size", str(size))
    if not re.fullmatch(r"[0-9]{1,4}", text) or int(text) % 8 or not 8 <= int(text) <= 4096:  # ASCII digits only
        raise MinisdError(f"{path}: its minisd.sample_size metadata must be a multiple of 8 pixels, got {text!r:.20}")
    guidance = metadata.get("minisd.guidance_scale", "7.5")[:20]
    if not re.fullmatch(r"\d{1,3}(\.\d+)?", guidance) or float(guidance) > 100:
        raise MinisdError(f"{path}: its minisd.guidance_scale metadata must be a number in [0, 100], got {guidance!r}")
    return int(text), float(guidance)


def _folder_tokenizer(folder: Path, variant: str) -> Tokenizer:
    """The folder's tokenizer (its padding token from special_tokens_map.json); the packaged vocabulary with the
    family's padding for a folder without one (SD v1 and SD 2 share the vocabulary)."""
    vocab, merges = (folder / name for name in TOKENIZER_FILES)
    if vocab.is_file() and merges.is_file():
        return Tokenizer.from_files(vocab, merges, pad_token(folder))
    return Tokenizer.from_default(PAD_TOKENS["sd2" if variant.startswith("v2") else "sd1"])


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


def hub_snapshot(
    repo_id: str,
    variant: str | None,
    local_files_only: bool,
    weight_files: dict[str, tuple[str, ...]] = WEIGHT_FILES,
    other_files: tuple[str, ...] | None = None,
) -> Path:
    """The snapshot folder of a hub id with just the files load_components reads: configs, one weights file per
    component (safetensors preferred, `variant` if given), the tokenizer and the scheduler config (what the model
    predicts). weight_files, other_files: another family's components (name -> weights file names, best first) and
    the other files it reads (minisd.kandinsky.loading); each component's config.json is always fetched.

    Offline by default for an id found in the Hugging Face cache: its cached snapshot of `main` is used without a
    network call (as diffusers does offline; what it lacks is reported by the folder reader). An id not in the
    cache is downloaded, unless downloads are off (local_files_only, HF_HUB_OFFLINE=1): the Hub is asked once,
    without retries, and an unreachable Hub is one line within seconds (the hub client's own retries took 25 s and
    printed a dozen lines).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    suffix = "" if variant is None else f".{variant}"
    cache_dir = _hub_cache_dir()
    candidates = {c: [f"{c}/{name.format(v=suffix)}" for name in names] for c, names in weight_files.items()}
    sd_files = ("model_index.json", *TOKENIZER_FILES, *SPECIAL_TOKENS_FILES, SCHEDULER_FILE)
    other_files = sd_files if other_files is None else other_files
    patterns = [*other_files, *(f"{c}/config.json" for c in weight_files)]
    try:  # the cache first: never a network call for an id already there
        cached = [*patterns, *(name for names in candidates.values() for name in names)]
        return Path(snapshot_download(repo_id, allow_patterns=cached, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    not_cached = f"{repo_id} is not in the Hugging Face cache ({cache_dir})"
    if local_files_only or _hub_offline():
        raise MinisdError(
            f"{not_cached} and downloads are off (local_files_only=True, HF_HUB_OFFLINE=1, or weights a PNG names)"
        )
    try:
        files = {sibling.rfilename for sibling in HfApi().model_info(repo_id, timeout=10).siblings or []}
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise MinisdError(f"{repo_id}: {' '.join(str(error).split()[:12])} ...") from None
    except Exception as error:  # any transport failure (DNS, proxy, timeout): one line, no retries
        raise MinisdError(
            f"{not_cached} and the Hub cannot be reached ({type(error).__name__}: {error}): download it once "
            "online, or pass a local path"
        ) from None
    # the best weights file the repo has for each component (never both formats)
    patterns += [next((name for name in names if name in files), names[0]) for names in candidates.values()]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise MinisdError(f"{repo_id}: cannot fetch from the Hugging Face Hub ({error})") from None
    return Path(folder)


# ---------------------------------------------------------------------------------------------------------------
# A separate VAE


def load_vae(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
) -> VAE:
    """A VAE on its own (vae-ft-mse-840000, sd-vae-ft-ema): a VAE-only file (.safetensors/.ckpt, LDM or diffusers
    names), a diffusers AutoencoderKL folder (or an SD folder's vae/), or a hub id such as
    "stabilityai/sd-vae-ft-mse" (through the Hugging Face cache). Read by weights_convert.vae_files, built strictly
    as load_components builds the model's."""
    path = Path(source)
    if not path.exists():
        if not (HUB_ID.match(str(source)) and path.suffix not in WEIGHT_SUFFIXES):
            raise MinisdError(
                f"vae must be a VAE file, a folder or a hub id 'org/name'; {str(source)!r} is none of these"
            )
        path = _hub_vae_snapshot(str(source), local_files_only)
    weights = read_vae(path)
    try:
        config = _checked_config("vae", weights.config, weights.state_dict)  # before building, as load_components
        return _build("vae", config, weights.state_dict, dtype, torch.device(device))
    except MinisdError as error:
        raise MinisdError(f"{source}: {error}") from None


def _hub_vae_snapshot(repo_id: str, local_files_only: bool) -> Path:
    """A VAE repository's config and weights (at its root, or in vae/ of an SD repository), from the cache when
    there, else downloaded (unless offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{folder}{name}" for folder in ("", "vae/") for name in ("config.json", *VAE_FOLDER_WEIGHTS)]
    patterns = [p.format(v="") for p in patterns]
    try:  # the cache first: no network call for an id already there
        return Path(
            snapshot_download(repo_id, allow_patterns=patterns, cache_dir=_hub_cache_dir(), local_files_only=True)
        )
    except LocalEntryNotFoundError:
        pass
    if local_files_only or _hub_offline():
        raise MinisdError(f"vae {repo_id} is not in the Hugging Face cache ({_hub_cache_dir()}) and downloads are off")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=_hub_cache_dir()))
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise MinisdError(f"vae {repo_id}: cannot fetch it ({' '.join(str(error).split())})") from None


# ---------------------------------------------------------------------------------------------------------------
# Building the networks


def _checked_config(component: str, config: dict, state_dict: dict[str, Tensor]):
    """The network's dataclass config from its config.json dict, once it fits the weights: each field of its type,
    every size the weights show equal to the config's (configs.check_config), every weight floating point."""
    integers = [f"{name} ({t.dtype})" for name, t in state_dict.items() if not t.is_floating_point()]
    if integers:
        raise MinisdError(f"{component}: {len(integers)} weights are not floating point, e.g. {integers[0]}")
    try:
        module_config = fields_from(NETWORKS[component][1], config)
    except MinisdError as error:
        raise MinisdError(f"{component}: {error}") from None
    check_config(component, module_config, state_dict)
    return module_config


def _build(component: str, config, state_dict: dict[str, Tensor], dtype, device) -> nn.Module:
    """Build the network from its checked dataclass config on the meta device (no memory, no random init), then
    give it the file's tensors as its parameters (strict; a one-line error on any mismatch)."""
    with torch.device("meta"):
        module = NETWORKS[component][0](config)
    return assign_weights(component, module, state_dict, dtype, device, "SD's")


def assign_weights(
    component: str, module: nn.Module, state_dict: dict[str, Tensor], dtype, device, model: str
) -> nn.Module:
    """Give a meta-device `module` the file's tensors as its parameters: strict (every name, every shape; one
    line naming `model`'s component otherwise), moved straight from the memory map to device/dtype, every value
    finite. Eval mode."""
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
        raise MinisdError(f"{component}: the weights do not fit {model} {component}: {'; '.join(problems)}")
    # one step from the memory map to the target; .to() copies only when the dtype or device differs (None: keep)
    moved = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else None) for k, t in state_dict.items()}
    # NaN or ±inf weights make every picture garbage (an inf VAE bias: all white). A tensor's float32 sum is finite
    # exactly when its values are (weights are far too small to overflow it): one cheap pass on the target device,
    # one synchronisation.
    finite = torch.stack([t.sum(dtype=torch.float32) for t in moved.values()]).isfinite().tolist()
    if not all(finite):
        bad = [name for name, ok in zip(moved, finite, strict=True) if not ok]
        raise MinisdError(f"{component}: {len(bad)} weights hold NaN or inf values, e.g. {bad[0]}: a corrupt file")
    with torch.no_grad():
        module.load_state_dict(moved, strict=True, assign=True)
    assert not any(t.is_meta for t in module.state_dict().values()), "every tensor must come from the file"
    return module.eval()
