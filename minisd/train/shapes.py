"""Coloured shapes with captions: the offline data set the nano model learns from (no download, no randomness
that the seed does not fix).

A picture is 64×64 RGB (8×8×4 latents after the VAE's 8× downsampling), a plain white background and one or
two shapes drawn with PIL at 4× and box-filtered down (anti-aliased edges, as a decoded image has):

    "a red circle"                                   one object, anywhere on the canvas
    "a red circle above a blue square"               two objects of different colours, stacked
    "a green triangle to the left of a yellow square"   ... or side by side

vocabulary     COLOURS = red, yellow, green, blue (hues ~0°, 47°, 129°, 226°: far apart, so the checker can
               tell them by hue alone);  SHAPES = circle, square, triangle (radial extent / equivalent radius
               1.0, 1.25, ~1.6: far apart);  RELATIONS = above, below, to the left of, to the right of.
phrasings      each relation also as people type it: above = over, on top of; below = under, beneath,
               underneath; to the left of = left of, on the left of (and right alike); "a" or "the" before each
               object; an optional "." or "!" at the end. The *documented* phrasing is the first of each
               (`str(scene)`: "a red circle above a blue square").
jitter         half-size r ~ U[7, 10] px, position ±2–5 px, each RGB channel ±12: the model must generalise,
               not memorise 2D stamps.
layout         two objects sit on the axis of their relation with a clear gap (centres ≥ 24 px apart along it,
               ≤ 10 px across it), so "above" is never a judgement call.

Captions: 12 single objects and 4 relations × 12 × 9 ordered pairs of different-coloured objects = 432 pairs.
A *scene* is the picture behind two captions that say the same thing ("a red circle above a blue square" =
"a blue square below a red circle"). Held out, never produced by `split="train"`: every scene whose objects
(o1, o2), indexed o = 3·colour + shape in the order above, with o1 the top (vertical) or left (horizontal) one,
satisfy

    (o1 + 2·o2 + 5·axis) mod 8 == 0,      axis 0 = vertical, 1 = horizontal

that is 28 of the 216 scenes, 56 captions. Whole scenes go, both phrasings, so a held-out caption is not a
paraphrase of a training picture: the model has seen each of the two objects, in that colour and shape, on that
side of that relation, with other partners, but never this pair in this arrangement. Every single object, every
ordered colour pair on each axis and every object on each side of each relation stays in training (checked in
tests/test_shapes.py), so held-out captions test composition, not unseen words.

Paraphrases: a picture is drawn once, from a documented caption; every time training draws it, it draws a phrasing
too (`sample_phrasings`: the documented one a quarter of the time, else any of that caption's phrasings, the
documented one included). So every training scene is seen in every phrasing, and the model learns that "over" and
"above" mean one thing from the same pictures. The held-out test is a property of the scene (`is_heldout` parses
any phrasing), so a held-out scene is held out in every phrasing.
"""

import re
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from minisd.errors import MinisdError

SIZE = 64  # pixels per side: 8×8 latents under SD v1's 8× VAE
SUPERSAMPLE = 4  # draw at 256×256, box-filter down: anti-aliased edges
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (215, 40, 40), "yellow": (235, 195, 30), "green": (40, 165, 65), "blue": (45, 85, 215)}
SHAPES = ("circle", "square", "triangle")
# Drawn, judged and parsed, but in no caption of the nano model's training: the new concept the fine-tuning lessons
# teach it (minisd/train/concept.py: textual inversion and LoRA). A square standing on a corner.
NEW_SHAPES = ("diamond",)
RELATIONS = ("above", "below", "to the left of", "to the right of")
# How each relation may be said, the documented phrasing first.
RELATION_PHRASES = {
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath", "underneath"),
    "to the left of": ("to the left of", "left of", "on the left of"),
    "to the right of": ("to the right of", "right of", "on the right of"),
}
ARTICLES = ("a", "the")
ENDINGS = ("", ".", "!")  # an optional full stop or exclamation mark after the caption
DOCUMENTED_FRACTION = 0.25  # share of training draws in the documented phrasing (the rest: any phrasing)
SINGLE_FRACTION = 0.25  # share of one-object captions in `dataset(split="train")`


@dataclass(frozen=True)
class Thing:
    """One coloured shape, e.g. Thing("red", "circle")."""

    colour: str
    shape: str

    def __str__(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What a caption says: one thing, or `first` <relation> `second` ("a red circle above a blue square")."""

    first: Thing
    relation: str | None = None
    second: Thing | None = None

    def __str__(self) -> str:
        return str(self.first) if self.relation is None else f"{self.first} {self.relation} {self.second}"

    @property
    def things(self) -> tuple[Thing, ...]:
        return (self.first,) if self.second is None else (self.first, self.second)


def say(
    scene: Scene, relation_phrase: str | None = None, articles: tuple[str, str] = ("a", "a"), ending: str = ""
) -> str:
    """One phrasing of `scene`: a relation phrase from RELATION_PHRASES[scene.relation] (default: the documented
    one), an article for each object, an ending from ENDINGS.

    >>> say(parse_caption("a red circle to the left of a blue square"), "left of", ("the", "a"), ".")
    'the red circle left of a blue square.'
    """
    first = f"{articles[0]} {scene.first.colour} {scene.first.shape}"
    if scene.relation is None:
        return first + ending
    relation_phrase = relation_phrase or scene.relation
    assert relation_phrase in RELATION_PHRASES[scene.relation], (scene.relation, relation_phrase)
    return f"{first} {relation_phrase} {articles[1]} {scene.second.colour} {scene.second.shape}{ending}"


def phrasings(caption: str) -> list[str]:
    """Every phrasing of the grammar that says what `caption` says, with its objects in the same order; the
    documented phrasing first. 6 for one object; 36 or 48 for two (3 or 4 relation phrases × 4 article pairs × 3
    endings).

    >>> p = phrasings("a red circle below a blue square")
    >>> len(p), p[0], "the red circle beneath a blue square!" in p
    (48, 'a red circle below a blue square', True)
    """
    scene = parse_caption(caption)
    article_pairs = [(x, y) for x in ARTICLES for y in ARTICLES]
    if scene.relation is None:
        return [say(scene, None, (x, x), e) for e in ENDINGS for x in ARTICLES]
    phrases = RELATION_PHRASES[scene.relation]
    return [say(scene, r, xy, e) for e in ENDINGS for r in phrases for xy in article_pairs]


def parse_caption(caption: str) -> Scene:
    """Read a caption of this data set's grammar, in any of its phrasings, back into a Scene (whose str() is the
    documented phrasing). Case and surrounding spaces do not matter.

    >>> scene = parse_caption("a red circle to the left of a blue square")
    >>> scene.first, scene.relation, scene.second.shape
    (Thing(colour='red', shape='circle'), 'to the left of', 'square')
    >>> str(parse_caption("The red circle on top of the blue square."))
    'a red circle above a blue square'
    """
    text = caption.strip().lower()
    if text and text[-1] in ENDINGS:  # one optional "." or "!"
        text = text[:-1]
    words = text.split()

    def thing(ws: list[str]) -> Thing | None:
        ok = len(ws) == 3 and ws[0] in ARTICLES and ws[1] in COLOURS and ws[2] in SHAPES + NEW_SHAPES
        return Thing(ws[1], ws[2]) if ok else None

    if len(words) == 3 and thing(words):
        return Scene(thing(words))
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            r = phrase.split()
            if words[3 : 3 + len(r)] == r:
                first, second = thing(words[:3]), thing(words[3 + len(r) :])
                if first and second and first.colour != second.colour:
                    return Scene(first, relation, second)
    raise MinisdError(f"caption must read {grammar()}; got {caption!r}")


def grammar() -> str:
    """The caption grammar in one line (parse_caption's error, the CLI's note on the nano model, README).

    >>> grammar()[:63]
    "'<a|the> <colour> <shape> [<relation> <a|the> <colour> <shape>]"
    """
    relations = " | ".join(p for ps in RELATION_PHRASES.values() for p in ps)
    return (
        f"'<a|the> <colour> <shape> [<relation> <a|the> <colour> <shape>][.|!]' with <colour> {' | '.join(COLOURS)} "
        f"(two different), <shape> {' | '.join(SHAPES)}, <relation> {relations}"
    )


RELATION_WORDS = {w for ps in RELATION_PHRASES.values() for p in ps for w in p.split()}  # above, on, top, of, ...
WORDS = frozenset([*ARTICLES, *COLOURS, *SHAPES, *RELATION_WORDS])  # every word a caption uses: 23


def unknown_words(text: str) -> list[str]:
    """The words of `text` that no caption uses, in order, each once; case and punctuation do not count.

    >>> unknown_words("A red cat, left of the big blue square!")
    ['cat', 'big']
    """
    words = re.findall(r"[^\W_]+", text.lower())  # runs of letters and digits
    return list(dict.fromkeys(w for w in words if w not in WORDS))


def _layout(scene: Scene) -> tuple[Thing, Thing, int]:
    """(top-or-left thing, bottom-or-right thing, axis 0 vertical / 1 horizontal) of a two-object scene."""
    a, b = scene.first, scene.second
    return {"above": (a, b, 0), "below": (b, a, 0), "to the left of": (a, b, 1), "to the right of": (b, a, 1)}[
        scene.relation
    ]


def scene_key(scene: Scene) -> tuple:
    """What the picture shows, the same for both phrasings of a pair: (thing,) or (top/left, bottom/right, axis).

    >>> scene_key(parse_caption("a red circle above a blue square")) == scene_key(
    ...     parse_caption("a blue square below a red circle"))
    True
    """
    return (scene.first,) if scene.relation is None else _layout(scene)


def _object_index(thing: Thing) -> int:
    return 3 * list(COLOURS).index(thing.colour) + (SHAPES + NEW_SHAPES).index(thing.shape)


def is_heldout(caption: str) -> bool:
    """True for captions whose scene is kept out of training (module docstring: (o1 + 2·o2 + 5·axis) mod 8 == 0).

    >>> is_heldout("a red circle above a yellow square"), is_heldout("a yellow square below a red circle")
    (True, True)
    """
    scene = parse_caption(caption)
    if scene.relation is None:
        return False
    top_left, bottom_right, axis = _layout(scene)
    return (_object_index(top_left) + 2 * _object_index(bottom_right) + 5 * axis) % 8 == 0


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order: 12 single objects, then 432 pairs."""
    things = [Thing(c, s) for c in COLOURS for s in SHAPES]
    singles = [str(Scene(t)) for t in things]
    pairs = [str(Scene(a, r, b)) for a in things for r in RELATIONS for b in things if a.colour != b.colour]
    return singles + pairs


def train_captions() -> list[str]:
    """The 388 captions training may use: all 12 singles and 376 pairs."""
    return [c for c in all_captions() if not is_heldout(c)]


def heldout_captions() -> list[str]:
    """The 56 two-object captions never used in training (28 scenes × 2 phrasings)."""
    return [c for c in all_captions() if is_heldout(c)]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float, r: float, generator: torch.Generator) -> None:
    """Draw `thing` centred at (cx, cy) with half-size r (pixels of the final image) on the 4× canvas."""
    jitter = (torch.rand(3, generator=generator) * 24 - 12).round().int().tolist()
    fill = tuple(min(255, max(0, v + j)) for v, j in zip(COLOURS[thing.colour], jitter, strict=True))
    k = SUPERSAMPLE
    cx, cy, r = cx * k, cy * k, r * k
    if thing.shape == "circle":  # radius r: area πr² ≈ 3.14 r²
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif thing.shape == "square":  # side 1.8 r: area 3.24 r², close to the circle's
        s = 0.9 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif thing.shape == "triangle":  # equilateral, apex up, centroid at (cx, cy), circumradius 1.3 r: area 2.2 r²
        R = 1.3 * r
        pts = [(cx, cy - R), (cx + 0.866 * R, cy + 0.5 * R), (cx - 0.866 * R, cy + 0.5 * R)]
        draw.polygon(pts, fill=fill)
    else:  # diamond: a square on a corner, half-diagonal 1.25 r: area 3.1 r², the circle's
        R = 1.25 * r
        draw.polygon([(cx, cy - R), (cx + R, cy), (cx, cy + R), (cx - R, cy)], fill=fill)


def render(caption: str, generator: torch.Generator | int) -> Tensor:
    """Draw a picture of `caption`; the generator (or an int seed) fixes every jitter.

    Returns pixels: (3, 64, 64) uint8. Same caption and seed give the same bytes (PIL's rasteriser and torch's
    CPU generator are deterministic; a different PIL version could move an edge pixel).
    """
    scene = parse_caption(caption)
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if scene.relation is None:
        r = _uniform(generator, 7, 10)
        margin = 1.3 * r + 2  # the triangle's apex reaches 1.3 r
        cx, cy = _uniform(generator, margin, SIZE - margin), _uniform(generator, margin, SIZE - margin)
        _draw(draw, scene.first, cx, cy, r, generator)
    else:
        near, far, axis = _layout(scene)  # near: top (vertical) or left (horizontal)
        across = _uniform(generator, 24, 40)  # shared coordinate across the relation's axis
        for thing, (lo, hi) in ((near, (16, 20)), (far, (44, 48))):
            along = _uniform(generator, lo, hi)
            side = across + _uniform(generator, -5, 5)
            r = _uniform(generator, 7, 10)
            cx, cy = (side, along) if axis == 0 else (along, side)
            _draw(draw, thing, cx, cy, r, generator)
    pixels = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).reshape(SIZE, SIZE, 3).permute(2, 0, 1)


def sample_captions(n: int, generator: torch.Generator, split: str = "train") -> list[str]:
    """n captions drawn with replacement: in "train" a quarter single objects, the rest uniform over pairs;
    in "heldout" uniform over the held-out captions."""
    if split == "train":
        captions = train_captions()
        singles = [c for c in captions if parse_caption(c).relation is None]
        pairs = [c for c in captions if parse_caption(c).relation is not None]
        single = (torch.rand(n, generator=generator) < SINGLE_FRACTION).tolist()
        i_single = torch.randint(len(singles), (n,), generator=generator).tolist()
        i_pair = torch.randint(len(pairs), (n,), generator=generator).tolist()
        return [singles[i] if s else pairs[j] for s, i, j in zip(single, i_single, i_pair, strict=True)]
    if split == "heldout":
        captions = heldout_captions()
        return [captions[i] for i in torch.randint(len(captions), (n,), generator=generator).tolist()]
    raise MinisdError(f"split must be 'train' or 'heldout', got {split!r}")


def dataset(n: int, seed: int, split: str = "train") -> tuple[Tensor, list[str]]:
    """n (picture, caption) pairs, fixed by `seed`: pixels (n, 3, 64, 64) uint8 and n captions.

    uint8 keeps 50,000 pictures at 600 MB; the network's input is image = pixels / 127.5 − 1 in [-1, 1].
    Under a millisecond a picture on one CPU core.
    """
    if n < 0:
        raise MinisdError(f"n must be >= 0, got {n}")
    generator = torch.Generator().manual_seed(seed)
    captions = sample_captions(n, generator, split)
    pixels = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    for i, caption in enumerate(captions):
        pixels[i] = render(caption, generator)
    return pixels, captions


def to_image(pixels: Tensor) -> Tensor:
    """uint8 pixels in [0, 255] -> float image in [-1, 1], any shape.

    >>> to_image(torch.tensor([0, 255], dtype=torch.uint8))
    tensor([-1.,  1.])
    """
    return pixels.float() / 127.5 - 1
