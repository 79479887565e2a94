"""Kandinsky 2.2's prior side, live against the references: the CLIP ViT-bigG text tower with projection and GELU
(transformers' CLIPTextModelWithProjection), the vision tower (CLIPVisionModelWithProjection) and its preprocessing
(CLIPImageProcessor), the PriorTransformer, and the two samplers (unCLIP for the prior, DDPM with linear β for the
decoder) step by step — tiny configs, and the published full sizes where marked."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer, UnCLIPScheduler
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from minisd.attention import attention, attention_reference
from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.kandinsky.image_encoder import ImageEncoder, ImageEncoderConfig
from minisd.kandinsky.prior import Prior, PriorConfig
from minisd.samplers.ddim import DDIMSampler
from minisd.samplers.ddpm import DDPMSampler
from minisd.samplers.schedule import cosine_betas, linear_betas
from minisd.samplers.unclip import UnCLIPSampler
from tests.kandinsky_reference import (
    DECODER_SCHEDULER,
    IMAGE_ENCODER,
    IMAGE_PROCESSOR,
    PRIOR,
    PRIOR_SCHEDULER,
    TEXT_ENCODER,
    diffusers_config,
    randomize,
)
from tests.parity import assert_parity

# fp32, the same operations in the same order (see test_kandinsky_models.REL_TOL): measured 0 at tiny sizes,
# ≤ 3e-6 at full size (48 layers of 1664 for the vision tower).
REL_TOL = 1e-4
BOS, EOS = 49406, 49407

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": 3,
             "projection_dim": 24}  # fmt: skip
TINY_VISION = {**TINY_TEXT, "image_size": 56}
TINY_PRIOR = {"num_attention_heads": 2, "attention_head_dim": 12, "embedding_dim": 32, "num_layers": 2}


def without_prefix(state_dict: dict, prefix: str) -> dict:
    """A transformers state dict as minisd names it: the wrapper level dropped (the loader's job), the position_ids
    buffer left out (minisd makes positions in forward)."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def prompt_ids(lengths: list[int], vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(b, 77) ids as the prior's tokenizer makes them: start, words, end, end-token padding."""
    rows = []
    for n in lengths:
        words = torch.randint(0, min(vocab, BOS) - 1, (n,), generator=generator)
        row = [BOS, *words.tolist(), EOS]
        rows.append(row + [EOS] * (77 - len(row)))
    return torch.tensor(rows)


def check_text_encoder(test: str, sizes: dict, seed: int, meta: bool) -> None:
    config = CLIPTextConfig(**{**TEXT_ENCODER, **sizes})
    with torch.device("meta" if meta else "cpu"):
        ref = CLIPTextModelWithProjection(config)
    randomize(ref, seed)
    fields = {k: v for k, v in {**TEXT_ENCODER, **sizes}.items() if k in TextEncoderConfig.__dataclass_fields__}
    ours_config = TextEncoderConfig(**fields, with_projection=True)  # hidden_act "gelu" comes from the config
    with torch.device("meta"):
        ours = TextEncoder(ours_config)
    ours.load_state_dict(without_prefix(ref.state_dict(), "text_model."), strict=True, assign=True)
    ids = prompt_ids([5, 75], 49408, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        states, embeds = ours.eval().text_embeds(ids)
        want = ref(ids)  # Kandinsky's prior passes no attention mask to the text encoder
    assert_parity(test, "clip text last_hidden_state", states, want.last_hidden_state, REL_TOL)
    assert_parity(test, "clip text_embeds", embeds, want.text_embeds, REL_TOL)


def test_text_encoder_with_projection_parity_tiny():
    check_text_encoder("test_text_encoder_with_projection_parity_tiny", TINY_TEXT, seed=0, meta=False)


@pytest.mark.full_size
def test_text_encoder_with_projection_parity_full_size():
    """CLIP ViT-bigG/14's text tower (695 M parameters), random weights."""
    check_text_encoder("test_text_encoder_with_projection_parity_full_size", {}, seed=1, meta=True)


def test_text_embeds_needs_the_projection():
    encoder = TextEncoder(TextEncoderConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                            num_hidden_layers=1))  # fmt: skip
    with pytest.raises(MinisdError, match="with_projection"):
        encoder.text_embeds(torch.tensor([[BOS, EOS]]))
    with pytest.raises(MinisdError, match="hidden_act must be one of"):
        TextEncoderConfig(hidden_act="relu")


def check_image_encoder(test: str, sizes: dict, seed: int, meta: bool) -> None:
    with torch.device("meta" if meta else "cpu"):
        ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**IMAGE_ENCODER, **sizes}))
    randomize(ref, seed)
    fields = ImageEncoderConfig.__dataclass_fields__
    with torch.device("meta"):
        ours = ImageEncoder(ImageEncoderConfig(**{k: v for k, v in {**IMAGE_ENCODER, **sizes}.items() if k in fields}))
    ours.load_state_dict(without_prefix(ref.state_dict(), "vision_model."), strict=True, assign=True)
    size = ours.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    pixels[1] = 0  # the prior pipeline's "zero embedding" encodes pixel_values of all 0
    with torch.no_grad():
        got, want = ours.eval()(pixels), ref(pixels).image_embeds
    assert_parity(test, "clip image_embeds", got, want, REL_TOL)


def test_image_encoder_parity_tiny():
    check_image_encoder("test_image_encoder_parity_tiny", TINY_VISION, seed=2, meta=False)


@pytest.mark.full_size
def test_image_encoder_parity_full_size():
    """CLIP ViT-bigG/14's vision tower (1.84 G parameters, 7.4 GB in fp32), random weights."""
    check_image_encoder("test_image_encoder_parity_full_size", {}, seed=3, meta=True)


@pytest.mark.parametrize("size", [(300, 200), (224, 224), (150, 400), (17, 9)])
def test_image_preprocessing_equals_clip_image_processor(size):
    pil = Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 60).convert("RGB")
    want = CLIPImageProcessor(**IMAGE_PROCESSOR)(pil, return_tensors="pt").pixel_values
    encoder = ImageEncoder(ImageEncoderConfig(**{**TINY_VISION, "image_size": 224}))
    # The same PIL resize and crop, then (x / 255 − mean) / std in float32: equal but for the division's rounding.
    torch.testing.assert_close(encoder.preprocess(pil), want, rtol=0, atol=1e-6)


def check_prior(test: str, sizes: dict, seed: int, meta: bool) -> None:
    with torch.device("meta" if meta else "cpu"):
        ref = PriorTransformer(**diffusers_config({**PRIOR, **sizes}))
    randomize(ref, seed)
    with torch.device("meta"):
        ours = Prior(
            PriorConfig(**{k: v for k, v in {**PRIOR, **sizes}.items() if k in PriorConfig.__dataclass_fields__})
        )
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    d = ours.config.embedding_dim
    g = torch.Generator().manual_seed(seed)
    x, text_embeds, text_states = (
        torch.randn(3, d, generator=g),
        torch.randn(3, d, generator=g),
        torch.randn(3, 77, d, generator=g),
    )
    text_mask = torch.arange(77)[None] < torch.tensor([[2], [9], [77]])  # "" (start, end), a short prompt, a full one
    with torch.no_grad():
        got = ours.eval()(x, torch.tensor([999, 500, 0]), text_embeds, text_states, text_mask)
        want = ref(x, torch.tensor([999, 500, 0]), proj_embedding=text_embeds, encoder_hidden_states=text_states,
                   attention_mask=text_mask).predicted_image_embedding  # fmt: skip
        assert_parity(test, "prior x0_pred", got, want, REL_TOL)
        assert_parity(test, "prior post_process", ours.post_process(got), ref.post_process_latents(want), REL_TOL)


def test_prior_parity_tiny():
    check_prior("test_prior_parity_tiny", TINY_PRIOR, seed=4, meta=False)


@pytest.mark.full_size
def test_prior_parity_full_size():
    """The published PriorTransformer (1.0 G parameters), random weights."""
    check_prior("test_prior_parity_full_size", {}, seed=5, meta=True)


def test_masked_attention_equals_the_written_out_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = (
        torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
        & (torch.arange(7) < torch.tensor([[3], [7]]))[:, None, None]
    )
    torch.testing.assert_close(attention(q, k, v, mask=mask), attention_reference(q, k, v, mask=mask))


def test_schedules_equal_diffusers():
    """β of Kandinsky's two schedulers; diffusers computes them in float32, minisd in float64."""
    torch.testing.assert_close(cosine_betas().float(), UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER)).betas)
    torch.testing.assert_close(linear_betas().float(), DDPMScheduler.from_config(DECODER_SCHEDULER).betas)


def run_side_by_side(ours, ref, steps: int, shape: tuple, ref_step) -> float:
    """Step both samplers over every timestep with the same model outputs and generators; the worst relative
    difference of x."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    g_ours, g_ref, g = (torch.Generator().manual_seed(7) for _ in range(3))
    x_ours = x_ref = torch.randn(shape, generator=g)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        model_output = 3 * torch.randn(shape, generator=g)  # ±9: some of the prior's x0 are clipped at ±10
        x_ours = ours.step(model_output, t, x_ours, generator=g_ours)
        x_ref = ref_step(model_output, t, x_ref, i, g_ref)
        worst = max(worst, ((x_ours - x_ref).abs().max() / x_ref.abs().max()).item())
    return worst


@pytest.mark.parametrize("steps", [2, 25, 60])
def test_unclip_sampler_follows_diffusers_step_by_step(steps):
    ref = UnCLIPScheduler(**diffusers_config(PRIOR_SCHEDULER))

    def ref_step(out, t, x, i, generator):
        prev = ref.timesteps[i + 1] if i + 1 < len(ref.timesteps) else None  # what the prior pipeline passes
        return ref.step(out, t, x, prev_timestep=prev, generator=generator).prev_sample

    worst = run_side_by_side(UnCLIPSampler(), ref, steps, (2, 32), ref_step)
    # diffusers' last step (t = 0) computes x0's weight β_0 / (1 − ᾱ_0) in float32 with ᾱ_0 = 1 − 4.1e-5: the
    # subtraction keeps 3 significant digits, and the weight comes out 0.99947 instead of 1 (minisd: float64,
    # 1 − 1e-16). That 5.3e-4 is the whole difference; 1e-3 bounds it and still fails on any real mistake (no
    # clipping: 0.1; no noise: O(1)).
    assert worst < 1e-3, worst


@pytest.mark.parametrize("make", [lambda: DDPMSampler(betas=linear_betas()), lambda: DDIMSampler(betas=linear_betas())])
def test_decoder_samplers_with_linear_betas_follow_diffusers(make):
    ours = make()
    ref_class = DDPMScheduler if isinstance(ours, DDPMSampler) else DDIMScheduler
    ref = ref_class.from_config(DECODER_SCHEDULER)

    def ref_step(out, t, x, i, generator):
        return ref.step(out, t, x, generator=generator).prev_sample

    # float64 ᾱ against diffusers' float32 cumulative product: measured 5e-7 over 100 steps.
    assert run_side_by_side(ours, ref, 100, (1, 4, 8, 8), ref_step) < 1e-5
