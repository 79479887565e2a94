"""Kandinsky 2.2 weights -> ready minisd modules: `load_kandinsky(decoder, prior)` from diffusers folders or Hugging
Face Hub ids (through the HF cache, as minisd.loading does for SD).

    load_kandinsky("kandinsky-community/kandinsky-2-2-decoder")          the decoder, and the prior its README names
    load_kandinsky("path/to/decoder-inpaint", prior="path/to/prior")     folders, or any mix with hub ids
    load_kandinsky("kandinsky-community/kandinsky-2-2-decoder", prior=None)   decoder only: image_embeds in

Every network is built on the meta device from its config.json (checked by weights_convert.kandinsky: one line for
anything that is not Kandinsky 2.2) and takes the file's tensors strictly (minisd.loading.assign_weights).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.kandinsky.image_encoder import ImageEncoder, ImageEncoderConfig
from minisd.kandinsky.movq import MoVQ, MoVQConfig
from minisd.kandinsky.prior import Prior, PriorConfig
from minisd.kandinsky.unet import DecoderUNet, DecoderUNetConfig
from minisd.loading import HUB_ID, WEIGHT_SUFFIXES, assign_weights, hub_snapshot
from minisd.tokenizer import Tokenizer
from weights_convert.configs import check_sizes_within, fields_from, read_config_file
from weights_convert.files import read_state_dict
from weights_convert.kandinsky import (
    FOLDERS,
    OTHER_FILES,
    WEIGHT_FILES,
    kandinsky_config,
    pipeline_kind,
    to_minisd,
)

NETWORKS = {
    "unet": (DecoderUNet, DecoderUNetConfig),
    "movq": (MoVQ, MoVQConfig),
    "prior": (Prior, PriorConfig),
    "text_encoder": (TextEncoder, TextEncoderConfig),
    "image_encoder": (ImageEncoder, ImageEncoderConfig),
}
AUTO = "auto"  # prior="auto": the prior the decoder's README names (diffusers' connected pipes)


@dataclass
class KandinskyComponents:
    """Kandinsky 2.2's networks, ready (eval mode): the decoder (.unet .movq) and, when loaded, the prior side
    (.tokenizer .text_encoder .image_encoder .prior). `sources`: where each part came from."""

    unet: DecoderUNet
    movq: MoVQ
    prior: Prior | None = None
    text_encoder: TextEncoder | None = None
    image_encoder: ImageEncoder | None = None
    tokenizer: Tokenizer | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9


def is_kandinsky(source: str | os.PathLike, local_files_only: bool = False) -> bool:
    """Whether a folder or hub id holds a Kandinsky 2.2 pipeline: its model_index.json says so. For a hub id only
    that small file is fetched (or read from the cache); anything unreadable is not Kandinsky (the SD loader then
    says what it is)."""
    index = _model_index(source, local_files_only)
    try:
        pipeline_kind(index, source)
    except MinisdError:
        return False
    return True


def load_kandinsky(
    decoder: str | os.PathLike,
    prior: str | os.PathLike | None = AUTO,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    local_files_only: bool = False,
) -> KandinskyComponents:
    """Load a Kandinsky 2.2 decoder (kandinsky-2-2-decoder or -decoder-inpaint) and its prior.

    decoder, prior: a diffusers folder or a hub id ("org/name"); prior "auto" is the repo the decoder's README.md
    names in its front matter (`prior: [kandinsky-community/kandinsky-2-2-prior]`), None loads no prior (the
    pipelines then take image_embeds). dtype: None keeps the files' dtype; device: where the parameters go.
    variant: "fp16" picks `*.fp16.safetensors`. local_files_only: hub ids from the cache only.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MinisdError(f"dtype must be None or a torch floating dtype, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MinisdError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    decoder_folder = _folder(decoder, "decoder", variant, local_files_only)
    if prior == AUTO:
        prior = _readme_prior(decoder_folder)
    parts = _read_networks(decoder_folder, "decoder", variant, dtype, device)
    sources = {"decoder": str(decoder)}
    if prior is not None:
        prior_folder = _folder(prior, "prior", variant, local_files_only)
        parts |= _read_networks(prior_folder, "prior", variant, dtype, device)
        parts["tokenizer"] = _tokenizer(prior_folder)
        sources["prior"] = str(prior)
    return KandinskyComponents(**parts, sources=sources)


def _folder(source: str | os.PathLike, kind: str, variant: str | None, local_files_only: bool) -> Path:
    """A source -> its folder (a hub id through the cache), checked to hold a Kandinsky 2.2 `kind` pipeline."""
    path = Path(source)
    if path.is_dir():
        folder = path
    elif HUB_ID.match(str(source)) and path.suffix not in WEIGHT_SUFFIXES:
        folder = hub_snapshot(str(source), variant, local_files_only, _weight_files(kind), OTHER_FILES[kind])
    else:
        raise MinisdError(f"{kind} must be a diffusers folder or a hub id 'org/name'; {str(source)!r} is neither")
    index_path = folder / "model_index.json"
    found = pipeline_kind(_read_json(index_path), index_path)
    if found != kind:
        raise MinisdError(f"{folder}: holds the Kandinsky 2.2 {found}, but the {kind} was asked for here")
    return folder


def _weight_files(kind: str) -> dict[str, tuple[str, ...]]:
    return {component: WEIGHT_FILES[component] for component in FOLDERS[kind]}


def _read_networks(folder: Path, kind: str, variant: str | None, dtype, device) -> dict:
    """Every network of a prior or decoder folder, built and given its weights."""
    networks = {}
    for component in FOLDERS[kind]:
        config_path = folder / component / "config.json"
        config = kandinsky_config(component, _read_json(config_path), config_path)
        module_class, config_class = NETWORKS[component]
        weights = _weights_path(folder / component, component, variant)
        state_dict = to_minisd(component, read_state_dict(weights))
        module_config = fields_from(config_class, config)
        check_sizes_within(f"{folder / component}", module_config, state_dict)  # before building: bounded work
        with torch.device("meta"):
            module = module_class(module_config)
        networks[component] = assign_weights(component, module, state_dict, dtype, device, "Kandinsky 2.2's")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():  # the samplers are minisd's own; a folder asking for another schedule is refused
        kandinsky_config(f"{kind}_scheduler", _read_json(scheduler_path), scheduler_path)
    return networks


def _weights_path(component_dir: Path, component: str, variant: str | None) -> Path:
    suffix = "" if variant is None else f".{variant}"
    candidates = [component_dir / name.format(v=suffix) for name in WEIGHT_FILES[component]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in component_dir.iterdir()) if component_dir.is_dir() else []
    raise MinisdError(
        f"{component_dir}: no weights file {' or '.join(c.name for c in candidates)} (variant={variant!r}; found: "
        f"{', '.join(found[:8]) or 'nothing'})"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MinisdError(f"{path}: missing (a diffusers folder has model_index.json and a config.json per part)")
    return read_config_file(path)  # bounded: size, nesting, a JSON object


def _readme_prior(decoder_folder: Path) -> str:
    """The prior a decoder's README.md names in its YAML front matter (`prior:` list), as diffusers reads it."""
    from huggingface_hub.repocard import metadata_load

    readme = decoder_folder / "README.md"
    try:
        metadata = metadata_load(readme) if readme.is_file() else None
    except Exception as error:  # yaml errors of a hand-edited card
        raise MinisdError(f"{readme}: its front matter is not valid YAML ({type(error).__name__})") from None
    priors = (metadata or {}).get("prior")
    if not isinstance(priors, list) or not priors or not isinstance(priors[0], str):
        raise MinisdError(
            f"{decoder_folder}: README.md names no prior (front matter `prior: [org/name]`); pass prior= a folder or "
            "hub id, or prior=None to give image_embeds yourself"
        )
    return priors[0]


def _tokenizer(prior_folder: Path) -> Tokenizer:
    vocab, merges = prior_folder / "tokenizer" / "vocab.json", prior_folder / "tokenizer" / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return Tokenizer.from_files(vocab, merges)
    return Tokenizer.from_default()  # the same OpenAI CLIP BPE vocabulary ViT-bigG's tokenizer uses


def _model_index(source: str | os.PathLike, local_files_only: bool) -> dict | None:
    """A folder's or hub id's model_index.json (downloading only it, or from the cache offline), or None."""
    path = Path(source)
    if path.is_dir():
        index_path = path / "model_index.json"
    elif HUB_ID.match(str(source)) and path.suffix not in WEIGHT_SUFFIXES:
        from huggingface_hub import snapshot_download

        from minisd.loading import _hub_cache_dir, _hub_offline

        offline = local_files_only or _hub_offline()
        index_path = None
        for cache_only in (True, False) if not offline else (True,):  # the cache first: no network call for an id
            try:  # found there (minisd.loading.hub_snapshot does the same)
                snapshot = snapshot_download(
                    str(source),
                    allow_patterns=["model_index.json"],
                    cache_dir=_hub_cache_dir(),
                    local_files_only=cache_only,
                )
                index_path = Path(snapshot) / "model_index.json"
                break
            except Exception:  # not cached, unreachable, no such repo: not known to be Kandinsky
                continue
        if index_path is None:
            return None
    else:
        return None
    try:
        return read_config_file(index_path)  # bounded: size, nesting, a JSON object
    except (OSError, MinisdError):
        return None
