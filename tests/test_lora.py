"""LoRAs: minisd applies kohya/A1111 and diffusers/PEFT files as diffusers does (load_lora_weights, set_adapters,
fuse_lora), on the fly and merged, several at once; unloading gives back every weight bit for bit.

Tolerances. On the fly, both sides add the same low-rank path, B (A x) · scale · α / r, after the same layer: measured
0 (bit-equal). Merged, both add scale · (α / r) · B A to W, minisd summing in float32 like diffusers' fp32 weights but
scaling B A before or after the product in another order: ~1e-7 relative per weight, ~1e-6 at the output. The bar
1e-5 of the output's scale catches any wrong α / r (a factor ≥ 1.25 on one layer moves the output by > 1e-2), a
transposed or misplaced factor, or a missing layer.
"""

import types
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.lora import Adapters, lora_tags, read_lora
from minisd.pipelines.txt2img import txt2img
from minisd.unet import UNet, UNetConfig
from tests.fakes import kohya_lora, lora_targets
from tests.parity import assert_parity
from tests.test_pipelines import SIZE, check_pixels, random_full_size, reference_pipeline, start_latents
from tests.twins import make_twins
from weights_convert.keymap_ldm import minisd_unet_layout, unet_table

TOL = 1e-5  # of the output's scale; see the module docstring


@pytest.fixture
def fresh(tmp_path_factory):
    """Fresh tiny twins (LoRAs change the networks) and minisd's Adapters on them."""
    fresh = make_twins(tmp_path_factory.getbasetemp() / "tokenizer")
    fresh.adapters = Adapters({"unet": fresh.ours.unet, "text_encoder": fresh.ours.text_encoder})
    return fresh


def inputs(seed: int = 0, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 77, width, generator=g), ids


def compare(test: str, what: str, fresh, tol: float = TOL) -> None:
    """The UNet's ε and the text encoder's last hidden state, minisd's against diffusers'."""
    x, t, context, ids = inputs(width=fresh.ours.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert_parity(test, f"{what}: UNet", fresh.ours.unet(x, t, context), fresh.ref.unet(x, t, context).sample, tol)
        ours, ref = fresh.ours.text_encoder(ids).last_hidden_state, fresh.ref.text_encoder(ids).last_hidden_state
        assert_parity(test, f"{what}: text encoder", ours, ref, tol)


def networks(fresh) -> dict:
    return {"unet": fresh.ours.unet, "text_encoder": fresh.ours.text_encoder}


def test_kohya_lora_on_the_fly_and_fused_matches_diffusers(fresh, tmp_path):
    path = tmp_path / "style.safetensors"
    save_file(kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=1), path)
    before = {k: v.clone() for k, v in fresh.ours.unet.state_dict().items()}
    fresh.pipe.load_lora_weights(str(path), adapter_name="style")
    fresh.pipe.set_adapters(["style"], [0.8])
    weights = read_lora(path, networks(fresh))
    assert {w.module for w in weights} >= {"down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.proj_in"}  # LoCon
    fresh.adapters.add("style", weights, 0.8)
    compare("test_kohya_lora_on_the_fly", "kohya LoRA on the fly, weight 0.8", fresh)

    fresh.pipe.fuse_lora(lora_scale=1.0)  # merges the adapter at its set weight, 0.8
    fresh.adapters.fuse()
    assert not any(m._forward_hooks for m in fresh.ours.unet.modules()), "fusing leaves no hook"
    compare("test_kohya_lora_fused", "kohya LoRA fused, weight 0.8", fresh)
    fresh.adapters.unload()
    assert all(torch.equal(before[k], v) for k, v in fresh.ours.unet.state_dict().items()), (
        "unload restores bit for bit"
    )


def test_per_layer_alphas_where_diffusers_ignores_them(fresh, tmp_path):
    """kohya's alpha is per layer (A1111 reads each layer's). diffusers 0.42.1 turns differing alphas into a PEFT
    alpha_pattern whose attention and CLIP self-attention keys match no module (peft warns and ignores them), so those
    layers get the most common alpha instead. The same LoRA with each α / r folded into B is read right by both:
    minisd's output on the per-layer file equals it, diffusers' on the per-layer file does not."""
    save_file(
        kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=7, alphas="per-layer"), tmp_path / "a.safetensors"
    )
    save_file(kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=7, alphas="folded"), tmp_path / "f.safetensors")
    fresh.pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="per_layer")
    x, t, context, _ = inputs()
    with torch.no_grad():
        diffusers_per_layer = fresh.ref.unet(x, t, context).sample
        fresh.pipe.delete_adapters("per_layer")
        fresh.pipe.load_lora_weights(str(tmp_path / "f.safetensors"), adapter_name="folded")
        fresh.adapters.add("per_layer", read_lora(tmp_path / "a.safetensors", networks(fresh)))
        folded = fresh.ref.unet(x, t, context).sample
    compare("test_per_layer_alphas", "per-layer alphas vs diffusers with α / r folded into B", fresh)
    assert (diffusers_per_layer - folded).abs().max() > 1e-2 * folded.abs().max(), "diffusers' own reading differs"


def test_two_loras_with_their_own_weights_and_a_peft_file_written_by_diffusers(fresh, tmp_path):
    save_file(kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=2, rank=2), tmp_path / "a.safetensors")
    save_file(kohya_lora(fresh.ours.unet, None, seed=3, rank=8), tmp_path / "b.safetensors")
    # diffusers writes the second one again in its own PEFT format (lora_A / lora_B, unet. prefix, lora_alpha in
    # the metadata, which differ from the rank): the file minisd reads is diffusers' own.
    fresh.pipe.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    peft_unet = get_peft_model_state_dict(fresh.ref.unet, adapter_name="b")
    metadata = fresh.ref.unet.peft_config["b"].to_dict()
    assert metadata["alpha_pattern"] or metadata["lora_alpha"] != metadata["r"], "alpha must differ from the rank"
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=peft_unet, unet_lora_adapter_metadata=metadata, safe_serialization=True
    )
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    fresh.pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    fresh.pipe.set_adapters(["a", "b"], [0.7, -0.5])
    fresh.adapters.add("a", read_lora(tmp_path / "a.safetensors", networks(fresh)), 0.7)
    fresh.adapters.add("b", read_lora(peft_file, networks(fresh)), -0.5)
    compare("test_two_loras", "kohya 0.7 + diffusers/PEFT -0.5 on the fly", fresh)


def test_ldm_named_kohya_keys_match_diffusers(fresh, tmp_path):
    """kohya keys in the official file's names (lora_unet_input_blocks_1_1_proj_in…), as some trainers write them and
    A1111 reads them. diffusers 0.42.1 cannot load them for SD v1 (its LDM-name mapping runs for SDXL only; PEFT
    finds no module such as "1.1.proj_in"), so the reference is diffusers reading the same factors under diffusers
    names: minisd's output on the LDM-named file must equal it."""
    names = fresh.ours.unet.state_dict().keys()
    to_ldm = {ours.removesuffix(".weight"): ldm.removesuffix(".weight") for ldm, ours in unet_table(
        *minisd_unet_layout(names)).items() if ours.endswith(".weight")}  # fmt: skip
    save_file(kohya_lora(fresh.ours.unet, None, seed=4, ldm_unet=to_ldm), tmp_path / "ldm.safetensors")
    save_file(kohya_lora(fresh.ours.unet, None, seed=4), tmp_path / "diffusers-names.safetensors")
    with pytest.raises(Exception, match="not found in the base model"):
        fresh.pipe.load_lora_weights(str(tmp_path / "ldm.safetensors"), adapter_name="ldm")
    fresh.pipe.load_lora_weights(str(tmp_path / "diffusers-names.safetensors"), adapter_name="same")
    fresh.adapters.add("ldm", read_lora(tmp_path / "ldm.safetensors", networks(fresh)))
    x, t, context, _ = inputs()
    with torch.no_grad():
        ours, ref = fresh.ours.unet(x, t, context), fresh.ref.unet(x, t, context).sample
    assert_parity("test_ldm_named_kohya_keys", "kohya LoRA in LDM names: UNet", ours, ref, TOL)


def test_lora_picture_matches_diffusers(fresh, tmp_path):
    path = tmp_path / "style.safetensors"
    save_file(kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=5), path)
    fresh.pipe.load_lora_weights(str(path), adapter_name="style")
    fresh.pipe.set_adapters(["style"], [0.6])
    fresh.adapters.add("style", read_lora(path, networks(fresh)), 0.6)
    kwargs = dict(prompt="a photo of a cat", height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    ours = txt2img(fresh.ours, **kwargs, latents=start_latents(1, 3), sampler="DDIM")
    want = fresh.pipe(**kwargs, latents=start_latents(1, 3)).images
    check_pixels("test_lora_picture", "txt2img with a kohya LoRA at 0.6 (on the fly)", ours, want)


def test_full_size_lora_matches_diffusers(fresh, tmp_path):
    """SD v1's UNet and text encoder at full size with random weights and a rank-8 LoCon LoRA over every attention,
    projection, feed-forward and ResNet layer: on the fly and fused against diffusers, then unloaded bit for bit.
    Each pair shares one set of tensors (assign=True): diffusers' is computed before minisd's fuse writes into them."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.rand(2**26, generator=generator) * 2 - 1
    with torch.device("meta"):
        ref_unet, unet, text_encoder = UNet2DConditionModel(**asdict(UNetConfig())), UNet(UNetConfig()), None
        text_encoder = TextEncoder(TextEncoderConfig())
    ref_text = CLIPTextModel(CLIPTextConfig(**asdict(TextEncoderConfig())))
    for ref_module, module in ((ref_unet, unet), (ref_text, text_encoder)):
        ref_module.load_state_dict(random_full_size(ref_module, pool, generator), strict=True, assign=True)
        module.load_state_dict(ref_module.state_dict(), strict=True, assign=True)
        ref_module.eval(), module.eval()
    del pool
    path = tmp_path / "full-lora.safetensors"
    save_file(kohya_lora(unet, text_encoder, seed=6, rank=8), path)
    targets = {name: m.weight.clone() for _, name, m in lora_targets(unet, None)}
    ref = types.SimpleNamespace(tokenizer=fresh.ref.tokenizer, text_encoder=ref_text, vae=fresh.ref.vae, unet=ref_unet)
    reference_pipeline(StableDiffusionPipeline, ref, "DDIM").load_lora_weights(str(path))
    adapters = Adapters({"unet": unet, "text_encoder": text_encoder})
    adapters.add("full", read_lora(path, {"unet": unet, "text_encoder": text_encoder}))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    test = "test_full_size_lora"
    with torch.no_grad():
        want_eps, want_text = ref_unet(x, 500, context).sample, ref_text(ids).last_hidden_state
        assert_parity(test, "full-size UNet, LoCon LoRA on the fly", unet(x, 500, context), want_eps, TOL)
        ours_text = text_encoder(ids).last_hidden_state
        assert_parity(test, "full-size text encoder, LoRA on the fly", ours_text, want_text, TOL)
        adapters.fuse()
        assert_parity(test, "full-size UNet, LoCon LoRA fused", unet(x, 500, context), want_eps, TOL)
    adapters.unload()
    assert all(torch.equal(unet.get_submodule(name).weight, w) for name, w in targets.items())


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        ({"lora_te1_text_model_x.lora_down.weight": torch.zeros(2, 2)}, "SDXL"),
        ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 64, 1, 1)}, "one of its two factors"),
        (
            {
                "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 2),
                "lora_unet_no_such_layer.lora_up.weight": torch.zeros(2, 2),
            },
            "names no module",
        ),
        (
            {
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(
                    4, 1024
                ),
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4),
            },
            "do not fit its weight",
        ),  # fmt: skip  (an SD 2.x LoRA: a 1024-wide context)
        ({"model.diffusion_model.out.2.bias": torch.zeros(4)}, "not a LoRA of a known form"),
    ],
    ids=["loha", "sdxl", "half", "unknown-module", "sd2-shapes", "checkpoint"],
)
def test_bad_lora_files_are_one_line(fresh, tmp_path, keys, fragment):
    save_file(keys, tmp_path / "bad.safetensors")
    with pytest.raises(MinisdError, match=fragment) as error:
        fresh.adapters.add("bad", read_lora(tmp_path / "bad.safetensors", networks(fresh)))
    assert "\n" not in str(error.value) and not fresh.adapters.adapters


def test_lora_tags():
    assert lora_tags("a <lora:ink:-0.5> fox") == ("a  fox", {"ink": -0.5})
    for bad in ("<lora:a:1:2>", "<lora:a> <lora:a:0.5>", "<lora::1>", "<lora:a:x>"):
        with pytest.raises(MinisdError, match="LoRA tag"):
            lora_tags(bad)


def test_kohya_lora_on_an_sd2_model_matches_diffusers(tmp_path_factory, tmp_path):
    """An SD 2.x LoRA (kohya names, the text encoder in transformers' layout as sd-scripts trains SD 2's OpenCLIP) on
    SD 2-shaped networks: the UNet's linear proj_in / proj_out and 64-wide heads, a GELU text encoder, "!" padding.
    On the fly and fused, against diffusers."""
    fresh = make_twins(tmp_path_factory.getbasetemp() / "tokenizer-sd2", sd2=True)
    fresh.adapters = Adapters(networks(fresh))
    assert isinstance(fresh.ours.unet.mid_block.attentions[0].proj_in, torch.nn.Linear)
    x, t, context, ids = inputs(width=fresh.ours.unet.config.cross_attention_dim)
    with torch.no_grad():
        base = fresh.ours.unet(x, t, context), fresh.ours.text_encoder(ids).last_hidden_state
    path = tmp_path / "sd2.safetensors"
    save_file(kohya_lora(fresh.ours.unet, fresh.ours.text_encoder, seed=6), path)
    fresh.pipe.load_lora_weights(str(path), adapter_name="sd2")
    fresh.pipe.set_adapters(["sd2"], [0.9])
    weights = read_lora(path, networks(fresh))
    assert "mid_block.attentions.0.proj_in" in {w.module for w in weights}
    fresh.adapters.add("sd2", weights, 0.9)
    compare("test_sd2_lora", "SD 2 LoRA on the fly, weight 0.9", fresh)
    with torch.no_grad():
        changed = fresh.ours.unet(x, t, context), fresh.ours.text_encoder(ids).last_hidden_state
    for after, before in zip(changed, base, strict=True):
        assert (after - before).abs().max() > 1e-2 * before.abs().max(), "the LoRA changes UNet and text encoder"
    fresh.pipe.fuse_lora(lora_scale=1.0)
    fresh.adapters.fuse()
    compare("test_sd2_lora", "SD 2 LoRA fused, weight 0.9", fresh)
