"""The SD 2.x key maps, proved against diffusers' own single-file converters, and SD 2's penultimate-layer rule
against open_clip's text tower written here with torch's nn.MultiheadAttention (which reads the fused in_proj as is).

The manifests (tests/data/sd2/*.json, 1242 keys each) are checked live: diffusers' converters read every key but
the documented leftovers, and their output loads strictly into diffusers' / transformers' SD 2 models. Full size
(random fp16 weights): ldm_to_minisd gives diffusers' tensors, loads strictly into minisd's SD 2 networks, and
minisd_to_ldm gives the official file back bit for bit. Tiny files cover detection, configs and refusals.
"""

import copy
import gc
import json
from collections import OrderedDict

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
    infer_diffusers_model_type,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from tests.data.sd2 import build_manifests
from tests.fakes import (
    DATA,
    MANIFESTS,
    TINY_SD2_TEXT_ENCODER,
    official_keys,
    random_official_state_dict,
    tiny_sd2_official_state_dict,
)
from tests.parity import assert_parity
from tests.test_keymap import assert_same_tensors
from weights_convert.configs import configs_from_shapes, fields_from
from weights_convert.detect import inspect_checkpoint
from weights_convert.folders import prediction_of
from weights_convert.keymap_ldm import EMA_SCALARS, SCHEDULE_BUFFERS
from weights_convert.keymap_openclip import OPENCLIP_PREFIX
from weights_convert.official import kept_tensors, ldm_to_minisd, minisd_to_ldm

# Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml (v2-inference.yaml: the same without
# parameterization "v"; v2-inpainting-inference.yaml: in_channels 9), the parts diffusers' config builders read.
V2_INFERENCE = {
    "model": {
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "scale_factor": 0.18215,
            "unet_config": {
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_head_channels": 64,
                    "use_linear_in_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 1024,
                }
            },
            "first_stage_config": {
                "params": {
                    "ddconfig": {
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                    }
                }
            },
        }
    }
}
# stabilityai/stable-diffusion-2-1's text_encoder/config.json, the keys that shape the model
SD2_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "hidden_act": "gelu"}


def v2_config(in_channels: int) -> dict:
    config = copy.deepcopy(V2_INFERENCE)
    config["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    return config


def reference_components(state_dict: dict, in_channels: int) -> tuple[dict, dict, set]:
    """What diffusers 0.42.1 makes of an official SD 2 state dict (text encoder with 23 layers, as its SD 2
    text_encoder/config.json), its UNet config, and the keys its converters did not read."""
    original = v2_config(in_channels)
    unet_config = create_unet_diffusers_config_from_ldm(original, state_dict)
    vae_config = create_vae_diffusers_config_from_ldm(original, state_dict)
    with torch.device("meta"):
        clip_model = CLIPTextModel(CLIPTextConfig(**SD2_TEXT, num_hidden_layers=23))
    read: set[str] = set()

    class Recording(dict):  # a view of the checkpoint that notes every key a converter reads
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    checkpoint = Recording(state_dict)
    components = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, unet_config),
        "vae": convert_ldm_vae_checkpoint(checkpoint, vae_config),
        "text_encoder": {
            name.removeprefix("text_model."): t
            for name, t in convert_open_clip_checkpoint(clip_model, checkpoint).items()
        },
    }
    return components, unet_config, set(state_dict) - read


def meta_state_dict(variant: str) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in official_keys(variant)}


def sd2_networks(in_channels: int, on_meta: bool = True) -> dict[str, nn.Module]:
    configs = configs_from_shapes(ldm_to_minisd(meta_state_dict("sd2")), "v2", 768)
    classes = {"unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig), "text_encoder": (TextEncoder, TextEncoderConfig)}
    with torch.device("meta" if on_meta else "cpu"):
        return {
            component: cls(fields_from(config_cls, {**configs[component], "in_channels": in_channels}))
            if component == "unet"
            else cls(fields_from(config_cls, configs[component]))
            for component, (cls, config_cls) in classes.items()
        }


# ---- the manifests, read by diffusers' converters -----------------------------------------------------------------


def test_manifests_are_what_build_manifests_writes(tmp_path):
    for name, in_channels in (("sd2/v2-1-ema-pruned.json", 4), ("sd2/512-inpainting-ema.json", 9)):
        content = build_manifests.manifest(json.loads((DATA / name).read_text())["describes"], in_channels)
        build_manifests.write(tmp_path / "m.json", content)
        assert (tmp_path / "m.json").read_text() == (DATA / name).read_text(), name
    assert MANIFESTS["sd2"] == "sd2/v2-1-ema-pruned.json"


@pytest.mark.parametrize("variant", ["sd2", "sd2-inpainting"])
def test_manifests_are_what_diffusers_converters_read(variant):
    """Names and shapes only (meta tensors): diffusers reads every key but the schedule buffers, LitEma's scalars,
    OpenCLIP's 24th block and text_projection (its SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and logit_scale, and what
    it makes loads strictly into its SD 2 models; its model-type guess and its UNet config are SD 2's."""
    state_dict = meta_state_dict(variant)
    in_channels = 9 if variant == "sd2-inpainting" else 4
    assert len(state_dict) == 1242
    assert infer_diffusers_model_type(state_dict) == ("inpainting_v2" if in_channels == 9 else "v2")
    ref, unet_config, unread = reference_components(state_dict, in_channels)
    # (diffusers reads text_projection's shape for the q/k/v split width, and writes nothing of it)
    ignored = set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) - {OPENCLIP_PREFIX + "text_projection"}
    assert unread == {*SCHEDULE_BUFFERS, *EMA_SCALARS, *ignored, OPENCLIP_PREFIX + "logit_scale"}
    assert not any(name.startswith("text_projection") for name in ref["text_encoder"])
    assert unet_config["attention_head_dim"] == [5, 10, 20, 20] and unet_config["use_linear_projection"]
    assert unet_config["sample_size"] == (64 if in_channels == 9 else 96)  # diffusers' 768 px for "v2"
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**unet_config),
            "vae": AutoencoderKL(**create_vae_diffusers_config_from_ldm(v2_config(in_channels), state_dict)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD2_TEXT, num_hidden_layers=23)),
        }
    for component, model in models.items():
        model.load_state_dict(ref[component], strict=True, assign=True)  # raises on any missing/extra/misshaped key


def test_configs_from_shapes_equal_diffusers_and_the_published_configs():
    """minisd's SD 2 configs read off the manifest's shapes are the ones diffusers builds from v2-inference.yaml
    (the UNet) and stabilityai/stable-diffusion-2-1's text_encoder/config.json (23 layers)."""
    state_dict = meta_state_dict("sd2")
    configs = configs_from_shapes(ldm_to_minisd(state_dict), "v2", 768)
    ref_unet = create_unet_diffusers_config_from_ldm(v2_config(4), state_dict)
    for key in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection"):
        assert configs["unet"][key] == ref_unet[key], key
    assert configs["unet"]["sample_size"] == 96 and configs["unet"]["upcast_attention"]
    assert {k: configs["text_encoder"][k] for k in SD2_TEXT} == SD2_TEXT
    assert configs["text_encoder"]["num_hidden_layers"] == 23


# ---- full size: random weights ------------------------------------------------------------------------------------


def test_full_size_map_equals_diffusers_converters_and_round_trips():
    """1.3e9 random fp16 values laid out as v2-1_768-ema-pruned: names, shapes, tensors as diffusers' converters
    (q/k/v split: equal values); strict load into minisd's SD 2 networks; official -> minisd -> official identical,
    in the official order, with the kept tensors."""
    state_dict = random_official_state_dict("sd2", torch.float16, seed=3)
    ours = ldm_to_minisd(state_dict)
    ref, _, _ = reference_components(state_dict, 4)
    for component in ("unet", "vae", "text_encoder"):
        assert_same_tensors(ours[component], ref[component], f"sd2 {component}")
    del ref
    gc.collect()
    for component, model in sd2_networks(4).items():
        model.load_state_dict(ours[component], strict=True, assign=True)
    exported = minisd_to_ldm(ours, variant="v2", kept=kept_tensors(state_dict))
    assert list(exported) == list(state_dict)  # the official key set, in the official order
    for name, tensor in state_dict.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert not kept_tensors(state_dict).keys() & {OPENCLIP_PREFIX + "ln_final.weight"}


# ---- SD 2's penultimate layer against open_clip's text tower ------------------------------------------------------


class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-LN, nn.MultiheadAttention with its fused in_proj, GELU MLP)."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, d)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """The text part of open_clip's CLIP under `cond_stage_model.model.` (every key an SD 2 file has there),
    run as Stability's FrozenOpenCLIPEmbedder runs it with layer="penultimate": all blocks but the last."""

    def __init__(self, d: int, heads: int, mlp: int, blocks: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(77, d))
        self.text_projection = nn.Parameter(torch.empty(d, d))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([OpenCLIPBlock(d, heads, mlp) for _ in range(blocks)])
        self.token_embedding = nn.Embedding(49408, d)
        self.ln_final = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = (self.token_embedding(input_ids) + self.positional_embedding).permute(1, 0, 2)  # (s, b, d)
        mask = torch.full((77, 77), float("-inf")).triu(1)  # open_clip's causal attn_mask
        for block in self.transformer.resblocks[:-1]:  # penultimate: stop one block short
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))


def check_penultimate(test: str, state_dict: dict, d: int, heads: int, mlp: int, blocks: int, config) -> None:
    reference = OpenCLIPText(d, heads, mlp, blocks).eval()
    below = {n.removeprefix(OPENCLIP_PREFIX): t.float() for n, t in state_dict.items() if n.startswith(OPENCLIP_PREFIX)}
    reference.load_state_dict(below, strict=True)  # every key of the file's text encoder, and nothing else
    ours = TextEncoder(config).eval()
    ours.load_state_dict({k: t.float() for k, t in ldm_to_minisd(state_dict)["text_encoder"].items()}, strict=True)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 49406, (2, 20), generator=g)
    input_ids = torch.cat([torch.full((2, 1), 49406), words, torch.full((2, 1), 49407), torch.zeros(2, 55).long()], 1)
    with torch.no_grad():
        got, want = ours(input_ids).last_hidden_state, reference(input_ids)
    # fp32 on both sides; nn.MultiheadAttention runs its own (fused-projection) path: rounding order only, ~1e-6
    assert_parity(test, "SD 2 prompt embeddings (penultimate) vs open_clip", got, want, 1e-5)


def test_penultimate_rule_tiny():
    state_dict = tiny_sd2_official_state_dict()
    c = TINY_SD2_TEXT_ENCODER
    check_penultimate(
        "test_penultimate_rule_tiny", state_dict, c.hidden_size, c.num_attention_heads, c.intermediate_size,
        c.num_hidden_layers + 1, c,
    )  # fmt: skip


def test_penultimate_rule_full_size():
    """OpenCLIP ViT-H's 24 blocks with random weights: minisd's 23-layer TextEncoder = open_clip's penultimate."""
    names = {n: (s, d) for n, s, d in official_keys("sd2") if n.startswith(OPENCLIP_PREFIX)}
    g = torch.Generator().manual_seed(5)
    state_dict = {}
    for name, (shape, _) in names.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            state_dict[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 1
            state_dict[name] = torch.randn(shape, generator=g) * (fan_in**-0.5 if len(shape) == 2 else 0.02)
    config = TextEncoderConfig(**{**SD2_TEXT, "num_hidden_layers": 23})
    check_penultimate("test_penultimate_rule_full_size", state_dict, 1024, 16, 4096, 24, config)


# ---- tiny files: detection, the prediction type, refusals ---------------------------------------------------------


def test_inspect_and_prediction_type():
    """An SD 2 file cannot say ε from v: the caller's choice, else the file's name decides, with a note."""
    info = inspect_checkpoint(tiny_sd2_official_state_dict())
    assert (info.layout, info.variant, info.prediction_type) == ("ldm", "v2", None)
    assert inspect_checkpoint(tiny_sd2_official_state_dict(inpainting=True)).variant == "v2-inpainting"
    assert prediction_of(info, "v_prediction", "x.safetensors") == ("v_prediction", None)
    prediction, note = prediction_of(info, None, "/models/v2-1_768-ema-pruned.safetensors")
    assert prediction == "v_prediction" and "'768' in its name" in note and "\n" not in note
    prediction, note = prediction_of(info, None, "v2-1_512-ema-pruned.ckpt")
    assert prediction == "epsilon" and "no '768' in its name" in note
    inpainting = inspect_checkpoint(tiny_sd2_official_state_dict(inpainting=True))
    assert prediction_of(inpainting, None, "512-inpainting-ema.ckpt") == ("epsilon", None)  # the SD 2 inpainting model
    with pytest.raises(MinisdError, match="prediction_type must be one of epsilon, v_prediction, got 'v'"):
        prediction_of(info, "v", "x.safetensors")


def test_tiny_round_trip_and_kept_tensors():
    state_dict = tiny_sd2_official_state_dict()
    kept = kept_tensors(state_dict)
    assert sorted(kept) == sorted(
        [*EMA_SCALARS, OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale"]
        + [n for n in state_dict if n.startswith(OPENCLIP_PREFIX + "transformer.resblocks.2.")]
    )
    exported = minisd_to_ldm(ldm_to_minisd(state_dict), variant="v2", kept=kept)
    assert list(exported) == list(state_dict)
    assert all(torch.equal(exported[n], t) for n, t in state_dict.items())
    without = minisd_to_ldm(ldm_to_minisd(state_dict), variant="v2")  # e.g. from a folder: what can be rebuilt
    assert set(state_dict) - set(without) == set(kept)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({OPENCLIP_PREFIX + "transformer.resblocks.7.ln_1.weight": torch.zeros(64)}, "resblocks.0 … resblocks.n"),
        ({OPENCLIP_PREFIX + "attn_mask": torch.zeros(77, 77)}, "neither mapped nor kept aside: cond_stage_model"),
        ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(64)}, "mixes SD v1 and SD 2"),
    ],
)
def test_bad_sd2_files_are_one_line(change, message):
    state_dict = {**tiny_sd2_official_state_dict(), **change}
    with pytest.raises(MinisdError, match=message) as error:
        inspect_checkpoint(state_dict)
        ldm_to_minisd(state_dict)
    assert "\n" not in str(error.value)
