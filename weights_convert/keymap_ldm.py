"""The official SD v1 single-file layout (CompVis / LDM names) ↔ minisd's module names, written as data.

An official checkpoint (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`, ...) is one flat state dict of a
`LatentDiffusion` object. Four top-level prefixes hold the parts:

    model.diffusion_model.                    the UNet            -> component "unet"
    first_stage_model.                        the VAE             -> component "vae"
    cond_stage_model.transformer.text_model.  CLIP ViT-L/14 text  -> component "text_encoder"
    model_ema.                                LitEma: decay, num_updates and (v1-5-pruned only) an EMA UNet copy

minisd's module names equal diffusers/transformers in-memory names, so below each prefix the map is a table of
renames per level of the network (a UNet level = one `down_blocks.i` / `up_blocks.i`). The tables are built by
small functions from the sizes that shape the numbering (number of levels, resnets per level, which levels have
attention), because the LDM numbers blocks in one flat list (`input_blocks.4.1`) where diffusers nests them
(`down_blocks.1.attentions.0`). Everything else in a file is either in IGNORED (with the reason) or an error.

Sources: CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel),
`ldm/modules/diffusionmodules/model.py` (Encoder/Decoder), `ldm/modules/ema.py` (LitEma), transformers 4.19
CLIPTextModel; the key lists in tests/data/sd15/*.json.
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from minisd.errors import MinisdError
from minisd.samplers.schedule import alphas_cumprod_from_betas, scaled_linear_betas
from weights_convert.configs import COMPONENTS, count

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
# Checkpoints saved with transformers < 4.19 lack CLIPTextModel's `text_model.` level (webui renames them too).
OLD_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
POSITION_IDS = "embeddings.position_ids"  # below the text-encoder prefix

# The 12 DDPM buffers LatentDiffusion.register_schedule stores (CompVis ldm/models/diffusion/ddpm.py), in file order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")

# Keys of an official file that minisd does not load, and why. A key that is neither here nor in a table raises.
IGNORED = {
    **{
        name: "DDPM schedule buffer: minisd recomputes it from minisd.samplers.schedule (SD v1's fixed β schedule)"
        for name in SCHEDULE_BUFFERS
    },
    "model_ema.decay": "LitEma training state (the EMA rate 0.9999), not a weight",
    "model_ema.num_updates": "LitEma training state (a step counter), not a weight",
    "model_ema.<flattened UNet name>": "the EMA copy of the UNet, skipped when use_ema=False (the raw UNet is used)",
    "model.diffusion_model.*": "the raw (non-EMA) UNet, skipped when use_ema=True and the file has an EMA copy",
    TEXT_ENCODER_PREFIX + POSITION_IDS: "arange(77) buffer of old transformers; minisd computes positions in forward"
    " (community re-saves store it as float, so its value is never read)",
}

# ---------------------------------------------------------------------------------------------------------------
# The renames, one small table per kind of block: (LDM name inside the block, minisd name inside the block).


def _weight_bias(ldm: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{ldm}.weight", f"{ours}.weight"), (f"{ldm}.bias", f"{ours}.bias")]


# LDM ResBlock -> diffusers ResnetBlock2D. The numbers are Sequential slots: in_layers = [GroupNorm, SiLU, Conv],
# emb_layers = [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv].
UNET_RESNET = [
    *_weight_bias("in_layers.0", "norm1"),
    *_weight_bias("in_layers.2", "conv1"),
    *_weight_bias("emb_layers.1", "time_emb_proj"),
    *_weight_bias("out_layers.0", "norm2"),
    *_weight_bias("out_layers.3", "conv2"),
    *_weight_bias("skip_connection", "conv_shortcut"),  # 1×1 conv, only where the channel count changes
]

# SpatialTransformer: LDM and diffusers use the same names inside it (diffusers copied them). `to_out.0` and
# `ff.net.2` keep the index of their Sequential (the dropout sits in slot 1); q/k/v have no bias.
_ATTENTION = ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"]
SPATIAL_TRANSFORMER = [
    (name, name)
    for name in [
        "norm.weight",
        "norm.bias",
        "proj_in.weight",  # 1×1 conv [c, c, 1, 1] in SD v1 (diffusers use_linear_projection=False)
        "proj_in.bias",
        *[f"transformer_blocks.0.attn1.{p}" for p in _ATTENTION],  # SD v1: one transformer block per level
        "transformer_blocks.0.ff.net.0.proj.weight",  # GEGLU's projection to 2 × 4c
        "transformer_blocks.0.ff.net.0.proj.bias",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.0.ff.net.2.bias",
        *[f"transformer_blocks.0.attn2.{p}" for p in _ATTENTION],
        *[f"transformer_blocks.0.norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")],
        "proj_out.weight",
        "proj_out.bias",
    ]
]

# VAE ResnetBlock: same names except the shortcut.
VAE_RESNET = [
    *_weight_bias("norm1", "norm1"),
    *_weight_bias("conv1", "conv1"),
    *_weight_bias("norm2", "norm2"),
    *_weight_bias("conv2", "conv2"),
    *_weight_bias("nin_shortcut", "conv_shortcut"),  # "network-in-network" = 1×1 conv where channels change
]

# VAE mid-block AttnBlock: LDM uses 1×1 convs [c, c, 1, 1]; diffusers' Attention uses linears [c, c].
VAE_ATTENTION = [
    *_weight_bias("norm", "group_norm"),
    *_weight_bias("q", "to_q"),
    *_weight_bias("k", "to_k"),
    *_weight_bias("v", "to_v"),
    *_weight_bias("proj_out", "to_out.0"),  # slot 0 of diffusers' [Linear, Dropout]
]
VAE_CONV_TO_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")  # squeeze [c,c,1,1] -> [c,c]

# One CLIP encoder layer: names equal (transformers on both sides), listed so unknown keys are caught.
CLIP_LAYER = [
    (name, name)
    for module in [
        *["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1"],
        *["mlp.fc1", "mlp.fc2", "layer_norm2"],
    ]
    for name in (f"{module}.weight", f"{module}.bias")
]


def _add(table: dict[str, str], ldm: str, ours: str, block: list[tuple[str, str]]) -> None:
    for ldm_name, our_name in block:
        table[f"{ldm}.{ldm_name}"] = f"{ours}.{our_name}"


# ---------------------------------------------------------------------------------------------------------------
# The tables for whole networks. Defaults are SD v1's sizes; tiny test models use fewer levels or blocks.


def unet_table(num_levels: int = 4, layers_per_block: int = 2, attention_levels: tuple[int, ...] = (0, 1, 2)):
    """LDM UNet name (below `model.diffusion_model.`) -> minisd UNet name, for every possible parameter.

    LDM counts blocks in one flat list per side; each entry is a Sequential whose slot 0 is a ResBlock (or the
    Downsample), slot 1 the SpatialTransformer (or the Upsample), slot 2 the Upsample.

        input_blocks.0.0                      conv_in
        input_blocks.{1 + i·(L+1) + j}.0/1   down_blocks.i.resnets.j / .attentions.j     (j < L)
        input_blocks.{(i+1)·(L+1)}.0.op      down_blocks.i.downsamplers.0.conv            (not the last level)
        middle_block.0 / 1 / 2               mid_block.resnets.0 / attentions.0 / resnets.1
        output_blocks.{i·(L+1) + j}.0/1      up_blocks.i.resnets.j / .attentions.j        (j ≤ L)
        output_blocks.{i·(L+1) + L}.1or2.conv  up_blocks.i.upsamplers.0.conv              (not the last level)

    >>> table = unet_table()
    >>> table["input_blocks.4.1.proj_in.weight"], table["output_blocks.5.2.conv.bias"]
    ('down_blocks.1.attentions.0.proj_in.weight', 'up_blocks.1.upsamplers.0.conv.bias')
    """
    L = layers_per_block
    up_attention_levels = [num_levels - 1 - i for i in attention_levels]  # the up path mirrors the down path
    table: dict[str, str] = {}
    _add(table, "time_embed", "time_embedding", [*_weight_bias("0", "linear_1"), *_weight_bias("2", "linear_2")])
    _add(table, "input_blocks.0", "conv_in", [("0.weight", "weight"), ("0.bias", "bias")])
    for i in range(num_levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            _add(table, f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", UNET_RESNET)
            if i in attention_levels:
                _add(table, f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", SPATIAL_TRANSFORMER)
        if i < num_levels - 1:
            n = (i + 1) * (L + 1)
            _add(table, f"input_blocks.{n}.0", f"down_blocks.{i}.downsamplers.0", _weight_bias("op", "conv"))
    _add(table, "middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    _add(table, "middle_block.1", "mid_block.attentions.0", SPATIAL_TRANSFORMER)
    _add(table, "middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    for i in range(num_levels):
        has_attention = i in up_attention_levels
        for j in range(L + 1):  # the up path has one more resnet per level (it eats the extra skip)
            n = i * (L + 1) + j
            _add(table, f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", UNET_RESNET)
            if has_attention:
                _add(table, f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", SPATIAL_TRANSFORMER)
        if i < num_levels - 1:
            slot = 2 if has_attention else 1
            n = i * (L + 1) + L
            _add(table, f"output_blocks.{n}.{slot}", f"up_blocks.{i}.upsamplers.0", _weight_bias("conv", "conv"))
    table.update(
        {f"out.{ldm}": ours for ldm, ours in [*_weight_bias("0", "conv_norm_out"), *_weight_bias("2", "conv_out")]}
    )
    return table


def vae_table(num_levels: int = 4, layers_per_block: int = 2):
    """LDM VAE name (below `first_stage_model.`) -> minisd VAE name, for every possible parameter.

        {encoder,decoder}.norm_out          conv_norm_out
        encoder.down.i.block.j              encoder.down_blocks.i.resnets.j
        encoder.down.i.downsample.conv      encoder.down_blocks.i.downsamplers.0.conv
        {encoder,decoder}.mid.block_1/2     mid_block.resnets.0/1
        {encoder,decoder}.mid.attn_1        mid_block.attentions.0
        decoder.up.k.block.j                decoder.up_blocks.(levels−1−k).resnets.j   (LDM counts up levels from
        decoder.up.k.upsample.conv          decoder.up_blocks.(levels−1−k).upsamplers.0.conv   the output side)

    >>> vae_table()["decoder.up.3.block.0.conv1.weight"]
    'decoder.up_blocks.0.resnets.0.conv1.weight'
    """
    table: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        _add(table, side, side, [*_weight_bias("conv_in", "conv_in")])
        if side == "encoder":
            for i in range(num_levels):
                for j in range(layers_per_block):
                    _add(table, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
                if i < num_levels - 1:
                    _add(table, f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0",
                         _weight_bias("conv", "conv"))  # fmt: skip
        _add(table, f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET)
        _add(table, f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION)
        _add(table, f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET)
        if side == "decoder":
            for k in range(num_levels):  # LDM order: up.0 (full resolution) first
                i = num_levels - 1 - k
                for j in range(layers_per_block + 1):
                    _add(table, f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET)
                if k > 0:
                    _add(table, f"decoder.up.{k}.upsample", f"decoder.up_blocks.{i}.upsamplers.0",
                         _weight_bias("conv", "conv"))  # fmt: skip
        _add(table, side, side, [*_weight_bias("norm_out", "conv_norm_out"), *_weight_bias("conv_out", "conv_out")])
    _add(table, "quant_conv", "quant_conv", [("weight", "weight"), ("bias", "bias")])
    _add(table, "post_quant_conv", "post_quant_conv", [("weight", "weight"), ("bias", "bias")])
    return table


def text_encoder_table(num_hidden_layers: int = 12):
    """LDM CLIP name (below `cond_stage_model.transformer.text_model.`) -> minisd TextEncoder name (identical).

    >>> text_encoder_table()["encoder.layers.3.self_attn.q_proj.weight"]
    'encoder.layers.3.self_attn.q_proj.weight'
    """
    table = {name: name for name in ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]}
    for n in range(num_hidden_layers):
        _add(table, f"encoder.layers.{n}", f"encoder.layers.{n}", CLIP_LAYER)
    _add(table, "final_layer_norm", "final_layer_norm", [("weight", "weight"), ("bias", "bias")])
    return table


# ---------------------------------------------------------------------------------------------------------------
# Reading the sizes that shape the numbering off the keys themselves (so tiny test models map too).


def _indices(names, pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for name in names if (m := regex.match(name))}


def _ldm_unet_layout(names) -> tuple[int, int, tuple[int, ...]]:
    blocks = _indices(names, r"input_blocks\.(\d+)\.")
    if not blocks:
        return 4, 2, (0, 1, 2)
    num_levels = len(_indices(names, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    L = (max(blocks) + 1) // num_levels - 1  # input_blocks count = levels · (L + 1)
    attention = tuple(i for i in range(num_levels) if f"input_blocks.{1 + i * (L + 1)}.1.norm.weight" in names)
    return num_levels, L, attention


def minisd_unet_layout(names) -> tuple[int, int, tuple[int, ...]]:
    levels = count(names, "down_blocks")
    if not levels:
        return 4, 2, (0, 1, 2)
    attention = tuple(i for i in range(levels) if f"down_blocks.{i}.attentions.0.norm.weight" in names)
    return levels, count(names, "down_blocks.0.resnets"), attention


def vae_layout(names, ldm: bool) -> tuple[int, int]:
    levels, blocks = (
        ("encoder.down", "encoder.down.0.block") if ldm else ("encoder.down_blocks", "encoder.down_blocks.0.resnets")
    )
    if not count(names, levels):
        return 4, 2
    return count(names, levels), count(names, blocks)


def _clip_layers(names) -> int:
    return count(names, "encoder.layers") or 12


def ema_name(ldm_unet_key: str) -> str:
    """Where LitEma keeps the EMA copy of a UNet parameter: `model_ema.` + the key without `model.`, dots deleted.

    >>> ema_name("model.diffusion_model.input_blocks.0.0.weight")
    'model_ema.diffusion_modelinput_blocks00weight'
    """
    return EMA_PREFIX + ldm_unet_key.removeprefix("model.").replace(".", "")


def unknown_keys_error(unknown: list[str], what: str) -> MinisdError:
    shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
    return MinisdError(f"{len(unknown)} key(s) {what} are neither mapped nor ignored by the SD v1 key map: {shown}")


# ---------------------------------------------------------------------------------------------------------------
# The two directions.


def ldm_to_minisd(state_dict: Mapping[str, Tensor], *, use_ema: bool = True) -> dict[str, dict[str, Tensor]]:
    """Split an official SD v1 state dict into minisd components {"unet", "vae", "text_encoder"}.

    Tensors are shared with the input (no copy); only the VAE mid-attention 1×1 conv weights are viewed as
    linears. use_ema: in a file holding both UNets (`v1-5-pruned`), take the EMA copy (True, best for sampling)
    or the raw weights (False, for fine-tuning); files with one UNet (`-emaonly`, inpainting) hold the EMA
    weights under `model.diffusion_model.` already, so use_ema changes nothing there.
    Raises MinisdError naming the first keys that are neither mapped nor in IGNORED.
    """
    names = list(state_dict)
    ema_copies = [n for n in names if n.startswith(EMA_PREFIX) and n not in EMA_SCALARS]
    unet_names = [n.removeprefix(UNET_PREFIX) for n in names if n.startswith(UNET_PREFIX)]
    vae_names = [n.removeprefix(VAE_PREFIX) for n in names if n.startswith(VAE_PREFIX)]
    clip_prefix = OLD_TEXT_ENCODER_PREFIX
    if any(n.startswith(TEXT_ENCODER_PREFIX) for n in names):
        clip_prefix = TEXT_ENCODER_PREFIX
    clip_names = [n.removeprefix(clip_prefix) for n in names if n.startswith(clip_prefix)]

    tables = {
        "unet": unet_table(*_ldm_unet_layout(unet_names)),
        "vae": vae_table(*vae_layout(vae_names, ldm=True)),
        "text_encoder": text_encoder_table(_clip_layers(clip_names)),
    }
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": clip_prefix}
    components: dict[str, dict[str, Tensor]] = {c: {} for c in COMPONENTS}
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


def schedule_buffers(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The 12 DDPM buffers an official file stores, recomputed: float64 math as LatentDiffusion.register_schedule
    does it (v_posterior = 0), rounded to float32 as stored there, then cast to `dtype` (fp16 files are fp32
    files halved). Each (1000,).
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
    components: Mapping[str, Mapping[str, Tensor]], *, model_ema_scalars: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Write minisd components {"unet", "vae", "text_encoder"} back as one official SD v1 state dict.

    The result has the official key set of an `-emaonly` file, in the official order: the 12 schedule buffers
    (recomputed, in the UNet's float dtype), the UNet under `model.diffusion_model.`, the VAE (mid-attention
    weights back to [c, c, 1, 1] 1×1 convs), CLIP with `embeddings.position_ids` = arange(77) int64. What
    cannot be rebuilt is left out unless given: `model_ema.decay` / `model_ema.num_updates` (LitEma training
    state; pass the file's own as model_ema_scalars to keep them), and a second (non-EMA) UNet copy.
    Tensors are shared with the input (views, no copy).
    """
    missing = [c for c in COMPONENTS if c not in components]
    if missing:
        raise MinisdError(f"an official SD v1 file needs components {', '.join(COMPONENTS)}; missing {missing}")
    unet, vae, clip = components["unet"], components["vae"], components["text_encoder"]
    float_dtype = next((t.dtype for t in unet.values() if t.is_floating_point()), torch.float32)

    out: dict[str, Tensor] = dict(schedule_buffers(float_dtype))
    for component, prefix, table in (
        ("unet", UNET_PREFIX, unet_table(*minisd_unet_layout(unet))),
        ("vae", VAE_PREFIX, vae_table(*vae_layout(vae, ldm=False))),
        ("text_encoder", TEXT_ENCODER_PREFIX, text_encoder_table(_clip_layers(clip))),
    ):
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
        if component == "unet" and model_ema_scalars:
            for name in EMA_SCALARS:
                if name in model_ema_scalars:
                    out[name] = model_ema_scalars[name]
    return out
