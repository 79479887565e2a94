"""The shapes data set is deterministic and keeps its held-out captions out of training; the checker judges it.

The checker numbers here use 400 pictures (half train, half held-out captions) so the file runs in well under a
minute; `python -m tests.test_shapes 2000` measures the same on more pictures and prints the table.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minisd.errors import MinisdError
from minisd.train.captions import phrasing_ids, pick_phrasing
from minisd.train.checker import check, check_details, find_objects, judge
from minisd.train.shapes import (
    COLOURS,
    DOCUMENTED_FRACTION,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    Scene,
    Thing,
    _layout,
    all_captions,
    dataset,
    heldout_captions,
    is_heldout,
    parse_caption,
    phrasings,
    render,
    say,
    to_image,
)

OPPOSITE = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
CROSS = {"above": "to the left of", "below": "to the right of", "to the left of": "below", "to the right of": "above"}


def mismatches(caption: str, generator: torch.Generator) -> list[tuple[str, str]]:
    """Wrong captions for the picture of `caption`, each with the part the checker should name.

    One object: another colour, another shape, a second object added. Two objects: either one recoloured (to a
    colour absent from the picture), either one reshaped, the opposite relation, a crossed relation (above ->
    left of), the objects swapped, and the second object dropped.
    """
    scene = parse_caption(caption)

    def pick(options: list[str]) -> str:
        return options[torch.randint(len(options), (), generator=generator).item()]

    used = {t.colour for t in scene.things}
    free_colour = pick([c for c in COLOURS if c not in used])

    def recolour(t: Thing) -> Thing:
        return Thing(free_colour, t.shape)

    def reshape(t: Thing) -> Thing:
        return Thing(t.colour, pick([s for s in SHAPES if s != t.shape]))

    a, rel, b = scene.first, scene.relation, scene.second
    if rel is None:
        extra = Thing(free_colour, pick(list(SHAPES)))
        return [
            ("colour", str(Scene(recolour(a)))),
            ("shape", str(Scene(reshape(a)))),
            ("count", str(Scene(a, pick(list(RELATIONS)), extra))),
        ]
    return [
        ("colour", str(Scene(recolour(a), rel, b))),
        ("colour", str(Scene(a, rel, recolour(b)))),
        ("shape", str(Scene(reshape(a), rel, b))),
        ("shape", str(Scene(a, rel, reshape(b)))),
        ("relation", str(Scene(a, OPPOSITE[rel], b))),
        ("relation", str(Scene(a, CROSS[rel], b))),
        ("relation", str(Scene(b, rel, a))),
        ("count", str(Scene(a))),
    ]


def degrade(
    pixels: torch.Tensor, generator: torch.Generator, sigma: float = 1.0, noise: float = 8 / 255
) -> torch.Tensor:
    """What a decoder might return: a Gaussian blur (σ px, separable 7-tap kernel) plus Gaussian noise (std in
    [0, 1] units). pixels: (b, 3, h, w) uint8. Returns (b, 3, h, w) uint8."""
    x = pixels.float() / 255
    k = torch.exp(-(torch.arange(-3, 4.0) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)
    x = x + noise * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def measure(n: int, seed: int, sigma: float = 0.0) -> dict[str, list[bool]]:
    """Render n/2 train and n/2 held-out pictures, judge each against its caption and its mismatches.

    Returns {"accept": [...], "reject colour": [...], ...}: one bool per judgement, True when the checker was right
    (accepted the right caption; rejected a wrong one AND named the right part for it under "named").
    """
    results: dict[str, list[bool]] = {"accept": [], "reject": [], "named": []}
    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "heldout"):
        pixels, captions = dataset(n // 2, seed, split)
        if sigma > 0:
            pixels = degrade(pixels, generator, sigma)
        for p, caption in zip(pixels, captions, strict=True):
            found = find_objects(p)
            results["accept"].append(judge(found, caption).ok)
            for part, wrong in mismatches(caption, generator):
                verdict = judge(found, wrong)
                results["reject"].append(not verdict.ok)
                results.setdefault(f"reject {part}", []).append(not verdict.ok)
                results["named"].append(verdict.part == part)
    return results


def rate(xs: list[bool]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def crisp() -> dict[str, list[bool]]:
    return measure(400, seed=1)


@pytest.fixture(scope="module")
def blurred() -> dict[str, list[bool]]:
    return measure(400, seed=2, sigma=1.0)


def test_same_seed_same_bytes():
    p1, c1 = dataset(16, seed=7)
    p2, c2 = dataset(16, seed=7)
    assert torch.equal(p1, p2) and c1 == c2
    p3, _ = dataset(16, seed=8)
    assert not torch.equal(p1, p3)
    assert p1.shape == (16, 3, 64, 64) and p1.dtype == torch.uint8
    assert torch.equal(render("a red circle", 3), render("a red circle", torch.Generator().manual_seed(3)))
    assert to_image(p1).min() >= -1 and to_image(p1).max() <= 1


def test_captions_and_heldout_split():
    captions, heldout = all_captions(), heldout_captions()
    assert len(captions) == len(set(captions)) == 12 + 4 * 12 * 9
    assert len(heldout) == 56 and all(is_heldout(c) for c in heldout)
    assert all(str(parse_caption(c)) == c for c in captions)
    # a held-out scene goes whole: the other phrasing of the same picture is held out too
    for c in heldout:
        s = parse_caption(c)
        assert is_heldout(str(Scene(s.second, OPPOSITE[s.relation], s.first)))
    _, train = dataset(3000, seed=0, split="train")
    assert not set(train) & set(heldout)
    assert sum(parse_caption(c).relation is None for c in train) > 600  # about a quarter are single objects
    _, held = dataset(300, seed=0, split="heldout")
    assert set(held) <= set(heldout) and len(set(held)) > 40
    # held-out captions test composition only: in training every object sits on each side of each axis, and every
    # ordered colour pair appears on each axis
    roles, colour_pairs = set(), set()
    for c in captions:
        s = parse_caption(c)
        if s.relation is not None and not is_heldout(c):
            near, far, axis = _layout(s)
            roles |= {(near, "near", axis), (far, "far", axis)}
            colour_pairs.add((near.colour, far.colour, axis))
    assert len(roles) == 12 * 2 * 2 and len(colour_pairs) == 4 * 3 * 2


def test_every_phrasing_reads_back_as_its_scene():
    """Each phrasing of each caption parses to the same Scene (so `is_heldout` and the checker read it), the
    phrasings of a caption are distinct, and none of them is another caption's documented phrasing."""
    documented = set(all_captions())
    for caption in all_captions():
        options = phrasings(caption)
        scene = parse_caption(caption)
        assert options[0] == caption and len(set(options)) == len(options)
        two = scene.relation is not None
        assert len(options) == (3 * 4 * len(RELATION_PHRASES[scene.relation]) if two else 6)
        assert all(parse_caption(p) == scene for p in options)
        assert all(is_heldout(p) == is_heldout(caption) for p in options)
        assert not (set(options[1:]) & documented)
    assert parse_caption("  The RED circle   on the left of the blue square! ") == parse_caption(
        "a red circle to the left of a blue square"
    )
    assert str(parse_caption("a red circle beneath a blue square.")) == "a red circle below a blue square"
    assert say(parse_caption("a red circle"), None, ("the", "the"), "!") == "the red circle!"


def test_training_phrasings_keep_held_out_scenes_out():
    """Each picture's k phrasings (captions.py): held-out scenes never appear in any phrasing; the documented
    phrasing takes its share; every phrasing of the training captions is reached; a pick takes one of the k."""
    from minisd.tokenizer import Tokenizer

    _, captions = dataset(2000, seed=0, split="train")
    ids = phrasing_ids(captions, 8, torch.Generator().manual_seed(0))
    assert ids.shape == (2000, 8, 77) and ids.dtype == torch.int64
    tokenizer = Tokenizer.from_default()
    texts = [tokenizer.decode(row) for row in ids.flatten(0, 1)]
    scenes = [parse_caption(t) for t in texts]
    assert not any(is_heldout(t) for t in texts)
    assert all(s == parse_caption(c) for s, c in zip(scenes, [c for c in captions for _ in range(8)], strict=True))
    documented = sum(t in set(all_captions()) for t in texts) / len(texts)
    chance = [DOCUMENTED_FRACTION + (1 - DOCUMENTED_FRACTION) / len(phrasings(c)) for c in captions]
    expected = sum(chance) / len(chance)  # ~0.3: a quarter, plus the uniform draws that hit it
    assert abs(documented - expected) < 0.02, (documented, expected)  # 16,000 draws: binomial std ≈ 0.004
    words = {w for t in texts for w in t.split()}
    assert {w for r in RELATION_PHRASES.values() for p in r for w in p.split()} | {"the", ".", "!"} <= words
    index = torch.arange(2000)
    picked = pick_phrasing(ids, index, torch.Generator().manual_seed(1))
    assert picked.shape == (2000, 77) and all(any(torch.equal(p, q) for q in ids[i]) for i, p in enumerate(picked))
    assert torch.equal(pick_phrasing(ids[:, 0], index, torch.Generator()), ids[:, 0])  # (n, 77): no draw


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle above a red square",
        "a pink circle",
        "a red circle near a blue square",
        "",
        "red circle above blue square",
        "a red circle above a blue square?",
        "a red circle above a blue square..",
    ],
)
def test_bad_caption_raises(caption):
    with pytest.raises(MinisdError, match="caption"):
        parse_caption(caption)


def test_bad_dataset_arguments_raise():
    with pytest.raises(MinisdError, match="split"):
        dataset(4, seed=0, split="test")
    with pytest.raises(MinisdError, match="n must be"):
        dataset(-1, seed=0)


def test_checker_on_crisp_renders(crisp):
    """Rendered pictures: >= 99% of right captions accepted, >= 99% of wrong ones rejected, for each kind."""
    assert rate(crisp["accept"]) >= 0.99
    for part in ("colour", "shape", "relation", "count"):
        assert rate(crisp[f"reject {part}"]) >= 0.99, part
    assert rate(crisp["named"]) >= 0.99


def test_checker_on_blurred_noisy_renders(blurred):
    """Blur σ = 1 px plus noise std 8/255, as a decoded picture is never crisp: >= 95% either way."""
    assert rate(blurred["accept"]) >= 0.95
    for part in ("colour", "shape", "relation", "count"):
        assert rate(blurred[f"reject {part}"]) >= 0.95, part


def test_checker_input_types_and_failures():
    caption = "a green triangle to the left of a yellow square"
    pixels = render(caption, 5)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    assert check(pixels, caption) and check(to_image(pixels), caption) and check(pil, caption)
    blank = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    assert check_details(blank, "a red circle").part == "count"
    purple = render("a red circle", 1)
    purple[2][purple[0] < 230] = 200  # red + blue ink: a magenta circle, no palette colour
    assert check_details(purple, "a red circle").part in ("count", "colour")
    with pytest.raises(MinisdError, match="image"):
        check(torch.zeros(64, 64), caption)


if __name__ == "__main__":  # the numbers for the report: python -m tests.test_shapes 2000
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for sigma in (0.0, 0.7, 1.0, 1.3):
        r = measure(n, seed=11, sigma=sigma)
        cells = "  ".join(f"{k} {rate(v):.4f} ({len(v)})" for k, v in r.items())
        print(f"blur σ={sigma}: {cells}")
