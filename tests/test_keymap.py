"""The SD v1 key maps, proved against diffusers' own single-file converters as the independent referee.

Full size (the real key sets from tests/data/sd15, random weights): ldm_to_minisd gives exactly the names, shapes
and tensors of diffusers' convert_ldm_{unet,vae,clip}_checkpoint, the result loads strictly into minisd's
networks, and minisd_to_ldm gives the official file back. Tiny files cover every variant × dtype round trip,
the error paths and the refusals of detect.inspect_checkpoint.
"""

import gc

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig
from tests.fakes import (
    VARIANTS,
    official_keys,
    random_official_state_dict,
    tiny_components,
    tiny_official_state_dict,
)
from weights_convert.detect import inspect_checkpoint
from weights_convert.keymap_diffusers import diffusers_to_minisd, minisd_to_diffusers
from weights_convert.keymap_ldm import EMA_SCALARS, ema_name
from weights_convert.official import ldm_to_minisd, minisd_to_ldm

# CompVis configs/stable-diffusion/v1-inference.yaml (runwayml v1-inpainting-inference.yaml: in_channels 9),
# the parts diffusers' config builders read.
V1_INFERENCE = {
    "model": {
        "params": {
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
                    "num_heads": 8,
                    "transformer_depth": 1,
                    "context_dim": 768,
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


def reference_components(state_dict, use_ema: bool, in_channels: int) -> dict:
    """What diffusers 0.42.1 makes of an official state dict, renamed to transformers 5.x's CLIPTextModel
    (no `text_model.` level, no persistent position_ids): the referee."""
    V1_INFERENCE["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    unet_config = create_unet_diffusers_config_from_ldm(V1_INFERENCE, state_dict)
    vae_config = create_vae_diffusers_config_from_ldm(V1_INFERENCE, state_dict)
    clip = convert_ldm_clip_checkpoint(state_dict)
    return {
        "unet": convert_ldm_unet_checkpoint(state_dict, unet_config, extract_ema=use_ema),
        "vae": convert_ldm_vae_checkpoint(state_dict, vae_config),
        "text_encoder": {
            name.removeprefix("text_model."): t for name, t in clip.items() if not name.endswith("position_ids")
        },
    }


def assert_same_tensors(ours: dict, ref: dict, what: str) -> None:
    """Same names, shapes, dtypes and values. Both maps return views of the input's tensors, so equal memory
    (same address, shape and strides) proves equal values without reading 4 GB; torch.equal otherwise."""
    assert sorted(ours) == sorted(ref), f"{what}: names differ: {sorted(set(ours) ^ set(ref))[:5]}"
    for name, r in ref.items():
        o = ours[name]
        assert (o.shape, o.dtype) == (r.shape, r.dtype), f"{what}: {name}: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
        same_view = o.data_ptr() == r.data_ptr() and o.stride() == r.stride()
        assert same_view or torch.equal(o, r), f"{what}: {name}: values differ"


def assert_loads_strictly(components: dict, in_channels: int) -> None:
    """Strict load into minisd's networks built on the meta device: no missing, unexpected or mis-shaped key."""
    with torch.device("meta"):
        models = {
            "unet": UNet(UNetConfig(in_channels=in_channels)),
            "vae": VAE(VAEConfig()),
            "text_encoder": TextEncoder(TextEncoderConfig()),
        }
    for component, model in models.items():
        model.load_state_dict(components[component], strict=True, assign=True)
        left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not left_on_meta, f"{component}: still on meta after loading: {left_on_meta[:3]}"


def assert_round_trip(state_dict: dict, components: dict, unet_source: dict | None = None) -> None:
    """minisd_to_ldm(components) == the official file: every name (EMA scalars passed through), identical tensors.
    unet_source: for a file with two UNets, which tensors the single exported UNet must hold."""
    expected = {n: t for n, t in state_dict.items() if not n.startswith("model_ema.") or n in EMA_SCALARS}
    if unet_source is not None:
        expected.update(unet_source)
    exported = minisd_to_ldm(components, kept=state_dict)
    assert list(exported) == list(expected)  # the official key set, in the official order
    for name, tensor in expected.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name


FULL_SIZE_CASES = [("emaonly", torch.float32), ("pruned", torch.float16), ("inpainting", torch.float16)]


@pytest.mark.parametrize(("variant", "dtype"), FULL_SIZE_CASES)
def test_full_size_map_equals_diffusers_converters(variant, dtype):
    """~1.07e9 random values (1.9e9 for pruned, hence fp16 there): names, shapes, tensors as diffusers' converters;
    strict load into minisd; official -> minisd -> official identical."""
    state_dict = random_official_state_dict(variant, dtype)
    in_channels = 9 if variant == "inpainting" else 4
    for use_ema in (True, False) if variant == "pruned" else (True,):
        ours = ldm_to_minisd(state_dict, use_ema=use_ema)
        ref = reference_components(state_dict, use_ema, in_channels)
        for component in ("unet", "vae", "text_encoder"):
            assert_same_tensors(ours[component], ref[component], f"{variant} use_ema={use_ema} {component}")
        del ref
        assert_loads_strictly(ours, in_channels)
        unet_source = None
        if variant == "pruned":  # the exported file holds the chosen UNet under model.diffusion_model.
            unet = [n for n in state_dict if n.startswith("model.diffusion_model.")]
            unet_source = {n: state_dict[ema_name(n) if use_ema else n] for n in unet}
        assert_round_trip(state_dict, ours, unet_source)
        del ours
        gc.collect()


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_map_equals_diffusers_converters(variant):
    """The same referee on tiny files: 2 levels, 1 resnet per level (the numbering differs from SD v1's)."""
    state_dict = tiny_official_state_dict(variant)
    for use_ema in (True, False):
        ours = ldm_to_minisd(state_dict, use_ema=use_ema)
        clip = convert_ldm_clip_checkpoint(state_dict)
        ref = {
            "unet": convert_ldm_unet_checkpoint(state_dict, {"layers_per_block": 1}, extract_ema=use_ema),
            "vae": convert_ldm_vae_checkpoint(state_dict, {"down_block_types": [0, 0], "up_block_types": [0, 0]}),
            "text_encoder": {n.removeprefix("text_model."): t for n, t in clip.items() if "position_ids" not in n},
        }
        for component in ("unet", "vae", "text_encoder"):
            assert_same_tensors(ours[component], ref[component], f"tiny {variant} use_ema={use_ema} {component}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_round_trip(variant, dtype):
    """Official names at tiny sizes: names and tensors survive official -> minisd -> official in both dtypes."""
    state_dict = tiny_official_state_dict(variant, dtype)
    for use_ema in (True, False):
        components = ldm_to_minisd(state_dict, use_ema=use_ema)
        unet_source = None
        if variant == "pruned":
            unet = [n for n in state_dict if n.startswith("model.diffusion_model.")]
            unet_source = {n: state_dict[ema_name(n) if use_ema else n] for n in unet}
        assert_round_trip(state_dict, components, unet_source)


def test_tiny_components_round_trip_and_names():
    """minisd -> official -> minisd is the identity too; the VAE attention is linear in minisd, 1×1 conv in LDM."""
    components = tiny_components()
    official = minisd_to_ldm(components)
    assert official["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert official["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    back = ldm_to_minisd(official)
    for component, state_dict in components.items():
        assert_same_tensors(back[component], state_dict, component)


def test_ema_choice_in_a_pruned_file():
    state_dict = tiny_official_state_dict("pruned")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert ldm_to_minisd(state_dict)["unet"]["conv_in.weight"] is state_dict[ema_name(key)]
    assert ldm_to_minisd(state_dict, use_ema=False)["unet"]["conv_in.weight"] is state_dict[key]
    del state_dict[ema_name(key)]
    with pytest.raises(MinisdError, match=r"model_ema\.diffusion_modelinput_blocks00weight"):
        ldm_to_minisd(state_dict)


def test_unknown_keys_are_named():
    state_dict = tiny_official_state_dict()
    state_dict["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    state_dict["some_training_buffer"] = torch.zeros(1)
    with pytest.raises(MinisdError, match=r"2 key\(s\).*extra\.weight.*some_training_buffer") as error:
        ldm_to_minisd(state_dict)
    assert "\n" not in str(error.value)
    components = tiny_components()
    components["vae"]["decoder.extra.bias"] = torch.zeros(1)
    with pytest.raises(MinisdError, match=r"decoder\.extra\.bias"):
        minisd_to_ldm(components)
    del components["text_encoder"]
    with pytest.raises(MinisdError, match="text_encoder"):
        minisd_to_ldm(components)


def test_community_variants_of_the_text_encoder_keys():
    """A float position_ids (community re-saves) is ignored; transformers < 4.19 files lack `text_model.`."""
    state_dict = tiny_official_state_dict()
    expected = ldm_to_minisd(state_dict)["text_encoder"]
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3
    assert_same_tensors(ldm_to_minisd(state_dict)["text_encoder"], expected, "float position_ids")
    old = {n.replace("transformer.text_model.", "transformer."): t for n, t in state_dict.items()}
    assert_same_tensors(ldm_to_minisd(old)["text_encoder"], expected, "no text_model. level")


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_official_key_sets(variant):
    """Counts of the real files (tests/data/sd15/README.md), read off meta tensors."""
    with torch.device("meta"):
        state_dict = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in official_keys(variant)}
    info = inspect_checkpoint(state_dict)
    assert (info.layout, info.variant, info.has_ema) == (
        "ldm",
        "v1-inpainting" if variant == "inpainting" else "v1",
        variant == "pruned",
    )
    unet = 859_535_364 if variant == "inpainting" else 859_520_964  # + 320·5·3·3 for the 5 extra input channels
    assert info.parameter_counts["unet"] == unet
    assert info.parameter_counts["vae"] == 83_653_863
    assert info.parameter_counts["text_encoder"] == 123_060_480  # README's 123,060,557 less the 77 position ids
    assert info.dtypes == {c: "float32" for c in info.parameter_counts}


def _tiny_with(**changes):
    state_dict = tiny_official_state_dict()
    state_dict.update(changes)
    return state_dict


@pytest.mark.parametrize(
    ("state_dict", "message"),
    [
        pytest.param({}, "no tensors", id="empty"),
        pytest.param(
            _tiny_with(**{"cond_stage_model.model.ln_final.weight": torch.zeros(4)}),
            r"mixes SD v1 and SD 2 parts \(cond_stage_model.model.\* says SD 2, cond_stage_model.transformer.\* says",
            id="sd1-and-openclip-text",
        ),
        pytest.param(
            _tiny_with(
                **{
                    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
                        32, 1024
                    )
                }
            ),
            "mixes SD v1 and SD 2 parts .model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight "
            "says SD 2",
            id="sd2-context-with-sd1-text",
        ),
        pytest.param({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, "SDXL", id="sdxl"),
        pytest.param(
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 2048)},
            "SDXL UNet .2048-wide",
            id="sdxl-context",
        ),
        pytest.param(
            {"text_model.final_layer_norm.weight": torch.zeros(1280), "text_model.embeddings.x": torch.zeros(1)},
            r"SDXL \(OpenCLIP ViT-bigG\) text encoder",
            id="sdxl-text-encoder-folder",
        ),
        pytest.param(
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, "LoRA", id="lora"
        ),
        pytest.param({"layer.0.weight": torch.zeros(3), "bias": torch.zeros(1)}, "no Stable Diffusion", id="random"),
        pytest.param(
            {"model.diffusion_model.out.2.bias": torch.zeros(4)},
            "has the UNet .* but no the VAE .* and the text encoder",
            id="unet-only",
        ),
        pytest.param(
            {"first_stage_model.decoder.conv_out.bias": torch.zeros(3)}, "has the VAE .* but no the UNet", id="vae-only"
        ),
        pytest.param(
            {
                "encoder.down.0.block.0.conv1.weight": torch.zeros(1),
                "decoder.up.0.block.0.conv1.weight": torch.zeros(1),
            },
            "a VAE on its own .* --vae FILE",
            id="ldm-vae-file",
        ),
    ],
)
def test_refusals_are_one_line(state_dict, message):
    with pytest.raises(MinisdError, match=message) as error:
        inspect_checkpoint(state_dict)
    assert "\n" not in str(error.value)


def test_inspect_other_layouts():
    components = tiny_components(in_channels=9, dtype=torch.float16)
    from weights_convert.detect import join_minisd_file, split_minisd_file

    info = inspect_checkpoint(join_minisd_file(components))
    assert (info.layout, info.variant, info.dtypes["unet"]) == ("minisd", "v1-inpainting", "float16")
    assert split_minisd_file(join_minisd_file(components)).keys() == components.keys()
    for component, layout in (
        ("unet", "diffusers-unet"),
        ("vae", "diffusers-vae"),
        ("text_encoder", "diffusers-text-encoder"),
    ):
        state_dict = minisd_to_diffusers(component, components[component])
        info = inspect_checkpoint(state_dict)
        assert info.layout == layout
        assert list(info.parameter_counts) == [component]


def test_diffusers_legacy_vae_and_text_encoder_names():
    """Old diffusers VAE files (query/key/value/proj_attn, some 1×1-conv shaped) and transformers 4.x text
    encoder files (text_model. prefix, stored position_ids) map onto today's diffusers names."""
    config = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 32}
    down, up = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
    with torch.device("meta"):
        reference = AutoencoderKL(**config, down_block_types=down, up_block_types=up).state_dict()
    assert reference.keys() == tiny_components()["vae"].keys()  # today's names = minisd's
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, tensor in reference.items():
        for new, old in legacy_names.items():
            if f"attentions.0.{new}." in name:
                name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
        legacy[name] = tensor
    converted = diffusers_to_minisd("vae", legacy)
    assert {n: t.shape for n, t in converted.items()} == {n: t.shape for n, t in reference.items()}

    text = tiny_components()["text_encoder"]
    saved = {**minisd_to_diffusers("text_encoder", text), "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert_same_tensors(diffusers_to_minisd("text_encoder", saved), text, "text_model. prefix")
    assert_same_tensors(diffusers_to_minisd("unet", tiny_components()["unet"]), tiny_components()["unet"], "unet")
    with pytest.raises(MinisdError, match="component must be one of"):
        diffusers_to_minisd("safety_checker", {})
