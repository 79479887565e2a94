"""The nano CLIP stage (minisd/train/text_pretraining.py): its pooled output and loss are transformers' CLIP's, the
scene targets join the two phrasings of a pair, and a short run teaches a text encoder the order of two objects."""

import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from minisd.clip import TextEncoder
from minisd.tokenizer import Tokenizer
from minisd.train import shapes
from minisd.train.common import build
from minisd.train.diffusion_training import NANO_TEXT_ENCODER
from minisd.train.text_pretraining import (
    TextPretrainingConfig,
    contrastive_loss,
    pooled,
    pretrain_text_encoder,
    scene_ids,
)
from tests.test_clip import TINY, realistic_ids, reference_model


def test_pooled_is_transformers_pooler_output():
    """The end token's state, read after cutting the padding, is CLIPTextModel's pooler_output on all 77 tokens."""
    ref = reference_model(TINY, seed=0)
    ours = TextEncoder(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    input_ids = realistic_ids([1, 5, 12, 30], torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids).pooler_output
        got = pooled(ours, input_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loss_with_one_caption_per_scene_is_clips():
    """Every scene once in the batch: the targets are one-hot and the loss is CLIP's symmetric cross-entropy."""
    g = torch.Generator().manual_seed(0)
    image_embeds, text_embeds = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    logit_scale = torch.tensor(2.0)
    image_n, text_n = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits_per_text = logit_scale.exp() * text_n @ image_n.T
    expected = image_text_contrastive_loss(logits_per_text)
    got = contrastive_loss(image_embeds, text_embeds, logit_scale, torch.arange(6))
    torch.testing.assert_close(got, expected)


def test_a_repeated_scene_splits_its_target():
    """Two copies of a scene: each row's target is 1/2 on both, so identical pairs cost log 2 less than CLIP's
    one-hot target would charge when the similarities tie."""
    embeds = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scenes = torch.tensor([7, 7, 3])
    logit_scale = torch.tensor(4.0)
    logits = logit_scale.exp() * embeds @ embeds.T
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()  # symmetric logits: both directions equal
    torch.testing.assert_close(contrastive_loss(embeds, embeds, logit_scale, scenes), expected)


def test_scene_ids_join_phrasings_and_part_mirrors():
    captions = [
        "a red circle above a blue square",
        "a blue square below a red circle",  # the same picture
        "a blue square above a red circle",  # its mirror
        "a red circle",
        "a red circle to the left of a blue square",
        "the blue square under a red circle.",  # the first picture again, paraphrased
    ]
    ids = scene_ids(Tokenizer.from_default()(captions))
    assert ids[0] == ids[1] == ids[5]
    assert len({ids[0].item(), ids[2].item(), ids[3].item(), ids[4].item()}) == 4
    assert torch.equal(scene_ids(Tokenizer.from_default()(captions)[:, None].expand(-1, 3, -1)), ids)  # (n, k, 77)


def test_short_pretraining_tells_a_caption_from_its_mirror():
    """400 steps against stand-in latents (a fixed random code per scene + noise, so the test needs no VAE): the
    held-out captions, never trained on, land nearer their other phrasing than their mirror image, which a bag of
    words cannot do (the mirror has the same words)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    train = shapes.train_captions()
    keys = sorted({shapes.scene_key(shapes.parse_caption(c)) for c in shapes.all_captions()}, key=str)
    codes = torch.randn(len(keys), 4, 8, 8, generator=g)
    captions = [train[i] for i in torch.randint(len(train), (4000,), generator=g)]
    mean = torch.stack([codes[keys.index(shapes.scene_key(shapes.parse_caption(c)))] for c in captions])
    std = torch.full_like(mean, 0.3)
    tokenizer = Tokenizer.from_default()
    text_encoder = build(TextEncoder, NANO_TEXT_ENCODER, torch.Generator().manual_seed(0))
    config = TextPretrainingConfig(steps=400, batch_size=128)
    pretrain_text_encoder(text_encoder, mean, std, tokenizer(captions), 1.0, config, progress=False)

    def states(texts: list[str]) -> torch.Tensor:  # the end token's state, which the UNet reads the scene from
        with torch.no_grad():
            return F.normalize(pooled(text_encoder, tokenizer(texts)), dim=-1)

    right = 0
    heldout = shapes.heldout_captions()
    for caption in heldout:
        top_left, bottom_right, axis = shapes.scene_key(shapes.parse_caption(caption))
        words = ("above", "below") if axis == 0 else ("to the left of", "to the right of")
        phrasings = {f"{top_left} {words[0]} {bottom_right}", f"{bottom_right} {words[1]} {top_left}"}
        (other,) = phrasings - {caption}
        mirror = f"{bottom_right} {words[0]} {top_left}"
        s = states([caption, other, mirror])
        right += int(s[0] @ s[1] > s[0] @ s[2])
    assert right >= 0.9 * len(heldout), f"{right}/{len(heldout)}"
