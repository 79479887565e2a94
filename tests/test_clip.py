"""minisd's TextEncoder computes what transformers' CLIPTextModel computes, given the same weights; clip skip
matches diffusers' StableDiffusionPipeline.encode_prompt."""

import types
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from tests.parity import assert_parity

BOS, EOS = 49406, 49407  # CLIP's start and end tokens; SD v1's tokenizer pads with the end token too

# SD v1 with smaller numbers (the real vocabulary, so the ids below are realistic).
TINY = TextEncoderConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
# SD 2.x's OpenCLIP ViT-H/14 text tower as diffusers' stabilityai/stable-diffusion-2-1 text_encoder/config.json has it:
# 23 of OpenCLIP's 24 layers (SD 2 reads the penultimate one), width 1024, 16 heads, exact GELU.
SD2 = TextEncoderConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)
TINY_SD2 = TextEncoderConfig(
    hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu"
)

# fp32 on CPU with the same operations in the same order: what may differ is the summation order inside matmuls and
# the attention kernel, ~1e-7 relative per operation, ~1e-6 after 12 layers (measured: 0, bit-identical, against
# transformers' default SDPA path; 7e-7 against its eager softmax path). The bar, 1e-4 of the output's scale, keeps
# two orders of margin and still catches real mistakes: exact GELU for quick-GELU gives 2e-2, no causal mask 1.
REL_TOL = 1e-4


def realistic_ids(prompt_lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """(b, 77) ids as SD v1's tokenizer makes them: start, random word ids, end, then end-token padding."""
    rows = []
    for n in prompt_lengths:
        words = torch.randint(0, BOS, (n,), generator=generator)
        row = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
        rows.append(torch.cat([row, torch.full((77 - len(row),), EOS)]))
    return torch.stack(rows)


def reference_model(config: TextEncoderConfig, seed: int) -> CLIPTextModel:
    """transformers' model at `config`, with every weight random: transformers' init leaves LayerNorms at (1, 0)
    and linear biases at 0, so those are redrawn too, and a wrong bias or norm path cannot hide."""
    torch.manual_seed(seed)  # transformers' own init draws from the global generator
    ref = CLIPTextModel(CLIPTextConfig(**asdict(config))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return ref


def check_parity(test: str, config: TextEncoderConfig, seed: int) -> None:
    ref = reference_model(config, seed)
    ours = TextEncoder(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    input_ids = realistic_ids([6, 75], torch.Generator().manual_seed(seed))  # a short prompt and a full one

    def run_ours():
        return ours(input_ids)

    def run_ref():
        return ref(input_ids, attention_mask=None, output_hidden_states=True)  # SD v1: no padding mask

    with torch.no_grad():
        got, want = run_ours(), run_ref()
    models = (ours, ref, run_ours, run_ref)
    assert_parity(test, "clip last_hidden_state", got.last_hidden_state, want.last_hidden_state, REL_TOL, models)
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for i, (ours_h, ref_h) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        assert_parity(test, f"clip hidden_states[{i}]", ours_h, ref_h, REL_TOL, models)


def test_parity_tiny():
    check_parity("test_parity_tiny", TINY, seed=0)


def test_parity_full_sd_v1():
    """The full 123M-parameter SD v1 text encoder, random weights."""
    check_parity("test_parity_full_sd_v1", TextEncoderConfig(), seed=1)


def test_parity_tiny_sd2():
    """SD 2's differences at tiny size: exact GELU, heads of another width."""
    check_parity("test_parity_tiny_sd2", TINY_SD2, seed=3)


def test_parity_full_sd2():
    """The full 340M-parameter SD 2 text encoder (23 layers of 1024), random weights; same bar as SD v1's: one
    more order of depth and width moves the fp32 rounding from ~1e-7 to at most a few 1e-7."""
    check_parity("test_parity_full_sd2", SD2, seed=4)


def test_gelu_is_not_quick_gelu():
    """The activation field matters: the same weights with quick-GELU give another output (so the parity above
    would catch a tower built with the wrong one)."""
    ref = reference_model(TINY_SD2, seed=5)
    ours = TextEncoder(TextEncoderConfig(**{**asdict(TINY_SD2), "hidden_act": "quick_gelu"})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    input_ids = realistic_ids([6], torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = ours(input_ids).last_hidden_state, ref(input_ids).last_hidden_state
    assert (got - want).abs().max() > 100 * REL_TOL * want.abs().max()


class FixedTokenizer:
    """Stands in for CLIPTokenizer inside encode_prompt (the tokenizer is not under test here): returns fixed ids."""

    model_max_length = 77

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __call__(self, prompt, padding=None, max_length=None, truncation=None, return_tensors=None):
        return types.SimpleNamespace(input_ids=self.input_ids)


@pytest.mark.parametrize("clip_skip", [None, 1, 2, 3])
def test_clip_skip_matches_diffusers_encode_prompt(clip_skip):
    ref = reference_model(TINY, seed=2)
    ours = TextEncoder(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    input_ids = realistic_ids([3, 10], torch.Generator().manual_seed(2))
    # diffusers 0.42.1 reaches the final norm as `text_encoder.text_model.final_layer_norm`, a path transformers 5.x's
    # CLIPTextModel no longer has (it holds final_layer_norm itself): give it that path to the same module.
    ref.text_model = types.SimpleNamespace(final_layer_norm=ref.final_layer_norm)
    pipe = types.SimpleNamespace(tokenizer=FixedTokenizer(input_ids), text_encoder=ref)
    with torch.no_grad():
        want, _ = StableDiffusionPipeline.encode_prompt(
            pipe, ["a", "b"], "cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=clip_skip
        )
        got = ours.prompt_embeds(input_ids, clip_skip=clip_skip)
    assert_parity(f"test_clip_skip[{clip_skip}]", f"clip prompt_embeds clip_skip={clip_skip}", got, want, REL_TOL)


def test_clip_skip_zero_is_no_skip():
    ours = TextEncoder(TINY).eval()
    input_ids = realistic_ids([4], torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.prompt_embeds(input_ids, 0), ours(input_ids).last_hidden_state, rtol=0, atol=0)


def test_meta_construction_then_assign_load():
    ref = reference_model(TINY, seed=4)
    with torch.device("meta"):
        ours = TextEncoder(TINY)
    assert list(ours.buffers()) == []  # nothing computed in __init__ that a meta build would lose
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    input_ids = realistic_ids([5, 20], torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours.eval()(input_ids).last_hidden_state
        want = ref(input_ids).last_hidden_state
    assert_parity("test_meta_construction", "clip after meta + assign", got, want, REL_TOL)


def test_state_dict_keys_equal_transformers():
    assert set(TextEncoder(TINY).state_dict()) == set(reference_model(TINY, seed=5).state_dict())


@pytest.mark.parametrize("config", [TextEncoderConfig(), SD2], ids=["sd1", "sd2"])
def test_config_fields_are_clip_text_config_keys(config):
    """Each field is a CLIPTextConfig key, so a config.json maps onto TextEncoderConfig field by field."""
    ref_config = CLIPTextConfig(**asdict(config))
    for key, value in asdict(config).items():
        assert getattr(ref_config, key) == value


@pytest.mark.parametrize(
    ("input_ids", "fragment"),
    [
        (torch.full((77,), EOS), "(batch, sequence)"),  # one prompt without its batch dim
        (torch.full((1, 1, 77), EOS), "(batch, sequence)"),
        (torch.full((2, 78), EOS), "length must be in [1, 77]"),
        (torch.full((2, 77), 1.0), "integer"),
        (torch.full((2, 77), 49408), "[0, 49407]"),
        (torch.full((2, 77), -1), "[0, 49407]"),
    ],
)
def test_bad_input_ids_raise_one_line(input_ids, fragment):
    ours = TextEncoder(TINY)
    with pytest.raises(MinisdError) as info:
        ours(input_ids)
    message = str(info.value)
    assert "input_ids" in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("clip_skip", [-1, 4, 1.0, True])
def test_bad_clip_skip_raises(clip_skip):
    with pytest.raises(MinisdError, match="clip_skip"):
        TextEncoder(TINY).prompt_embeds(torch.full((1, 77), EOS), clip_skip=clip_skip)


def test_bad_config_raises():
    with pytest.raises(MinisdError, match="num_attention_heads"):
        TextEncoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(MinisdError, match="hidden_act must be one of quick_gelu, gelu, got 'relu'"):
        TextEncoderConfig(hidden_act="relu")
