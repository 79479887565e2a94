"""LoRA files -> one form: for each adapted layer of the UNet or the text encoder, its minisd module path, the two
low-rank factors A (down) and B (up), and alpha. minisd.lora applies them: W' = W + scale · (alpha / rank) · B A.

    format            one adapted layer's keys                                      factors, alpha
    kohya / A1111     lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight  A: (r, in) or (r, in, kh, kw)
    (sd-scripts,      lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight    B: (out, r) or (out, r, 1, 1)
     LyCORIS LoCon)   lora_unet_down_blocks_0_attentions_0_proj_in.alpha             a scalar; none stored: rank
                      lora_te_text_model_encoder_layers_0_self_attn_q_proj.…         (the text encoder)
    diffusers / PEFT  unet.down_blocks.0.attentions.0.proj_in.lora_A.weight          A
                      unet.down_blocks.0.attentions.0.proj_in.lora_B.weight          B
                      text_encoder.[text_model.]encoder.layers.0.self_attn.q_proj.lora_A.weight
                      alpha: the file's "lora_adapter_metadata" (unet.lora_alpha, unet.alpha_pattern, …); none: rank

kohya's names are module paths with every "." written "_": diffusers' paths for SD v1 (sd-scripts trains on a
diffusers-style UNet), or the LDM paths of the official file (`lora_unet_input_blocks_4_1_proj_in`) from other
trainers. "_" also occurs inside names (`transformer_blocks`, `to_q`), so a key is not split by rule: it is looked up
in a table of every module path of the network, written both ways. LoCon adds the convolutions (the ResNets' conv1 and
conv2, conv_shortcut, time_emb_proj, the down- and upsamplers' convs): 3×3 factors A (r, in, 3, 3), B (out, r, 1, 1).

Refused in one line: LyCORIS' other networks (LoHa `hada_*`, LoKr `lokr_*`, LoCon's Tucker `lora_mid`, DoRA
`dora_scale`), SDXL LoRAs (`lora_te1_`/`lora_te2_`, `text_encoder_2.`), keys of no known form, modules SD v1 lacks.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from minisd.errors import MinisdError
from weights_convert.keymap_ldm import minisd_unet_layout, unet_table

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up"}
OTHER_NETWORKS = {  # key fragment -> what it is
    "hada_": "a LyCORIS LoHa (Hadamard product), not a LoRA",
    "lokr_": "a LyCORIS LoKr (Kronecker product), not a LoRA",
    "lora_mid": "a LyCORIS LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "a DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "a DoRA (weight-decomposed LoRA)",
    "lora_te1_": "an SDXL LoRA (two text encoders)",
    "lora_te2_": "an SDXL LoRA (two text encoders)",
    "text_encoder_2.": "an SDXL LoRA (two text encoders)",
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the PEFT config, keys prefixed "unet." / "text_encoder."


@dataclass
class LoraWeight:
    """One adapted layer: ΔW = (alpha / rank) · B A, rank = A.shape[0]."""

    component: str  # "unet" or "text_encoder"
    module: str  # minisd module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down: Tensor  # A: (r, in) for a Linear, (r, in, kh, kw) for a Conv2d
    up: Tensor  # B: (out, r), or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def module_table(component: str, names: Iterable[str]) -> dict[str, str]:
    """kohya's flattened name -> minisd module path, for every module of one network (names: its state-dict keys).

    The UNet's table holds the diffusers paths and the official file's LDM paths (keymap_ldm.unet_table); the text
    encoder's, transformers' paths without `text_model.` (kohya writes `lora_te_text_model_…`; removed first).

    >>> module_table("unet", ["down_blocks.0.attentions.0.proj_in.weight"])["down_blocks_0_attentions_0_proj_in"]
    'down_blocks.0.attentions.0.proj_in'
    """
    names = list(names)
    modules = {name.rsplit(".", 1)[0] for name in names if name.endswith(".weight")}
    table = {m.replace(".", "_"): m for m in modules}
    if component == "unet":
        for ldm, ours in unet_table(*minisd_unet_layout(names)).items():
            if ldm.endswith(".weight") and ours.removesuffix(".weight") in modules:
                table[ldm.removesuffix(".weight").replace(".", "_")] = ours.removesuffix(".weight")
    assert len(set(table)) == len(table), "flattened names are unique"
    return table


def lora_weights(
    state_dict: Mapping[str, Tensor], metadata: Mapping[str, str], names: Mapping[str, Iterable[str]]
) -> list[LoraWeight]:
    """A LoRA file's tensors (and its safetensors metadata) -> one LoraWeight per adapted layer, in minisd names.

    names: {"unet": …, "text_encoder": …} the state-dict keys of the networks the LoRA is for (their module paths
    resolve kohya's flattened names). One-line MinisdError for other networks, unknown keys and missing halves."""
    keys = list(state_dict)
    if not keys:
        raise MinisdError("the LoRA file holds no tensors")
    for fragment, what in OTHER_NETWORKS.items():
        found = next((k for k in keys if fragment in k), None)
        if found:
            raise MinisdError(f"this is {what} ({found}); minisd applies LoRAs (lora_down/lora_up, lora_A/lora_B)")
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        parts = _split(keys, KOHYA_PREFIXES, KOHYA_PARTS, sep="_")
        tables = {c: module_table(c, names[c]) for c in KOHYA_PREFIXES.values()}
        found_alpha = {k: float(state_dict[v]) for k, v in parts.pop("alpha", {}).items()}
        layers = [
            _layer(key, component, tables[component].get(_flat(component, name)), parts, found_alpha.get(key))
            for key, (component, name) in _layer_keys(parts)
        ]
    elif all(k.startswith(tuple(PEFT_PREFIXES)) for k in keys):
        parts = _split(keys, PEFT_PREFIXES, PEFT_PARTS, sep=".")
        modules = {c: {n.rsplit(".", 1)[0] for n in names[c]} for c in PEFT_PREFIXES.values()}
        config = _peft_config(metadata)
        layers = []
        for key, (component, name) in _layer_keys(parts):
            name = name.removeprefix("text_model.") if component == "text_encoder" else name
            rank = state_dict[key + ".lora_A.weight"].shape[0] if key + ".lora_A.weight" in state_dict else 0
            alpha = _peft_alpha(config, component, name, rank)
            layers.append(_layer(key, component, name if name in modules[component] else None, parts, alpha))
    else:
        odd = next(k for k in keys if not k.startswith(tuple(KOHYA_PREFIXES) + tuple(PEFT_PREFIXES)))
        raise MinisdError(
            f"not a LoRA of a known form: {odd!r} (expected kohya's lora_unet_…/lora_te_… or diffusers' unet.…/"
            "text_encoder.… keys, all of one form)"
        )
    return [
        LoraWeight(c, m, state_dict[down], state_dict[up], state_dict[down].shape[0] if alpha is None else alpha)
        for c, m, down, up, alpha in layers
    ]


def _split(keys: list[str], prefixes: dict[str, str], suffixes: dict[str, str], sep: str) -> dict[str, dict]:
    """{part: {layer key: file key or tensor name}}: each key cut into its layer (prefix + module) and its part."""
    parts: dict[str, dict] = {}
    for key in keys:
        part = next((p for p in suffixes if key.endswith("." + p)), None)
        if part is None:
            raise MinisdError(f"LoRA key {key!r} ends in none of {', '.join(suffixes)}")
        parts.setdefault(suffixes[part], {})[key.removesuffix("." + part)] = key
    return parts


def _layer_keys(parts: dict[str, dict]):
    """(layer key, (component, name inside the component)) for each layer that has a down factor."""
    for layer in sorted(set(parts.get("down", {})) | set(parts.get("up", {}))):
        prefix = next(p for p in (*KOHYA_PREFIXES, *PEFT_PREFIXES) if layer.startswith(p))
        component = {**KOHYA_PREFIXES, **PEFT_PREFIXES}[prefix]
        yield layer, (component, layer.removeprefix(prefix))


def _flat(component: str, name: str) -> str:
    return name.removeprefix("text_model_") if component == "text_encoder" else name


def _layer(key: str, component: str, module: str | None, parts: dict[str, dict], alpha: float | None):
    if module is None:
        raise MinisdError(f"LoRA layer {key!r} names no module of SD v1's {component}")
    down, up = parts.get("down", {}).get(key), parts.get("up", {}).get(key)
    if down is None or up is None:
        raise MinisdError(f"LoRA layer {key!r} has only one of its two factors (down/A and up/B)")
    return component, module, down, up, alpha


def _peft_config(metadata: Mapping[str, str]) -> dict:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        config = json.loads(text)
        assert isinstance(config, dict)
        return config
    except (json.JSONDecodeError, AssertionError):
        raise MinisdError(f"its {METADATA_KEY} metadata is not a JSON object") from None


def _peft_alpha(config: dict, component: str, module: str, rank: int) -> float:
    """PEFT's alpha for one module: alpha_pattern (a module path, or the end of one), else lora_alpha, else the
    rank (diffusers' files without metadata mean W' = W + B A)."""
    patterns = config.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        pattern = pattern.lstrip("^")
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(config.get(f"{component}.lora_alpha", rank))
