"""minisd.loading / weights_convert.files: every format of the same weights loads to the same modules, strictly,
without copies; what is not SD v1 (or not there) fails in one line.

Tiny tests use tests/fakes.py's tiny SD v1 (official names, small sizes) written out in every format: official
single file (.safetensors, .ckpt), minisd's single file, diffusers folders written by diffusers/transformers
themselves (safetensors, .bin, fp16 variant, legacy VAE attention names) and a hand-made Hugging Face cache. The
full-size test compares the three networks loaded from one random full-size official file against diffusers'
own single-file conversion of the same file.
"""

import gc
import json
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoderConfig
from minisd.errors import MinisdError
from minisd.loading import load_components
from minisd.tokenizer import Tokenizer
from minisd.unet import UNetConfig
from minisd.vae import VAEConfig
from tests.fakes import (
    TINY_TEXT_ENCODER,
    TINY_UNET,
    TINY_VAE,
    random_official_state_dict,
    tiny_components,
    tiny_official_state_dict,
)
from tests.parity import assert_parity
from weights_convert.converted import read_converted
from weights_convert.detect import MINISD_METADATA, join_minisd_file
from weights_convert.files import read_state_dict
from weights_convert.keymap_diffusers import minisd_to_diffusers
from weights_convert.keymap_ldm import ema_name
from weights_convert.official import minisd_to_ldm

COMPONENTS = ("unet", "vae", "text_encoder")
REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


# ---------------------------------------------------------------------------------------------------------------
# The same tiny weights in every format


@pytest.fixture(scope="module")
def tiny():
    """minisd state dicts {"unet", "vae", "text_encoder"} of a random tiny SD v1: the expected result everywhere."""
    return tiny_components(seed=3)


def diffusers_models(components) -> dict[str, torch.nn.Module]:
    """diffusers' / transformers' own models at the tiny sizes, holding `components`' weights (strict)."""
    n = len(TINY_UNET.block_out_channels)
    unet = UNet2DConditionModel(
        **asdict(TINY_UNET),
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )
    n = len(TINY_VAE.block_out_channels)
    vae = AutoencoderKL(
        **asdict(TINY_VAE), down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**asdict(TINY_TEXT_ENCODER)))
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for component, model in models.items():
        model.load_state_dict(components[component], strict=True)  # minisd names = in-memory names
    return models


def write_diffusers_folder(folder, components, *, variant=None, bin_files=False, legacy_vae=False):
    """A diffusers folder as diffusers/transformers save it (save_pretrained), plus the tokenizer files."""
    models = diffusers_models(components)
    if variant:
        models = {c: m.half() for c, m in models.items()}
    models["unet"].save_pretrained(folder / "unet", variant=variant, safe_serialization=not bin_files)
    models["vae"].save_pretrained(folder / "vae", variant=variant, safe_serialization=not bin_files)
    models["text_encoder"].save_pretrained(folder / "text_encoder", variant=variant)
    if bin_files:  # transformers 5 writes only safetensors; a 4.x-era pytorch_model.bin has the text_model. prefix
        text_state_dict = minisd_to_diffusers("text_encoder", components["text_encoder"])
        (folder / "text_encoder" / "model.safetensors").unlink()
        torch.save(text_state_dict, folder / "text_encoder" / "pytorch_model.bin")
    if legacy_vae:  # diffusers < 0.15 names (query/key/value/proj_attn) and 1×1-conv shapes for the mid attention
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state_dict = {}
        for name, tensor in models["vae"].state_dict().items():
            for new, legacy in old.items():
                if f"mid_block.attentions.0.{new}." in name:
                    name = name.replace(f".{new}.", f".{legacy}.")
                    tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
            state_dict[name] = tensor.contiguous()
        safetensors.torch.save_file(state_dict, folder / "vae" / "diffusion_pytorch_model.safetensors")
    (folder / "tokenizer").mkdir()
    Tokenizer.from_default().backend.model.save(str(folder / "tokenizer"))  # vocab.json, merges.txt
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_official(path, components):
    scalars = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}
    state_dict = minisd_to_ldm(components, kept=scalars)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: t.contiguous() for k, t in state_dict.items()}, path, metadata={"format": "pt"})
    else:  # a Lightning-style .ckpt
        torch.save({"state_dict": state_dict, "global_step": 840000, "epoch": 6}, path)
    return path


def write_hub_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache entry laid out by hand: models--org--name/{refs/main, snapshots/<revision>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def make_source(kind, tmp_path, components):
    if kind in ("official.safetensors", "official.ckpt"):
        return write_official(tmp_path / f"model.{kind.split('.')[1]}", components)
    if kind == "minisd.safetensors":
        path = tmp_path / "model.safetensors"
        safetensors.torch.save_file(join_minisd_file(components), path, metadata=MINISD_METADATA)
        return path
    folder = write_diffusers_folder(
        tmp_path / "sd", components, bin_files=kind == "diffusers .bin", legacy_vae=kind == "diffusers legacy VAE"
    )
    return folder


def assert_same_weights(loaded, expected, dtype=None):
    modules = {"unet": loaded.unet, "vae": loaded.vae, "text_encoder": loaded.text_encoder}
    for component, module in modules.items():
        got = module.state_dict()
        assert got.keys() == expected[component].keys(), component
        for name, tensor in expected[component].items():
            want = tensor if dtype is None else tensor.to(dtype)
            assert got[name].dtype == want.dtype, (component, name)
            assert torch.equal(got[name], want), (component, name)


def assert_one_line(info, *fragments):
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "kind",
    [
        "official.safetensors",
        "official.ckpt",
        "minisd.safetensors",
        "diffusers folder",
        "diffusers .bin",
        "diffusers legacy VAE",
    ],
)
def test_every_format_loads_the_same_weights(tmp_path, tiny, kind):
    source = make_source(kind, tmp_path, tiny)
    loaded = load_components(source)
    assert_same_weights(loaded, tiny)
    assert loaded.info.variant == "v1"
    assert loaded.unet.config == UNetConfig(**asdict(TINY_UNET))
    assert loaded.vae.config == VAEConfig(**asdict(TINY_VAE))
    assert (
        loaded.tokenizer("a photo of an astronaut").tolist()
        == Tokenizer.from_default()("a photo of an astronaut").tolist()
    )
    assert not loaded.unet.training


def test_hub_id_loads_from_a_local_cache_offline(tmp_path, tiny, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    write_hub_cache(cache, REPO_ID, write_diffusers_folder(tmp_path / "sd", tiny))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert_same_weights(load_components(REPO_ID, local_files_only=True), tiny)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment switch works as well as the argument
    assert_same_weights(load_components(REPO_ID), tiny)


def test_hub_id_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MinisdError) as info:
        load_components("CompVis/stable-diffusion-v1-4", local_files_only=True)
    assert_one_line(info, "CompVis/stable-diffusion-v1-4", "cache")


def test_fp16_variant_folder(tmp_path, tiny, monkeypatch):
    folder = write_diffusers_folder(tmp_path / "sd", tiny, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    assert_same_weights(load_components(folder, variant="fp16"), tiny, dtype=torch.float16)
    assert_same_weights(
        load_components(folder, variant="fp16", dtype=torch.float32),
        {c: {k: t.half().float() for k, t in sd.items()} for c, sd in tiny.items()},
    )
    with pytest.raises(MinisdError) as info:  # no plain (fp32) files in this folder
        load_components(folder)
    assert_one_line(info, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    # the same folder through the hub cache, variant picked there too
    write_hub_cache(tmp_path / "cache", "dreamlike-art/dreamlike-photoreal-2.0", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    loaded = load_components("dreamlike-art/dreamlike-photoreal-2.0", variant="fp16", local_files_only=True)
    assert_same_weights(loaded, tiny, dtype=torch.float16)


def test_dtype_is_converted_only_when_asked_and_nothing_is_copied(tmp_path, tiny):
    path = write_official(tmp_path / "model.safetensors", tiny)
    loaded = load_components(path)
    # No copy: two parameters lie as far apart in memory as their tensors lie in the file's memory map.
    with safetensors.safe_open(path, "pt") as file:
        in_file = [file.get_tensor(f"model.diffusion_model.input_blocks.0.0.{p}") for p in ("weight", "bias")]
    ours = [loaded.unet.conv_in.weight, loaded.unet.conv_in.bias]
    assert ours[1].data_ptr() - ours[0].data_ptr() == in_file[1].data_ptr() - in_file[0].data_ptr()
    assert_same_weights(load_components(path, dtype=torch.bfloat16), tiny, dtype=torch.bfloat16)


def test_a_dtype_converts_each_tensor_as_it_is_read(tmp_path, tiny):
    """With a dtype, the loader reads each tensor on its own and converts it (weights_convert.converted): exactly
    the values that converting the file's memory-mapped views gives (the same .to() of the same bytes: no
    tolerance), integers and 0-d scalars as in the file, names in the file's order; .ckpt files too."""
    files = [write_official(tmp_path / "model.safetensors", tiny), write_official(tmp_path / "model.ckpt", tiny)]
    halves = {c: {k: t.half() for k, t in sd.items()} for c, sd in tiny.items()}
    files.append(write_official(tmp_path / "half.safetensors", halves))
    for path in files:
        mapped = read_state_dict(path)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            converted = read_converted(path, dtype)
            assert list(converted) == list(mapped)
            for name, t in mapped.items():
                expected = t.to(dtype) if t.is_floating_point() else t
                assert converted[name].dtype == expected.dtype and torch.equal(converted[name], expected), name
    assert_same_weights(load_components(files[2], dtype=torch.float32), halves, dtype=torch.float32)


PEAK_SCRIPT = """
import sys, torch
from weights_convert.converted import read_converted
from weights_convert.files import read_state_dict

def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

path, how = sys.argv[1:]
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
before = kib("VmRSS:")
if how == "converted":
    state_dict = read_converted(path, torch.bfloat16)
else:  # the old way: convert the views of the memory-mapped file
    state_dict = {name: t.to(torch.bfloat16) for name, t in read_state_dict(path).items()}
print(kib("VmHWM:") - before)
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_converting_never_holds_the_whole_file(tmp_path, suffix):
    """The point of weights_convert.converted, measured in a fresh process on a 256 MiB float16 file: reading it as
    bfloat16 grows the peak resident memory by the 256 MiB of copies plus about one tensor (32 MiB), not by the
    file's pages too, as converting the memory-mapped views does (measured alongside: ~2×, so the test can tell).
    A .ckpt (torch.save) is read through its map, each view's pages handed back once converted. Linux only
    (/proc/self/status), as CI is."""
    path = tmp_path / f"big{suffix}"
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(2**24, generator=g).half() for i in range(8)}
    if suffix == ".safetensors":
        safetensors.torch.save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors}, path)
    size_kib = path.stat().st_size // 1024
    growth = {}
    for how in ("converted", "mapped views"):
        run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), how], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        growth[how] = int(run.stdout) / size_kib
    assert growth["converted"] < 1.4 and growth["mapped views"] > 1.7, growth
    converted = read_converted(path, torch.bfloat16)  # and the values survive the pages' release
    assert all(torch.equal(converted[name], t.to(torch.bfloat16)) for name, t in tensors.items())


@pytest.mark.gpu
def test_loads_straight_to_the_gpu(tmp_path, tiny):
    path = write_official(tmp_path / "model.safetensors", tiny)
    loaded = load_components(path, dtype=torch.float16, device="cuda")
    for module in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert all(t.is_cuda for t in module.state_dict().values())
    assert_same_weights(
        load_components(path, dtype=torch.float16, device="cuda"),
        {c: {k: t.cuda() for k, t in sd.items()} for c, sd in tiny.items()},
        dtype=torch.float16,
    )


def test_bad_dtype_or_device_is_one_line(tmp_path, tiny):
    path = write_official(tmp_path / "model.safetensors", tiny)
    for kwargs, fragment in (({"dtype": torch.int8}, "dtype"), ({"device": "gpu7"}, "device")):
        with pytest.raises(MinisdError) as info:
            load_components(path, **kwargs)
        assert_one_line(info, fragment)


def test_ema_choice_and_inpainting_variant(tmp_path):
    state_dict = tiny_official_state_dict("pruned", seed=5)
    path = tmp_path / "pruned.safetensors"
    safetensors.torch.save_file(state_dict, path)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(load_components(path).unet.conv_in.weight, state_dict[ema_name(key)])
    assert torch.equal(load_components(path, use_ema=False).unet.conv_in.weight, state_dict[key])
    assert load_components(path).info.has_ema

    path = tmp_path / "inpainting.ckpt"
    torch.save({"state_dict": tiny_official_state_dict("inpainting", seed=6)}, path)
    loaded = load_components(path)
    assert (loaded.info.variant, loaded.unet.config.in_channels) == ("v1-inpainting", 9)


# ---------------------------------------------------------------------------------------------------------------
# One-line refusals


def test_missing_component_directory_is_named(tmp_path, tiny_folder):
    folder = shutil.copytree(tiny_folder, tmp_path / "sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(MinisdError) as info:
        load_components(folder)
    assert_one_line(info, "vae/")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    """The tiny weights as a diffusers folder, written once; tests that change it work on a copy."""
    return write_diffusers_folder(tmp_path_factory.mktemp("tiny") / "sd", tiny)


@pytest.mark.parametrize(
    ("component", "change", "fragment"),
    [
        ("unet", {"cross_attention_dim": 2048}, "cross_attention_dim 2048 (SDXL)"),
        ("unet", {"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
        ("unet", {"addition_embed_type": "text_time"}, "addition_embed_type"),
        ("vae", {"scaling_factor": 0.13025}, "scaling_factor 0.13025"),
        ("text_encoder", {"hidden_act": "relu"}, "hidden_act 'relu'"),
        ("text_encoder", {"hidden_size": 1280}, "hidden_size 1280 (OpenCLIP ViT-bigG, SDXL)"),
    ],
)
def test_folder_config_not_sd_v1_is_refused(tmp_path, tiny_folder, component, change, fragment):
    folder = shutil.copytree(tiny_folder, tmp_path / "sd")
    config_path = folder / component / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(MinisdError) as info:
        load_components(folder)
    assert_one_line(info, str(config_path), fragment)


def test_single_file_not_sd_v1_is_refused(tmp_path, tiny):
    prefix = "cond_stage_model.transformer.text_model."
    state_dict = {
        k.replace(prefix, "cond_stage_model.model.") if k.startswith(prefix) else k: t
        for k, t in tiny_official_state_dict().items()
    }
    path = tmp_path / "sd2-like.safetensors"
    safetensors.torch.save_file(state_dict, path)
    with pytest.raises(MinisdError) as info:
        load_components(path)
    assert_one_line(info, str(path), "OpenCLIP text encoder's blocks must be resblocks.0")


def test_wrong_shapes_are_refused_in_one_line(tmp_path, tiny):
    state_dict = dict(join_minisd_file(tiny))
    state_dict["unet.conv_out.bias"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state_dict, path)
    with pytest.raises(MinisdError) as info:
        load_components(path)
    assert_one_line(info, "unet", "conv_out")


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        ("missing.safetensors", None, "no such file"),
        ("empty.safetensors", lambda p: p.write_bytes(b""), "empty"),
        ("empty.ckpt", lambda p: p.write_bytes(b""), "empty"),
        ("folder.safetensors", lambda p: p.mkdir(), "directory"),
        ("weights.gguf", lambda p: p.write_bytes(b"GGUF"), "'.gguf'"),
        ("truncated.safetensors", "truncate", "safetensors"),
        ("truncated.ckpt", "truncate", "PyTorch checkpoint"),
        ("garbage.ckpt", lambda p: p.write_bytes(b"\x00" * 100), "PyTorch checkpoint"),
    ],
)
def test_read_state_dict_errors_are_one_line(tmp_path, name, make, fragment):
    path = tmp_path / name
    if make == "truncate":
        write_official(path, tiny_components(seed=1))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif make is not None:
        make(path)
    with pytest.raises(MinisdError) as info:
        read_state_dict(path)
    assert_one_line(info, str(path), fragment)


def test_unknown_source_is_one_line(tmp_path):
    with pytest.raises(MinisdError) as info:
        load_components(tmp_path / "nope.safetensors")
    assert_one_line(info, "nope.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Full size: minisd's loading vs diffusers' single-file conversion of the same file


@pytest.fixture(scope="module")
def full_size_file(tmp_path_factory):
    """A random full-size v1-5-pruned-emaonly.safetensors (4.3 GB fp32) on disk; the dict is freed at once."""
    path = tmp_path_factory.mktemp("full") / "v1-5-pruned-emaonly.safetensors"
    state_dict = random_official_state_dict("emaonly", torch.float32, seed=11)
    safetensors.torch.save_file(state_dict, path, metadata={"format": "pt"})
    del state_dict
    gc.collect()
    yield path
    path.unlink()


def test_full_size_file_matches_diffusers_single_file_conversion(full_size_file):
    loaded = load_components(full_size_file)  # strict: any missing/unexpected/misshaped key would raise
    checkpoint = read_state_dict(full_size_file)  # a second memory map of the same file: no extra memory
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    input_ids = Tokenizer.from_default()(["a photograph of an astronaut riding a horse"])
    # Same weights, same fp32 CPU kernels, only the order of some sums differs: 1e-5 of the output's scale is
    # far below what a wrong or transposed tensor gives (order 1).
    tol = 1e-5
    test = "test_full_size_file_matches_diffusers_single_file_conversion"

    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**asdict(UNetConfig()))
    ref_unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, ref_unet.config), strict=True, assign=True)
    with torch.no_grad():
        ours, ref = loaded.unet(latents, 500, context), ref_unet.eval()(latents, 500, context).sample
    assert_parity(test, "full-size UNet from one official file", ours, ref, tol)
    del ref_unet

    n = len(VAEConfig.block_out_channels)
    with torch.device("meta"):
        ref_vae = AutoencoderKL(
            **asdict(VAEConfig()),
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
        )
    ref_vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, ref_vae.config), strict=True, assign=True)
    with torch.no_grad():
        ours, ref = loaded.vae.decode(latents), ref_vae.eval().decode(latents).sample
    assert_parity(test, "full-size VAE decoder from one official file", ours, ref, tol)
    del ref_vae

    # built on CPU, not meta: transformers computes its non-persistent position_ids buffer in __init__
    ref_clip = CLIPTextModel(CLIPTextConfig(**asdict(TextEncoderConfig())))
    # transformers >= 5.6 has no `text_model.` level in memory and position_ids is no longer stored (as in
    # diffusers' create_diffusers_clip_model_from_ldm)
    clip = {k.removeprefix("text_model."): t for k, t in convert_ldm_clip_checkpoint(checkpoint).items()}
    del clip["embeddings.position_ids"]
    ref_clip.load_state_dict(clip, strict=True)
    with torch.no_grad():
        ours, ref = loaded.text_encoder(input_ids).last_hidden_state, ref_clip.eval()(input_ids).last_hidden_state
    assert_parity(test, "full-size text encoder from one official file", ours, ref, tol)


def test_minisd_file_with_config_metadata_keeps_heads_and_groups(tmp_path):
    """Head counts and GroupNorm groups leave no trace in tensor shapes: minisd's own files (the trainer's) carry
    them as "minisd.config" metadata, and the loader builds exactly those configs."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from minisd.clip import TextEncoder, TextEncoderConfig
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import VAE, VAEConfig
    from weights_convert.detect import MINISD_METADATA, join_minisd_file

    torch.manual_seed(0)
    configs = {
        "unet": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                           cross_attention_dim=64, norm_num_groups=16),
        "vae": VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16),
        "text_encoder": TextEncoderConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4),
    }  # fmt: skip
    models = {
        "unet": UNet(configs["unet"]),
        "vae": VAE(configs["vae"]),
        "text_encoder": TextEncoder(configs["text_encoder"]),
    }
    path = tmp_path / "nano.safetensors"
    metadata = {**MINISD_METADATA, "minisd.config": json.dumps({k: asdict(c) for k, c in configs.items()})}
    save_file(join_minisd_file({k: m.state_dict() for k, m in models.items()}), str(path), metadata=metadata)

    loaded = load_components(path)
    assert loaded.unet.config == configs["unet"]
    assert loaded.vae.config == configs["vae"]
    assert loaded.text_encoder.config == configs["text_encoder"]
    ids = torch.tensor([[49406, 320, 49407] + [49407] * 74])
    torch.testing.assert_close(
        loaded.text_encoder(ids).last_hidden_state, models["text_encoder"](ids).last_hidden_state
    )


def test_sample_size_is_the_models_own_picture_size(tmp_path, tiny, tiny_folder):
    """The default height and width of the API and CLI: 512 for SD v1 files, the unet config's sample_size × the
    VAE's factor for folders, "minisd.sample_size" for minisd's trained files; bad metadata is one line."""
    assert load_components(make_source("official.safetensors", tmp_path, tiny)).sample_size == 512
    folder = shutil.copytree(tiny_folder, tmp_path / "sd")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": 12}))
    loaded = load_components(folder)
    assert loaded.sample_size == 12 * loaded.vae.config.downscale_factor
    source = make_source("minisd.safetensors", tmp_path, tiny)
    state_dict = safetensors.torch.load_file(str(source))
    for text, expected in (("64", 64), ("60", None), ("big", None)):
        path = tmp_path / f"sized-{text}.safetensors"
        safetensors.torch.save_file(state_dict, str(path), metadata={**MINISD_METADATA, "minisd.sample_size": text})
        if expected is not None:
            assert load_components(path).sample_size == expected
        else:
            with pytest.raises(MinisdError) as info:
                load_components(path)
            assert_one_line(info, "minisd.sample_size", repr(text))
