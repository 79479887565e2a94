"""The official single-file layout (CompVis / LDM names) ↔ minisd's module names, written as data.

An official checkpoint (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`, ...) is one flat state dict of a
`LatentDiffusion` object. Four top-level prefixes hold the parts:

    model.diffusion_model.                    the UNet            -> component "unet"
    first_stage_model.                        the VAE             -> component "vae"
    cond_stage_model.transformer.text_model.  CLIP ViT-L/14 text  -> component "text_encoder"   (SD v1)
    cond_stage_model.model.                   OpenCLIP ViT-H text -> component "text_encoder"   (SD 2.x:
                                                                     keymap_openclip.py)
    model_ema.                                LitEma: decay, num_updates and (v1-5-pruned only) an EMA UNet copy

SD 2.x files use the same UNet and VAE names (only some shapes differ: Linear proj_in/proj_out, a 1024-wide
context), so the tables below serve both families. official.py converts whole files both ways with them.

minisd's module names equal diffusers/transformers in-memory names, so below each prefix the map is a table of
renames per level of the network (a UNet level = one `down_blocks.i` / `up_blocks.i`). The tables are built by
small functions from the sizes that shape the numbering (number of levels, resnets per level, which levels have
attention), because the LDM numbers blocks in one flat list (`input_blocks.4.1`) where diffusers nests them
(`down_blocks.1.attentions.0`). Everything else in a file is either in IGNORED (with the reason) or an error.

Sources: CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel),
`ldm/modules/diffusionmodules/model.py` (Encoder/Decoder), `ldm/modules/ema.py` (LitEma), transformers 4.19
CLIPTextModel; the key lists in tests/data/sd15/*.json and tests/data/sd2/*.json.
"""

import re

from minisd.errors import MinisdError
from weights_convert.configs import count

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
        name: "DDPM schedule buffer: minisd recomputes it from minisd.samplers.schedule (SD's fixed β schedule)"
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


def ldm_unet_layout(names) -> tuple[int, int, tuple[int, ...]]:
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


def clip_layers(names) -> int:
    return count(names, "encoder.layers") or 12


def ema_name(ldm_unet_key: str) -> str:
    """Where LitEma keeps the EMA copy of a UNet parameter: `model_ema.` + the key without `model.`, dots deleted.

    >>> ema_name("model.diffusion_model.input_blocks.0.0.weight")
    'model_ema.diffusion_modelinput_blocks00weight'
    """
    return EMA_PREFIX + ldm_unet_key.removeprefix("model.").replace(".", "")


def unknown_keys_error(unknown: list[str], what: str) -> MinisdError:
    shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
    return MinisdError(f"{len(unknown)} key(s) {what} are neither mapped nor ignored by the SD key map: {shown}")
