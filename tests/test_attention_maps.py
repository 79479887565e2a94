"""Cross-attention maps: the recorder's P equals diffusers' attention_probs for the same UNet and inputs (live), it
aggregates as documented, leaves the UNet as it found it, and the localisation score can both hit and miss.

The measured localisation of the shipped nano model is printed by `python -m minisd.train.localisation`."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from einops import rearrange

from minisd.errors import MinisdError
from minisd.pipelines.attention_maps import CrossAttentionMaps, grid_of, token_labels
from minisd.tokenizer import Tokenizer
from minisd.train import localisation, shapes
from minisd.unet import UNet, UNetConfig

CONFIG = UNetConfig(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32)


class CaptureProbs(AttnProcessor):
    """diffusers' plain attention processor, keeping the cross-attention probabilities it computes."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None:  # attn2
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(query, key, None)  # (b·nh, s, 77), diffusers' own softmax
            self.store.append((probs.shape[1], rearrange(probs, "(b nh) s t -> b nh s t", nh=attn.heads)))
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def test_recorded_maps_equal_diffusers_attention_probs():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**asdict(CONFIG)).eval()
    ours = UNet(CONFIG).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    store: list = []
    ref.set_attn_processor(CaptureProbs(store))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 16, 16, generator=g)  # the batch [∅, ∅, c, c] of a guided run of 2 prompts
    context = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        ref(latents, 500, encoder_hidden_states=context)
        with CrossAttentionMaps(ours, guided=True) as recorder:
            ours(latents, 500, context)
    # Expected: diffusers' P of the conditional half, mean over heads, for the modules on grids of side >= 4
    # (useful_min_side(16); the tiny UNet attends at 16, 8, 4 and, in its mid block, 2), each grid's modules
    # averaged, upsampled to 16×16, then the grids averaged.
    per_grid: dict = {}
    for s, probs in store:
        h = w = int(s**0.5)
        if h < 4:
            continue  # the 2×2 mid block: coarser than useful_min_side
        maps = rearrange(probs[2:].mean(dim=1), "b (h w) t -> b t h w", h=h, w=w)
        per_grid.setdefault(h, []).append(maps)
    expected = sum(
        F.interpolate(torch.stack(m).mean(0), size=(16, 16), mode="bilinear", align_corners=False)
        for m in per_grid.values()
    ) / len(per_grid)
    assert len(recorder.calls) == 1 and recorder.calls[0].shape == (2, 77, 16, 16)
    # Same fp32 CPU ops up to the softmax's summation order (baddbmm vs matmul): ~1e-7; 1e-5 leaves room, while
    # the unconditional half, a missed head or a missed grid move the maps by 1e-3 and more.
    torch.testing.assert_close(recorder.calls[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(recorder.token_maps().sum(dim=1), torch.ones(2, 16, 16), rtol=0, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.modules())  # hooks removed


def test_grid_of_and_errors():
    assert grid_of(64 * 64, 64, 64) == (64, 64) and grid_of(4, 8, 8) == (2, 2)
    with pytest.raises(MinisdError, match="halving"):
        grid_of(7, 8, 8)
    with pytest.raises(MinisdError, match="no cross-attention maps"):
        CrossAttentionMaps(UNet(CONFIG), guided=False).token_maps()


def test_token_labels_name_every_position():
    labels = token_labels(Tokenizer.from_default(), "a red circle above a blue square")
    assert len(labels) == 77 and labels[-1] == "<pad>"
    assert labels[:9] == ["<start>", "a", "red", "circle", "above", "a", "blue", "square", "<end>"]


def test_score_counts_hits_and_misses():
    caption = "a red circle above a blue square"
    picture = shapes.render(caption, 0)[None].float() / 255  # (1, 3, 64, 64) in [0, 1]
    box = localisation.boxes(picture[0])
    maps = torch.zeros(1, 77, 64, 64)
    for thing, _, position in localisation.word_slots(caption):
        x0, y0, x1, y1 = box[thing.colour]
        maps[0, position, (y0 + y1) // 2, (x0 + x1) // 2] = 1  # every word peaks at its own object's centre
    hit = localisation.score(maps, picture, [caption])
    assert hit.hits == {"colour": 2, "shape": 2} and hit.totals == {"colour": 2, "shape": 2}
    assert 0 < hit.chance < 0.2
    swapped = maps[:, [0, 1, 6, 7, 4, 5, 2, 3]]  # red's maps on blue's object and back
    swapped = torch.cat([swapped, maps[:, 8:]], dim=1)
    miss = localisation.score(swapped, picture, [caption])
    assert miss.hits == {"colour": 0, "shape": 0}
