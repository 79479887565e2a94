"""SD 2.x's text encoder in an official single file (OpenCLIP ViT-H/14 names) ↔ minisd's TextEncoder, as data.

An SD 2 file (`v2-1_512-ema-pruned`, `v2-1_768-ema-pruned`, `512-inpainting-ema`) keeps the UNet and the VAE under
the v1 names (keymap_ldm.py) and its text encoder under `cond_stage_model.model.`: the state dict of open_clip's
CLIP model with the vision tower deleted (Stability-AI/stablediffusion `FrozenOpenCLIPEmbedder`). Below that
prefix, per block n (resblocks.n):

    official (open_clip)                    minisd / transformers CLIPTextModel
    token_embedding.weight                  embeddings.token_embedding.weight
    positional_embedding                    embeddings.position_embedding.weight        (a Parameter, same shape)
    transformer.resblocks.n.ln_1            encoder.layers.n.layer_norm1
    transformer.resblocks.n.attn.in_proj_*  encoder.layers.n.self_attn.{q,k,v}_proj     (q, k, v stacked in rows:
                                                                                          split in three, fused back)
    transformer.resblocks.n.attn.out_proj   encoder.layers.n.self_attn.out_proj
    transformer.resblocks.n.ln_2            encoder.layers.n.layer_norm2
    transformer.resblocks.n.mlp.c_fc        encoder.layers.n.mlp.fc1
    transformer.resblocks.n.mlp.c_proj      encoder.layers.n.mlp.fc2
    ln_final                                final_layer_norm

Kept aside (not loaded, written back unchanged by export; KEPT_ASIDE gives the reasons): the 24th block
`transformer.resblocks.23.*` (SD 2 reads the penultimate layer, so the block after it never runs; minisd's SD 2
text encoder has 23 layers, as diffusers' text_encoder/config.json), `text_projection` and `logit_scale` (CLIP's
contrastive head and temperature, not used to condition the UNet). Sources: open_clip `model.py` (CLIP,
ResidualAttentionBlock: torch's nn.MultiheadAttention with a fused in_proj); diffusers 0.42.1
`convert_open_clip_checkpoint` and SD_2_TEXT_ENCODER_KEYS_TO_IGNORE; the key lists in tests/data/sd2/.
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from minisd.errors import MinisdError

OPENCLIP_PREFIX = "cond_stage_model.model."
BLOCKS = 24  # OpenCLIP ViT-H's text blocks; SD 2 reads the output of block 23 (layer="penultimate")

# What an official SD 2 file holds below OPENCLIP_PREFIX that minisd does not load, and why.
KEPT_ASIDE = {
    "transformer.resblocks.23.*": "OpenCLIP's last block (the last one of any file): SD 2 conditions on the"
    " penultimate layer, so it never runs",
    "text_projection": "CLIP's contrastive projection of the end token into the image-text space; SD 2 reads the"
    " per-token states",
    "logit_scale": "CLIP's learned softmax temperature for its contrastive loss; a training scalar",
}


def _layer_names(n: int) -> list[tuple[str, str]]:
    """(official, minisd) names of block n's tensors that map one to one, in the official file's order."""
    pairs = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2")]
    pairs += [("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    return [
        (f"transformer.resblocks.{n}.{ours}.{p}", f"encoder.layers.{n}.{theirs}.{p}")
        for ours, theirs in pairs
        for p in ("weight", "bias")
    ]


def openclip_table(num_layers: int) -> dict[str, str]:
    """official name (below the prefix) -> minisd name, for everything but the fused q/k/v (split by hand).

    >>> openclip_table(23)["transformer.resblocks.4.mlp.c_fc.bias"]
    'encoder.layers.4.mlp.fc1.bias'
    """
    table = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    for n in range(num_layers):
        table.update(_layer_names(n))
    return table


def block_count(names) -> int:
    """How many OpenCLIP blocks (transformer.resblocks.n) the names below the prefix show: 24 in SD 2 files.

    >>> block_count(["transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.ln_1.weight"])
    2
    """
    blocks = {int(m.group(1)) for name in names if (m := re.match(r"transformer\.resblocks\.(\d+)\.", name))}
    if blocks != set(range(len(blocks))) or len(blocks) < 2:
        raise MinisdError(
            f"the OpenCLIP text encoder's blocks must be resblocks.0 … resblocks.n, n >= 1, got {sorted(blocks)[:30]}"
        )
    return len(blocks)


def is_kept_aside(name: str, blocks: int) -> bool:
    """Whether an official name below the prefix is one KEPT_ASIDE names (the last block, projection, scale)."""
    return name in ("text_projection", "logit_scale") or name.startswith(f"transformer.resblocks.{blocks - 1}.")


def openclip_to_minisd(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An official SD 2 file's text encoder (names below `cond_stage_model.model.`) -> (minisd TextEncoder state
    dict of every block but the last, 0 … 22 in SD 2; the tensors kept aside, under their full official names).

    q, k, v are row blocks of in_proj_weight (3d, d) and in_proj_bias (3d,): [q; k; v] (torch's
    nn.MultiheadAttention), taken as views (no copy). Raises MinisdError naming keys neither mapped nor kept aside.
    """
    blocks = block_count(state_dict)
    table = openclip_table(blocks - 1)
    text_encoder, aside, unknown = {}, {}, []
    for name, tensor in state_dict.items():
        if is_kept_aside(name, blocks):
            aside[OPENCLIP_PREFIX + name] = tensor
        elif name in table:
            text_encoder[table[name]] = tensor
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            if tensor.ndim != (2 if m.group(2) == "weight" else 1) or tensor.shape[0] % 3:
                raise MinisdError(
                    f"{OPENCLIP_PREFIX}{name} has shape {tuple(tensor.shape)}; a fused q, k, v is (3d, d) or (3d,)"
                )
            q, k, v = tensor.chunk(3, dim=0)  # [q; k; v] rows, views of the fused tensor
            for part, piece in zip("qkv", (q, k, v), strict=True):
                text_encoder[f"encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = piece
        else:
            unknown.append(OPENCLIP_PREFIX + name)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise MinisdError(
            f"{len(unknown)} key(s) of the OpenCLIP text encoder are neither mapped nor kept aside: {shown}"
        )
    return text_encoder, aside


def minisd_to_openclip(text_encoder: Mapping[str, Tensor], aside: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """minisd's SD 2 TextEncoder (and the tensors kept aside, full official names) -> the official names, in the
    file's order (open_clip's CLIP.state_dict(): its own parameters, then resblocks 0 … 23, token embedding,
    ln_final). q, k, v are stacked back into in_proj (a new tensor: equal values, so a round trip is bit-exact).
    What `aside` lacks (a diffusers folder has no 24th block) is left out; LDM's loader loads with strict=False."""
    n_layers = len({name.split(".")[2] for name in text_encoder if name.startswith("encoder.layers.")})
    table = openclip_table(n_layers)
    inverse = {ours: theirs for theirs, ours in table.items()}
    fused = {
        f"encoder.layers.{n}.self_attn.{p}_proj.{w}" for n in range(n_layers) for p in "qkv" for w in ("weight", "bias")
    }
    unknown = [name for name in text_encoder if name not in inverse and name not in fused]
    if unknown:
        raise MinisdError(f"{len(unknown)} key(s) of the text encoder have no OpenCLIP name: {', '.join(unknown[:5])}")
    out: dict[str, Tensor] = {}
    for name in ("positional_embedding", "text_projection", "logit_scale"):  # CLIP's own parameters come first
        if name == "positional_embedding":
            out[OPENCLIP_PREFIX + name] = text_encoder["embeddings.position_embedding.weight"]
        elif OPENCLIP_PREFIX + name in aside:
            out[OPENCLIP_PREFIX + name] = aside[OPENCLIP_PREFIX + name]
    for n in range(n_layers):
        prefix = f"encoder.layers.{n}."
        theirs = dict(_layer_names(n))
        out[f"{OPENCLIP_PREFIX}transformer.resblocks.{n}.ln_1.weight"] = text_encoder[prefix + "layer_norm1.weight"]
        out[f"{OPENCLIP_PREFIX}transformer.resblocks.{n}.ln_1.bias"] = text_encoder[prefix + "layer_norm1.bias"]
        for w in ("weight", "bias"):  # nn.MultiheadAttention: in_proj_weight, in_proj_bias, then out_proj
            qkv = [text_encoder[f"{prefix}self_attn.{p}_proj.{w}"] for p in "qkv"]
            out[f"{OPENCLIP_PREFIX}transformer.resblocks.{n}.attn.in_proj_{w}"] = torch.cat(qkv)
        for official, ours in theirs.items():
            if "ln_1" not in official:
                out[OPENCLIP_PREFIX + official] = text_encoder[ours]
    block = f"{OPENCLIP_PREFIX}transformer.resblocks.{n_layers}."  # the last block, when kept aside
    out.update({name: t for name, t in aside.items() if name.startswith(block)})
    out[OPENCLIP_PREFIX + "token_embedding.weight"] = text_encoder["embeddings.token_embedding.weight"]
    out[OPENCLIP_PREFIX + "ln_final.weight"] = text_encoder["final_layer_norm.weight"]
    out[OPENCLIP_PREFIX + "ln_final.bias"] = text_encoder["final_layer_norm.bias"]
    return out
