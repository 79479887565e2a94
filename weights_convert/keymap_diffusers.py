"""Diffusers-format folders (`unet/`, `vae/`, `text_encoder/`) ↔ minisd names: nearly the identity.

minisd's module names ARE diffusers/transformers in-memory names, so only three historical differences remain:
- VAE files saved by older diffusers (before the `Attention` class, ~0.14) name the mid-block attention
  `query/key/value/proj_attn`, some with 1×1-conv shaped weights [c, c, 1, 1] (diffusers'
  `conv_attn_to_linear` squeezes them the same way);
- text-encoder files saved by transformers 4.x wrap every name in `text_model.` (transformers ≥ 5.6 dropped
  that level in memory) and, before 4.31, store the `embeddings.position_ids` buffer;
- nothing else: the UNet's names never changed.
"""

from collections.abc import Mapping

from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.configs import COMPONENTS

# Old diffusers VAE attention names -> today's (diffusers `AttentionBlock`, removed in 0.15).
LEGACY_VAE_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",  # slot 0 of [Linear, Dropout]
}
TEXT_MODEL_PREFIX = "text_model."  # the transformers 4.x CLIPTextModel wrapper level
POSITION_IDS = "embeddings.position_ids"  # arange(77) buffer; minisd computes positions in forward


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise MinisdError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")


def _vae_name(name: str) -> str:
    """`...mid_block.attentions.0.query.weight` -> `...mid_block.attentions.0.to_q.weight`; others unchanged."""
    head, _, tail = name.partition(".mid_block.attentions.0.")
    if not tail:
        return name
    module, _, param = tail.rpartition(".")
    return f"{head}.mid_block.attentions.0.{LEGACY_VAE_ATTENTION.get(module, module)}.{param}"


def diffusers_to_minisd(component: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename one diffusers-folder component's state dict to minisd names (tensors shared, no copy).

    component: "unet" (unchanged), "vae" (legacy attention names and conv-shaped attention weights fixed) or
    "text_encoder" (`text_model.` prefix and `position_ids` dropped).

    >>> import torch
    >>> sd = {"encoder.mid_block.attentions.0.query.weight": torch.zeros(8, 8, 1, 1)}
    >>> {k: tuple(v.shape) for k, v in diffusers_to_minisd("vae", sd).items()}
    {'encoder.mid_block.attentions.0.to_q.weight': (8, 8)}
    """
    _check_component(component)
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if component == "vae":
            name = _vae_name(name)
            if ".mid_block.attentions.0." in name and name.endswith(".weight") and tensor.ndim > 2:
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # [c, c, 1, 1] 1×1 conv -> [c, c] linear
        elif component == "text_encoder":
            name = name.removeprefix(TEXT_MODEL_PREFIX)
            if name == POSITION_IDS:
                continue
        out[name] = tensor
    return out


def minisd_to_diffusers(component: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename one minisd component for a diffusers folder: unet and vae unchanged; the text encoder gets the
    `text_model.` prefix every CLIPTextModel file on the Hub has (transformers 4.x and 5.x both load it).

    >>> import torch
    >>> list(minisd_to_diffusers("text_encoder", {"final_layer_norm.bias": torch.zeros(2)}))
    ['text_model.final_layer_norm.bias']
    """
    _check_component(component)
    if component == "text_encoder":
        return {TEXT_MODEL_PREFIX + name: tensor for name, tensor in state_dict.items()}
    return dict(state_dict)
