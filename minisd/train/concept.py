"""A new concept for the nano model: the diamond (a square standing on a corner), a shape it has never seen
(shapes.NEW_SHAPES), and the captions that teach it and test it. Textual inversion and LoRA (train/finetune.py) each
learn it from the same few dozen pictures.

    training pictures   NUM_PICTURES = 48 pictures of the 4 single diamonds ("a red diamond") and of 12 two-object
                        scenes with a diamond, 3 for each (axis, side of the diamond): vertical or horizontal, the
                        diamond first (top/left) or second; each picture is captioned in either of its two phrasings
    held-out captions   16 other scenes with a diamond, 4 per (axis, side), in both phrasings: 32 captions never drawn
                        for training, each a diamond with a shape and colour in a place not seen with it
    the word            LoRA: "diamond", a word of CLIP's vocabulary the nano model never learned (its row of the
                        token table got no gradient, only AdamW's weight decay); textual inversion: "<diamond>", a
                        new word

Why not a star, or a new colour: whatever the UNet learns, the picture is drawn by the frozen nano VAE's decoder, and
it cannot draw them. Its reconstructions of 48 star pictures come back as pentagon-like blobs (0 of 48 judged stars)
and purple, orange and cyan come back blue, yellow and blue: it learned 4 colours and 3 shapes from 20,000 pictures
and nothing else. A diamond it can draw (88% of its reconstructions are judged diamonds; small ones come back round):
a concept must lie within what the decoder can draw, the lesson SD v1's general-purpose VAE hides.

The scenes are picked by a shuffle fixed by SPLIT_SEED, then taken in order until each (axis, side) has its count:
the split is the same on every machine and never depends on a training seed.
"""

import torch
from torch import Tensor

from minisd.train import shapes

CONCEPT = "diamond"
TOKEN = "<diamond>"  # textual inversion's new word
NUM_PICTURES = 48
TRAIN_SCENES_PER_KIND, HELDOUT_SCENES_PER_KIND = 3, 4  # per (axis, side of the diamond): 12 and 16
SPLIT_SEED = 0


def _scene_captions() -> dict[tuple, list[str]]:
    """Every two-object scene with exactly one diamond (its other object another shape and colour) -> its two
    phrasings, in the grammar's order."""
    things = [shapes.Thing(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    scenes: dict[tuple, list[str]] = {}
    for concept in [shapes.Thing(c, CONCEPT) for c in shapes.COLOURS]:
        for other in things:
            if other.colour == concept.colour:
                continue
            for first, second in ((concept, other), (other, concept)):
                for relation in shapes.RELATIONS:
                    caption = str(shapes.Scene(first, relation, second))
                    scenes.setdefault(shapes.scene_key(shapes.parse_caption(caption)), []).append(caption)
    return scenes


def _kind(key: tuple) -> tuple[int, bool]:
    """(axis, is the diamond the top/left object) of a scene key (top/left thing, bottom/right thing, axis)."""
    return key[2], key[0].shape == CONCEPT


def split() -> tuple[list[str], list[str]]:
    """(training captions, held-out captions): the 4 single diamonds and 12 scenes × 2 phrasings for training (28),
    16 other scenes × 2 phrasings held out (32); see the module docstring."""
    scenes = _scene_captions()
    keys = sorted(scenes, key=str)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    taken: dict[tuple, int] = {}
    train, heldout = [], []
    for i in order:
        key = keys[i]
        n = taken.get(_kind(key), 0)
        if n < TRAIN_SCENES_PER_KIND:
            train += scenes[key]
        elif n < TRAIN_SCENES_PER_KIND + HELDOUT_SCENES_PER_KIND:
            heldout += scenes[key]
        taken[_kind(key)] = n + 1
    singles = [str(shapes.Scene(shapes.Thing(c, CONCEPT))) for c in shapes.COLOURS]
    return singles + train, heldout


def pictures(seed: int = 0) -> tuple[Tensor, list[str]]:
    """The NUM_PICTURES training pictures, (n, 3, 64, 64) uint8, and the caption each was drawn from: the training
    captions in turn, so every single diamond and scene phrasing is drawn, each picture from its own seed."""
    train, _ = split()
    captions = [train[i % len(train)] for i in range(NUM_PICTURES)]
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([shapes.render(caption, generator) for caption in captions]), captions


def phrasings(caption: str) -> list[str]:
    """Both phrasings of a caption's scene ("a red diamond above a blue square" / "a blue square below a red
    diamond"), or the caption alone for one object: training draws either for the same picture."""
    scene = shapes.parse_caption(caption)
    if scene.relation is None:
        return [caption]
    opposite = {"above": "below", "below": "above", "to the left of": "to the right of"}
    opposite["to the right of"] = "to the left of"
    return [caption, str(shapes.Scene(scene.second, opposite[scene.relation], scene.first))]


def as_prompt(caption: str, word: str) -> str:
    """A caption with the concept's word in it ("<diamond>" for textual inversion, "diamond" for LoRA and the base
    model).

    >>> as_prompt("a red diamond above a blue square", "<diamond>")
    'a red <diamond> above a blue square'
    """
    return " ".join(word if w == CONCEPT else w for w in caption.split(" "))


def adherence(components, word: str, seeds: int = 2, **sampling):
    """How often `components` draws the 32 held-out captions right (checker.check, diamonds included), prompted
    with `word` for the diamond: evaluate.adherence with the evaluation's sampling (25 DPM++ 2M steps, the model's
    guidance) unless `sampling` says otherwise."""
    from minisd.train import evaluate

    _, heldout = split()
    sampling = {
        "num_inference_steps": 25,
        "sampler": "DPM++ 2M",
        "guidance_scale": components.guidance_scale,
        **sampling,
    }
    prompts = [as_prompt(caption, word) for caption in heldout]
    return evaluate.adherence(components, heldout, seeds=seeds, prompts=prompts, **sampling)
