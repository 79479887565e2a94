"""An official single file ↔ minisd's components, both ways, for SD v1 and SD 2.x: the tables of keymap_ldm.py (UNet,
VAE, CLIP) and keymap_openclip.py (SD 2's text encoder) applied to whole files.

    ldm_to_minisd(state_dict)       official file -> {"unet", "vae", "text_encoder"} (views, no copy)
    kept_tensors(state_dict)        what minisd does not load but writes back on export: LitEma's two scalars, and
                                    SD 2's unused OpenCLIP tensors (its last block, text_projection, logit_scale)
    minisd_to_ldm(components)       -> the official file (with `kept`: the very file, bit for bit)
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from minisd.errors import MinisdError
from minisd.samplers.schedule import alphas_cumprod_from_betas, scaled_linear_betas
from weights_convert.configs import COMPONENTS
from weights_convert.keymap_ldm import (
    EMA_PREFIX,
    EMA_SCALARS,
    IGNORED,
    OLD_TEXT_ENCODER_PREFIX,
    POSITION_IDS,
    SCHEDULE_BUFFERS,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_CONV_TO_LINEAR,
    VAE_PREFIX,
    clip_layers,
    ema_name,
    ldm_unet_layout,
    minisd_unet_layout,
    text_encoder_table,
    unet_table,
    unknown_keys_error,
    vae_layout,
    vae_table,
)
from weights_convert.keymap_openclip import OPENCLIP_PREFIX, minisd_to_openclip, openclip_to_minisd


def is_openclip(names) -> bool:
    """Whether an official file's text encoder is OpenCLIP's (SD 2.x: `cond_stage_model.model.*`)."""
    return any(name.startswith(OPENCLIP_PREFIX) for name in names)


def ldm_to_minisd(state_dict: Mapping[str, Tensor], *, use_ema: bool = True) -> dict[str, dict[str, Tensor]]:
    """Split an official SD v1 or SD 2 state dict into minisd components {"unet", "vae", "text_encoder"}.

    Tensors are shared with the input (no copy); only the VAE mid-attention 1×1 conv weights are viewed as
    linears, and SD 2's fused q/k/v split into row views. use_ema: in a file holding both UNets (`v1-5-pruned`),
    take the EMA copy (True, best for sampling) or the raw weights (False, for fine-tuning); files with one UNet
    (`-emaonly`, `-ema-pruned`, inpainting) hold the EMA weights under `model.diffusion_model.` already, so
    use_ema changes nothing there. SD 2's OpenCLIP tensors that minisd does not load are skipped here
    (kept_tensors returns them). Raises MinisdError naming the first keys that are neither mapped nor in IGNORED.
    """
    names = list(state_dict)
    ema_copies = [n for n in names if n.startswith(EMA_PREFIX) and n not in EMA_SCALARS]
    unet_names = [n.removeprefix(UNET_PREFIX) for n in names if n.startswith(UNET_PREFIX)]
    vae_names = [n.removeprefix(VAE_PREFIX) for n in names if n.startswith(VAE_PREFIX)]
    components: dict[str, dict[str, Tensor]] = {c: {} for c in COMPONENTS}
    if is_openclip(names):  # SD 2: the text encoder by keymap_openclip, q/k/v split there
        below = {n.removeprefix(OPENCLIP_PREFIX): state_dict[n] for n in names if n.startswith(OPENCLIP_PREFIX)}
        components["text_encoder"], _ = openclip_to_minisd(below)
        clip_prefix, clip_table = OPENCLIP_PREFIX, {}
    else:
        clip_prefix = (
            TEXT_ENCODER_PREFIX if any(n.startswith(TEXT_ENCODER_PREFIX) for n in names) else OLD_TEXT_ENCODER_PREFIX
        )
        clip_table = text_encoder_table(
            clip_layers([n.removeprefix(clip_prefix) for n in names if n.startswith(clip_prefix)])
        )

    tables = {
        "unet": unet_table(*ldm_unet_layout(unet_names)),
        "vae": vae_table(*vae_layout(vae_names, ldm=True)),
        "text_encoder": clip_table,
    }
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": clip_prefix}
    unknown = []
    take_ema = use_ema and bool(ema_copies)
    ema_used = set()
    for name in names:
        component = next((c for c in COMPONENTS if name.startswith(prefixes[c])), None)
        if component is None:
            # EMA copies are read below through ema_name() (use_ema) or skipped (IGNORED); leftovers are caught
            # after the loop.
            if name not in IGNORED and not name.startswith(EMA_PREFIX):
                unknown.append(name)
            continue
        if component == "text_encoder" and clip_prefix == OPENCLIP_PREFIX:
            continue  # mapped above
        inner = name.removeprefix(prefixes[component])
        if component == "text_encoder" and inner == POSITION_IDS:
            continue  # IGNORED: minisd makes positions in forward
        ours = tables[component].get(inner)
        if ours is None:
            unknown.append(name)
            continue
        tensor = state_dict[name]
        if component == "unet" and take_ema:
            ema_key = ema_name(name)
            if ema_key not in state_dict:
                raise MinisdError(f"use_ema=True but the EMA copy of {name} ({ema_key}) is missing from the file")
            tensor = state_dict[ema_key]
            ema_used.add(ema_key)
        if component == "vae" and ours.endswith(VAE_CONV_TO_LINEAR) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # [c, c, 1, 1] 1×1 conv -> [c, c] linear
        components[component][ours] = tensor
    if take_ema:
        unknown += [n for n in ema_copies if n not in ema_used]
    if unknown:
        raise unknown_keys_error(unknown, "in the checkpoint")
    return components


def kept_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of an official file that minisd does not load but minisd_to_ldm writes back (full names): LitEma's
    decay and num_updates, and SD 2's unused OpenCLIP tensors (keymap_openclip.KEPT_ASIDE)."""
    kept = {name: state_dict[name] for name in EMA_SCALARS if name in state_dict}
    if is_openclip(state_dict):
        below = {n.removeprefix(OPENCLIP_PREFIX): t for n, t in state_dict.items() if n.startswith(OPENCLIP_PREFIX)}
        kept.update(openclip_to_minisd(below)[1])
    return kept


def schedule_buffers(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 12 DDPM buffers an official file stores, recomputed: float64 math as LatentDiffusion.register_schedule
    does it (v_posterior = 0), rounded to float32 as stored there, then cast to `dtype` (fp16 files are fp32
    files halved). Each (1000,). The same in SD v1 and SD 2 files (v2-inference.yaml: the same β, linear_start
    0.00085, linear_end 0.012; a v-prediction model registers no other persistent buffer).
    """
    betas = scaled_linear_betas()
    alphas = 1.0 - betas
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # DDPM eq. 7's β̃_t
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),  # β̃_0 = 0: clip before log
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),  # DDPM eq. 7's μ̃_t
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: values[name].to(torch.float32).to(dtype) for name in SCHEDULE_BUFFERS}


def minisd_to_ldm(
    components: Mapping[str, Mapping[str, Tensor]], *, variant: str = "v1", kept: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Write minisd components {"unet", "vae", "text_encoder"} back as one official state dict.

    variant: "v1"/"v1-inpainting" (CLIP under `cond_stage_model.transformer.text_model.`, with
    `embeddings.position_ids` = arange(77) int64) or "v2"/"v2-inpainting" (OpenCLIP under
    `cond_stage_model.model.`, q/k/v fused back). The result has the official key set of an `-emaonly` /
    `-ema-pruned` file, in the official order: the 12 schedule buffers (recomputed, in the UNet's float dtype), the
    UNet under `model.diffusion_model.`, the VAE (mid-attention weights back to [c, c, 1, 1] 1×1 convs), the text
    encoder. What cannot be rebuilt is left out unless given in `kept` (kept_tensors of the source file):
    `model_ema.decay` / `model_ema.num_updates`, and SD 2's unused OpenCLIP tensors; a second (non-EMA) UNet copy
    is never written. Tensors are shared with the input (views, no copy), except SD 2's fused in_proj.
    """
    missing = [c for c in COMPONENTS if c not in components]
    if missing:
        raise MinisdError(f"an official SD file needs components {', '.join(COMPONENTS)}; missing {missing}")
    if variant not in ("v1", "v1-inpainting", "v2", "v2-inpainting"):
        raise MinisdError(f"variant must be v1, v1-inpainting, v2 or v2-inpainting, got {variant!r}")
    kept = kept or {}
    unet, vae, clip = components["unet"], components["vae"], components["text_encoder"]
    float_dtype = next((t.dtype for t in unet.values() if t.is_floating_point()), torch.float32)

    out: dict[str, Tensor] = dict(schedule_buffers(float_dtype))
    sd2 = variant.startswith("v2")
    for component, prefix, table in (
        ("unet", UNET_PREFIX, unet_table(*minisd_unet_layout(unet))),
        ("vae", VAE_PREFIX, vae_table(*vae_layout(vae, ldm=False))),
        ("text_encoder", TEXT_ENCODER_PREFIX, {} if sd2 else text_encoder_table(clip_layers(clip))),
    ):
        if component == "text_encoder" and sd2:
            out.update(minisd_to_openclip(clip, {n: t for n, t in kept.items() if n.startswith(OPENCLIP_PREFIX)}))
            continue
        state_dict = components[component]
        inverse = {ours: ldm for ldm, ours in table.items()}
        unknown = [name for name in state_dict if name not in inverse]
        if unknown:
            raise unknown_keys_error(unknown, f"of component {component!r}")
        if component == "text_encoder":
            out[prefix + POSITION_IDS] = torch.arange(77, dtype=torch.int64)[None]  # (1, 77), as transformers 4.19
        for ours, ldm in inverse.items():  # table order = the official file's order
            if ours not in state_dict:
                continue
            tensor = state_dict[ours]
            if component == "vae" and ours.endswith(VAE_CONV_TO_LINEAR) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # [c, c] linear -> [c, c, 1, 1] 1×1 conv
            out[prefix + ldm] = tensor
        if component == "unet":
            out.update({name: kept[name] for name in EMA_SCALARS if name in kept})  # LitEma: after the model
    return out
