"""What is this file? Recognise an SD v1 or SD 2.x state dict's layout and variant from its key names and shapes,
and refuse what is neither.

Layouts (CheckpointInfo.layout):
    "ldm"                     the official single file: model.diffusion_model.* + first_stage_model.* +
                              cond_stage_model.transformer.* (SD v1: CompVis / runwayml releases, most community
                              models) or cond_stage_model.model.* (SD 2.x: Stability's OpenCLIP text encoder)
    "minisd"                  minisd's own single file: minisd names under unet.* / vae.* / text_encoder.*
    "diffusers-unet"          unet/diffusion_pytorch_model.safetensors of a diffusers folder
    "diffusers-vae"           vae/diffusion_pytorch_model.safetensors
    "diffusers-text-encoder"  text_encoder/model.safetensors (with or without transformers 4.x's `text_model.`)

Variants (CheckpointInfo.variant), from the UNet's input channels and the text context's width:
    "v1", "v1-inpainting"     768-wide CLIP context; a 9-channel UNet input for inpainting
    "v2", "v2-inpainting"     1024-wide OpenCLIP context (the UNet's attn2.to_k, the text encoder's width)
What a model predicts (CheckpointInfo.prediction_type) no key of an official file records: an SD 2 "v2" file holds
the same names and shapes whether it predicts ε (v2-1_512) or v (v2-1_768). Folders record it in their
scheduler_config, minisd's files in their metadata (folders.py); for the rest folders.prediction_of decides.

Refused with one line saying what was found: SDXL (`conditioner.embedders.*`, 2048-wide context), a file mixing an
SD v1 text encoder with an SD 2 UNet (or the reverse), a single file missing parts (UNet-only), files with no SD
keys. The files users add to a model (`file_kind`: a LoRA, a textual-inversion embedding, a VAE on its own) are
refused as models too, with the route that takes them (ROUTES).
"""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.keymap_ldm import (
    EMA_PREFIX,
    EMA_SCALARS,
    OLD_TEXT_ENCODER_PREFIX,
    POSITION_IDS,
    UNET_PREFIX,
    VAE_PREFIX,
)
from weights_convert.keymap_openclip import OPENCLIP_PREFIX

LAYOUT_NAMES = {  # what `info` prints beside the layout
    "ldm": "official single file (CompVis/LDM names)",
    "minisd": "minisd single file (unet.* vae.* text_encoder.*)",
    "diffusers": "diffusers-style folder",
}
# minisd's own single file: each component's minisd names under one prefix; the metadata says so.
MINISD_PREFIXES = {"unet": "unet.", "vae": "vae.", "text_encoder": "text_encoder."}
MINISD_METADATA = {"format": "pt", "minisd.layout": "minisd", "minisd.components": "unet,vae,text_encoder"}

# Where the cross-attention context width d_ctx is read (attn2.to_k maps d_ctx -> c): 768 SD v1, 1024 SD 2.x,
# 2048 SDXL.
CONTEXT_WIDTHS = {768: "v1", 1024: "v2"}
_LDM_TO_K = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_DIFFUSERS_TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
# The text encoder's width d: 768 CLIP ViT-L (SD v1), 1024 OpenCLIP ViT-H in CLIPTextModel form (SD 2.x folders).
_TEXT_WIDTH_KEYS = [
    prefix + "final_layer_norm.weight"
    for prefix in ("", "text_model.", "text_encoder.", "cond_stage_model.transformer.text_model.")
]
_CONV_IN = {"ldm": UNET_PREFIX + "input_blocks.0.0.weight", "minisd": "unet.conv_in.weight"}
_LDM_PARTS = {
    "unet": ((UNET_PREFIX,), "the UNet (model.diffusion_model.*)"),
    "vae": ((VAE_PREFIX,), "the VAE (first_stage_model.*)"),
    "text_encoder": ((OLD_TEXT_ENCODER_PREFIX, OPENCLIP_PREFIX), "the text encoder (cond_stage_model.*)"),
}


@dataclass
class CheckpointInfo:
    """What inspect_checkpoint found. parameter_counts and dtypes are per component ("unet", "vae",
    "text_encoder"; "unet_ema" for the EMA copy of a v1-5-pruned style file); dtypes name the float dtypes."""

    layout: str
    variant: str  # "v1", "v1-inpainting" (a 9-channel UNet input), "v2" or "v2-inpainting" (see the top)
    has_ema: bool  # a second, EMA copy of the UNet under model_ema.* (use_ema picks which one loads)
    parameter_counts: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    prediction_type: str | None = None  # what the source records (folders, minisd files); official files: None


# What a file that is no whole model is, and the way in that takes it.
ROUTES = {
    "lora": "a LoRA adapter: apply it with --lora FILE[:WEIGHT] (load_lora_weights in the Python API)",
    "embedding": "a textual-inversion embedding: --embedding FILE or an --embeddings folder (load_textual_inversion)",
    "vae": "a VAE on its own (like vae-ft-mse-840000): pass it with --vae FILE (vae= in from_pretrained)",
}


def file_kind(state_dict: Mapping[str, Tensor]) -> str | None:
    """ "lora", "embedding" or "vae" for the files users add to a model, read off names and shapes; None for others.

    >>> import torch
    >>> file_kind({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)})
    'lora'
    >>> file_kind({"<cat-toy>": torch.zeros(768)}), file_kind({"emb_params": torch.zeros(2, 768)})
    ('embedding', 'embedding')
    """
    names = list(state_dict)
    if any(n.startswith(("lora_", "lora.")) or ".lora_" in n or ".lora." in n for n in names):
        return "lora"
    if len(names) == 1 and state_dict[names[0]].dim() in (1, 2) and state_dict[names[0]].shape[-1] in (64, 768, 1024):
        return "embedding"  # {"<token>": (d,) or (n, d)}: diffusers / sd-concepts; {"emb_params": (n, d)}: A1111
    vae_names = [n.removeprefix(VAE_PREFIX) for n in names]
    ldm_vae = any(n.startswith("encoder.down.") for n in vae_names) and any(
        n.startswith("decoder.up.") for n in vae_names
    )
    if ldm_vae and not any(n.startswith((UNET_PREFIX, OLD_TEXT_ENCODER_PREFIX)) for n in names):
        return "vae"  # vae-ft-mse-840000-ema-pruned and its kind (diffusers' VAE files: the diffusers-vae layout)
    return None


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _refuse_other_models(state_dict: Mapping[str, Tensor], names: list[str]) -> None:
    kind = file_kind(state_dict)
    if kind is not None:
        raise MinisdError(f"this is {ROUTES[kind]}; it is not a whole SD v1 model")
    if any(n.startswith("conditioner.embedders.") for n in names):
        raise MinisdError("this is an SDXL checkpoint (conditioner.embedders.* keys); minisd loads SD v1 and SD 2.x")
    for key in (_LDM_TO_K, _DIFFUSERS_TO_K, "unet." + _DIFFUSERS_TO_K):
        if key in state_dict and state_dict[key].ndim == 2 and state_dict[key].shape[1] == 2048:
            raise MinisdError(f"this is an SDXL UNet (2048-wide text context in {key}); SD v1 uses 768, SD 2 1024")
    for key in _TEXT_WIDTH_KEYS:
        if key in state_dict and state_dict[key].ndim == 1 and state_dict[key].shape[0] == 1280:
            raise MinisdError(
                f"this is an SDXL (OpenCLIP ViT-bigG) text encoder (1280 wide, {key}); SD v1's CLIP is 768 wide, "
                "SD 2's OpenCLIP ViT-H 1024"
            )


def _layout(names: list[str]) -> str:
    present = {part for part, (prefixes, _) in _LDM_PARTS.items() if any(n.startswith(prefixes) for n in names)}
    if present:
        if len(present) < 3:
            found = " and ".join(_LDM_PARTS[p][1] for p in _LDM_PARTS if p in present)
            missing = " and ".join(_LDM_PARTS[p][1] for p in _LDM_PARTS if p not in present)
            raise MinisdError(f"incomplete SD single file: it has {found} but no {missing}")
        return "ldm"
    if all(any(n.startswith(prefix) for n in names) for prefix in MINISD_PREFIXES.values()):
        return "minisd"
    if "conv_in.weight" in names and any(n.startswith("time_embedding.") for n in names):
        return "diffusers-unet"
    if any(n.startswith("encoder.down_blocks.") for n in names) and any(n.startswith("decoder.") for n in names):
        return "diffusers-vae"
    if any(n.startswith(("text_model.embeddings.", "embeddings.token_embedding.")) for n in names):
        return "diffusers-text-encoder"
    raise MinisdError(f"no Stable Diffusion keys found ({len(names)} keys such as {_shown(names)})")


def _component_of(layout: str, name: str) -> str | None:
    """Which component a key belongs to (None: schedule buffers, EMA scalars, position ids)."""
    if layout == "ldm":
        if name.startswith(UNET_PREFIX):
            return "unet"
        if name.startswith(EMA_PREFIX):
            return None if name in EMA_SCALARS else "unet_ema"
        if name.startswith(VAE_PREFIX):
            return "vae"
        if name.startswith((OLD_TEXT_ENCODER_PREFIX, OPENCLIP_PREFIX)):
            return None if name.endswith(POSITION_IDS) else "text_encoder"
        return None
    if layout == "minisd":
        return next((c for c, p in MINISD_PREFIXES.items() if name.startswith(p)), None)
    if name.endswith(POSITION_IDS):
        return None
    return {"diffusers-unet": "unet", "diffusers-vae": "vae", "diffusers-text-encoder": "text_encoder"}[layout]


def family(state_dict: Mapping[str, Tensor], names: list[str]) -> str:
    """ "v1" or "v2": the text context's width, read where the layout keeps it (the UNet's attn2.to_k, the text
    encoder's width); SD 2 single files also by their OpenCLIP keys. A file whose parts disagree is refused."""
    seen = {}
    to_k_keys = (_LDM_TO_K, _DIFFUSERS_TO_K, "unet." + _DIFFUSERS_TO_K)
    for key in (*to_k_keys, *_TEXT_WIDTH_KEYS):
        if key in state_dict and state_dict[key].ndim == (2 if key in to_k_keys else 1):  # (c, d_ctx) or (d,)
            width = state_dict[key].shape[-1]
            if width in CONTEXT_WIDTHS:
                seen[key] = CONTEXT_WIDTHS[width]
    if any(n.startswith(OPENCLIP_PREFIX) for n in names):
        seen[OPENCLIP_PREFIX + "*"] = "v2"
    if any(n.startswith(OLD_TEXT_ENCODER_PREFIX) for n in names):
        seen[OLD_TEXT_ENCODER_PREFIX + "*"] = "v1"
    if len(set(seen.values())) > 1:
        parts = ", ".join(f"{key} says SD {'2' if v == 'v2' else 'v1'}" for key, v in seen.items())
        raise MinisdError(f"this file mixes SD v1 and SD 2 parts ({parts})")
    return next(iter(seen.values()), "v1")  # the tiny minisd-trained models (64-wide) are SD v1-shaped


def inspect_checkpoint(state_dict: Mapping[str, Tensor]) -> CheckpointInfo:
    """Recognise an SD v1 or SD 2 state dict: layout, variant, EMA, parameter counts, dtypes per component and,
    where the keys say it, the prediction type.

    Reads names and shapes only (works on meta tensors). Raises MinisdError (one line, saying what was found)
    for anything that is neither, or not a whole single file; see the module docstring.
    """
    names = list(state_dict)
    if not names:
        raise MinisdError("the checkpoint holds no tensors")
    _refuse_other_models(state_dict, names)
    layout = _layout(names)

    counts: Counter[str] = Counter()
    dtypes: dict[str, set[str]] = {}
    for name in names:
        component = _component_of(layout, name)
        if component is None:
            continue
        tensor = state_dict[name]
        counts[component] += tensor.numel()
        if tensor.is_floating_point():
            dtypes.setdefault(component, set()).add(str(tensor.dtype).removeprefix("torch."))

    variant = family(state_dict, names)
    conv_in = _CONV_IN.get(layout, "conv_in.weight")
    if conv_in in state_dict:
        if state_dict[conv_in].ndim != 4:
            raise MinisdError(f"{conv_in} has shape {tuple(state_dict[conv_in].shape)}; SD's has 4 dimensions")
        in_channels = state_dict[conv_in].shape[1]
        if in_channels not in (4, 9):
            raise MinisdError(f"UNet input has {in_channels} channels ({conv_in}); SD has 4, its inpainting UNets 9")
        variant += "-inpainting" if in_channels == 9 else ""
    return CheckpointInfo(
        layout=layout,
        variant=variant,
        has_ema=counts["unet_ema"] > 0,
        parameter_counts=dict(counts),
        dtypes={c: ",".join(sorted(d)) for c, d in dtypes.items()},
    )


def split_minisd_file(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """minisd's single file -> {"unet", "vae", "text_encoder"} state dicts (prefixes removed; no copy)."""
    components: dict[str, dict[str, Tensor]] = {c: {} for c in MINISD_PREFIXES}
    for name, tensor in state_dict.items():
        component = next((c for c, p in MINISD_PREFIXES.items() if name.startswith(p)), None)
        if component is None:
            raise MinisdError(
                f"key {name!r} has none of the minisd file prefixes {', '.join(MINISD_PREFIXES.values())}"
            )
        components[component][name.removeprefix(MINISD_PREFIXES[component])] = tensor
    return components


def join_minisd_file(components: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """{"unet", "vae", "text_encoder"} state dicts -> minisd's single file (component prefixes added)."""
    return {MINISD_PREFIXES[c] + name: t for c in MINISD_PREFIXES for name, t in components[c].items()}
