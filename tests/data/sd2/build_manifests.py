"""Write the SD 2.x manifests of this folder: `python -m tests.data.sd2.build_manifests` (from the repository root).

Each official SD 2 file is an SD v1 file with three differences, applied here to the verified SD v1.5 manifest
(tests/data/sd15/v1-5-pruned-emaonly.json) and nothing else (no minisd code is used):
  - the UNet's SpatialTransformer proj_in / proj_out are Linear: [c, c] instead of [c, c, 1, 1]
    (v2-inference.yaml use_linear_in_transformer: True);
  - its cross-attention reads a 1024-wide context: attn2.to_k / attn2.to_v [c, 1024] instead of [c, 768];
  - the text encoder is open_clip's ViT-H/14 text tower under `cond_stage_model.model.` (OPENCLIP_KEYS below),
    in the order of open_clip's CLIP.state_dict(): its own parameters (positional_embedding, text_projection,
    logit_scale), then its modules (transformer.resblocks.0-23, token_embedding, ln_final).
The inpainting file's UNet takes 9 input channels. tests/test_keymap_sd2.py checks the result live against
diffusers' own single-file converters (README.md here says what else confirms it).
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
SD15 = HERE.parent / "sd15" / "v1-5-pruned-emaonly.json"
WIDTH, MLP, BLOCKS, VOCAB, POSITIONS = 1024, 4096, 24, 49408, 77  # OpenCLIP ViT-H/14's text tower


def openclip_keys() -> list[list]:
    """cond_stage_model.model.* of an SD 2 file: [name, shape, dtype] in open_clip's state_dict order."""
    keys = [["positional_embedding", [POSITIONS, WIDTH]], ["text_projection", [WIDTH, WIDTH]], ["logit_scale", []]]
    for n in range(BLOCKS):  # ResidualAttentionBlock: ln_1, attn (nn.MultiheadAttention), ln_2, mlp
        block = f"transformer.resblocks.{n}."
        keys += [
            [block + "ln_1.weight", [WIDTH]],
            [block + "ln_1.bias", [WIDTH]],
            [block + "attn.in_proj_weight", [3 * WIDTH, WIDTH]],
            [block + "attn.in_proj_bias", [3 * WIDTH]],
            [block + "attn.out_proj.weight", [WIDTH, WIDTH]],
            [block + "attn.out_proj.bias", [WIDTH]],
            [block + "ln_2.weight", [WIDTH]],
            [block + "ln_2.bias", [WIDTH]],
            [block + "mlp.c_fc.weight", [MLP, WIDTH]],
            [block + "mlp.c_fc.bias", [MLP]],
            [block + "mlp.c_proj.weight", [WIDTH, MLP]],
            [block + "mlp.c_proj.bias", [WIDTH]],
        ]
    keys += [["token_embedding.weight", [VOCAB, WIDTH]], ["ln_final.weight", [WIDTH]], ["ln_final.bias", [WIDTH]]]
    return [["cond_stage_model.model." + name, shape, "float32"] for name, shape in keys]


def sd2_keys(in_channels: int) -> list[list]:
    keys = []
    for name, shape, dtype in json.loads(SD15.read_text())["keys"]:
        if name.startswith("cond_stage_model."):
            continue  # SD v1's CLIP: replaced below
        if name.endswith(("proj_in.weight", "proj_out.weight")) and name.startswith("model.diffusion_model."):
            shape = shape[:2]  # Linear
        if ".attn2.to_k.weight" in name or ".attn2.to_v.weight" in name:
            shape = [shape[0], WIDTH]
        if name == "model.diffusion_model.input_blocks.0.0.weight":
            shape = [shape[0], in_channels, *shape[2:]]
        keys.append([name, shape, dtype])
    return keys + openclip_keys()


def manifest(describes: str, in_channels: int) -> dict:
    keys = sd2_keys(in_channels)
    prefixes = ["model.diffusion_model.", "model_ema.", "first_stage_model.", "cond_stage_model.model."]
    counts = {"ddpm_schedule_buffers": sum(not k[0].startswith(tuple(prefixes)) for k in keys)}
    counts.update({p.rstrip("."): sum(k[0].startswith(p) for k in keys) for p in prefixes})
    elements: dict[str, int] = {}
    for _, shape, dtype in keys:
        size = 1
        for d in shape:
            size *= d
        elements[dtype] = elements.get(dtype, 0) + size
    return {
        "format": "minisd.sd2-checkpoint-manifest/1",
        "describes": describes,
        "entries": "each entry is [name, shape, dtype]; dtype is the torch dtype name (float32=F32, int32=I32 in "
        "safetensors); shape [] is a 0-dim scalar tensor",
        "order": "LatentDiffusion.state_dict() order: 12 DDPM buffers, model.diffusion_model.*, model_ema.decay, "
        "model_ema.num_updates, first_stage_model.*, cond_stage_model.model.* (open_clip CLIP.state_dict() order). "
        "The .safetensors file lays tensor data out sorted by name; its header order carries no meaning.",
        "dtypes": "all float32 except model_ema.num_updates (int32); no position_ids (open_clip makes no such buffer)",
        "key_count": len(keys),
        "component_counts": counts,
        "element_count_by_dtype": elements,
        "keys": keys,
    }


def write(path: Path, content: dict) -> None:
    """One key per line, as the SD v1.5 manifests are laid out."""
    head = json.dumps({k: v for k, v in content.items() if k != "keys"}, indent=2)[:-2]
    lines = ",\n".join("    " + json.dumps(k, separators=(",", ":")) for k in content["keys"])
    path.write_text(f'{head},\n  "keys": [\n{lines}\n  ]\n}}\n')


if __name__ == "__main__":
    write(
        HERE / "v2-1-ema-pruned.json",
        manifest(
            "state_dict of v2-1_512-ema-pruned and of v2-1_768-ema-pruned (.safetensors, and .ckpt under its top-level"
            " 'state_dict' key; stabilityai/stable-diffusion-2-1-base and -2-1): the same names, shapes and dtypes,"
            " the 512 model predicting ε, the 768 model v",
            4,
        ),
    )
    write(
        HERE / "512-inpainting-ema.json",
        manifest(
            "state_dict of 512-inpainting-ema (.ckpt / .safetensors; stabilityai/stable-diffusion-2-inpainting), class"
            " LatentInpaintDiffusion: a 9-channel UNet input",
            9,
        ),
    )
