"""Does a picture show what its caption says? An automatic judge for the shapes data, by classical image analysis.

    picture ─ HSV ─ ink mask (saturated, not dark) ─ nearest palette hue ─ connected components per colour
            ─ objects (area ≥ 30 px at 64×64) ─ count → colour → shape → relation

count      as many objects as the caption names (no extra blob of any colour, none missing).
colour     their colours are the caption's colours (hue within 45° of the palette's: red 0°, yellow 47°,
           green 129°, blue 226°; ink of no palette colour counts as an object of colour "other").
shape      from five numbers of the object's pixel mask (ShapeMeasures), measured on rendered pictures, crisp
           and blurred (σ = 1.3 px) with noise:                  circle       square       triangle     diamond
             skew    largest |skewness| along 16 directions      0–0.06       0–0.07       0.41–0.60    0–0.12
             outline std/mean of the outline's radius            0.04–0.07    0.08–0.12    0.18–0.25    0.07–0.13
             spread  max radius / √(area / π)                    1.03–1.12    1.13–1.27    1.26–1.57
             fill    area / bounding-box area                    0.69–0.85    0.80–1.00    0.50–0.70    0.51–0.77
             turn    area / the box turned 45°, minus fill       −0.12–0.09   < −0.2       −0.10–0.02   0.02–0.44
           diamond (shapes.NEW_SHAPES, the concept train/concept.py teaches) if turn ≥ 0.12: the square's own test in
           a frame turned 45° (88% of the nano VAE's reconstructions of diamonds pass: small ones come back round);
           else triangle if two of (skew ≥ 0.25, outline ≥ 0.15, spread ≥ 1.33); else square if two of (outline ≥
           0.076, fill ≥ 0.87, spread ≥ 1.14); else circle. Two votes of three: one measure thrown by a blurred
           corner or a ragged edge does not decide alone.
relation   from the centroids: "A above B" holds when B's centre is lower than A's by more than it is beside it
           (y grows downwards), and likewise for the other three.

No learning: every threshold is printed above, and tests/test_shapes.py measures the judge on rendered pictures,
crisp and blurred with noise, against right and wrong captions (`python -m tests.test_shapes 2000`: 2,000
pictures and 14,750 wrong captions, crisp and at blur σ = 0.7, 1.0, 1.3 px plus noise of std 8/255: all accepted,
all rejected). Where it stops: at blur σ = 2 px it still accepts 98.5%; blur σ = 1 px with noise of std 24/255
drops acceptance to ~80% (ragged outlines read as corners). A 3×3 median filter first would fix the noise but
costs blur robustness, and a decoded picture is blurred more than it is noisy.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from minisd.errors import MinisdError
from minisd.train.shapes import COLOURS, Scene, parse_caption

MIN_SATURATION = 0.3  # ink: (max − min) / max of RGB; anti-aliased edges at half coverage have ~0.4
MIN_VALUE = 0.25  # ink: max of RGB in [0, 1]; darker pixels carry no reliable hue
MAX_HUE_DISTANCE = 45.0  # degrees from the nearest palette hue, else colour "other"
MIN_AREA_FRACTION = 30 / 4096  # components smaller than 30 px of a 64×64 picture are specks, not objects


class Found(NamedTuple):
    """One object seen in the picture: colour name, shape name, centroid (x, y) in pixels, area in pixels."""

    colour: str
    shape: str
    x: float
    y: float
    area: int


class Verdict(NamedTuple):
    """ok, the first part that failed ("count", "colour", "shape", "relation"; "" when ok), a one-line reason,
    and the objects found."""

    ok: bool
    part: str
    reason: str
    found: tuple[Found, ...]


def _hue(rgb: tuple[int, int, int]) -> float:
    """Hue in degrees of one uint8 RGB colour."""
    return _hsv(torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255)[0].item()


def _hsv(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rgb: (3, h, w) in [0, 1]. Returns hue in degrees [0, 360), saturation and value in [0, 1], each (h, w)."""
    r, g, b = rgb
    value, _ = rgb.max(0)
    chroma = value - rgb.min(0).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-8), 0.0)
    c = chroma.clamp_min(1e-8)
    hue = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    return hue * 60 % 360, saturation, value


PALETTE_HUES = {name: _hue(rgb) for name, rgb in COLOURS.items()}


def to_rgb(image: Tensor | Image.Image) -> Tensor:
    """A picture as (3, h, w) float RGB in [0, 1]: from a PIL image, uint8 pixels (3, h, w), or an image in [-1, 1]."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
        return pixels.permute(2, 0, 1).float() / 255
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise MinisdError(f"image must be a PIL image or a (3, h, w) tensor, got {shape}")
    if image.dtype == torch.uint8:
        return image.float() / 255
    return ((image.float() + 1) / 2).clamp(0, 1)


def components(classes: Tensor) -> list[tuple[int, Tensor]]:
    """The 8-connected components of a (h, w) integer class map (−1: background): (class, (h, w) bool mask) each,
    largest first. A flood fill from every pixel not yet reached.

    >>> [(k, int(m.sum())) for k, m in components(torch.tensor([[0, 0, -1, 1], [-1, -1, 1, 0]]))]
    [(0, 2), (1, 2), (0, 1)]
    """
    h, w = classes.shape
    flat = classes.flatten().tolist()  # Python lists: a flood fill touches one pixel at a time
    reached = [False] * (h * w)
    found = []
    for start, k in enumerate(flat):
        if k < 0 or reached[start]:
            continue
        reached[start], stack, members = True, [start], []
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, w)
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    q = yy * w + xx
                    if not reached[q] and flat[q] == k:
                        reached[q] = True
                        stack.append(q)
        mask = torch.zeros(h * w, dtype=torch.bool)
        mask[members] = True
        found.append((k, mask.view(h, w)))
    return sorted(found, key=lambda km: -int(km[1].sum()))


class ShapeMeasures(NamedTuple):
    """Four numbers that tell the three shapes apart, for one object's pixel mask (values: module docstring)."""

    skew: float  # largest |skewness| of the pixels' projections on 16 directions: 0 for centrally symmetric shapes
    outline: float  # std / mean of the outline pixels' distances to the centroid: 0 for a circle
    spread: float  # (max distance to the centroid + ½ px) / √(area / π): 1 for a circle
    fill: float  # area / bounding-box area
    turn: float  # area / area of the bounding box in axes turned 45°, minus fill: > 0 for a square on a corner


def measure(mask: Tensor) -> ShapeMeasures:
    """ShapeMeasures of a (h, w) bool mask holding one object."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    dx, dy = xs.float() - xs.float().mean(), ys.float() - ys.float().mean()
    theta = torch.arange(16) * torch.pi / 16
    proj = dx * theta.cos()[:, None] + dy * theta.sin()[:, None]  # (16, area): positions along each direction
    skew = ((proj**3).mean(1) / (proj**2).mean(1).clamp_min(1e-8) ** 1.5).abs().max().item()
    inside = -F.max_pool2d(-F.pad(mask.float()[None], (1, 1, 1, 1)), 3, stride=1)[0] > 0  # all 8 neighbours in
    outline = mask & ~inside
    radius = (dx**2 + dy**2).sqrt()
    r_outline = radius[outline[ys, xs]]
    area = len(xs)
    spread = (radius.max().item() + 0.5) / (area / torch.pi) ** 0.5  # +½: pixel centres sit inside the outline
    fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)).item()
    u, v = (xs + ys).float() / 2**0.5, (xs - ys).float() / 2**0.5  # the pixel centres in axes turned 45°
    turned = area / ((u.max() - u.min() + 1) * (v.max() - v.min() + 1)).item()
    return ShapeMeasures(skew, (r_outline.std() / r_outline.mean()).item(), spread, fill, turned - fill)


def shape_of(mask: Tensor) -> str:
    """Name the shape of one object's (h, w) bool mask: diamond, triangle, square or circle; two votes of three
    decide between the last three."""
    m = measure(mask)
    if m.turn >= 0.12:  # fits a box turned 45° far better than an upright one
        return "diamond"
    if (m.skew >= 0.25) + (m.outline >= 0.15) + (m.spread >= 1.33) >= 2:
        return "triangle"
    if (m.outline >= 0.076) + (m.fill >= 0.87) + (m.spread >= 1.14) >= 2:
        return "square"
    return "circle"


def find_objects(image: Tensor | Image.Image) -> list[Found]:
    """Every object in the picture, largest first: its colour, shape, centroid and area."""
    return [found for found, _ in find_object_masks(image)]


def find_object_masks(image: Tensor | Image.Image) -> list[tuple[Found, Tensor]]:
    """find_objects with each object's (h, w) bool pixel mask beside it."""
    rgb = to_rgb(image)
    h, w = rgb.shape[-2:]
    hue, saturation, value = _hsv(rgb)
    ink = (saturation > MIN_SATURATION) & (value > MIN_VALUE)
    names = list(PALETTE_HUES)
    palette = torch.tensor(list(PALETTE_HUES.values()))
    distance = (hue[..., None] - palette).abs()  # (h, w, colours) in degrees, around the circle
    distance = torch.minimum(distance, 360 - distance)
    nearest_distance, nearest = distance.min(-1)
    nearest[nearest_distance > MAX_HUE_DISTANCE] = len(names)  # "other"
    nearest[~ink] = -1
    min_area = MIN_AREA_FRACTION * h * w
    found = []
    for k, mask in components(nearest):
        if mask.sum() < min_area:
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        name = [*names, "other"][k]
        found.append((Found(name, shape_of(mask), xs.float().mean().item(), ys.float().mean().item(), len(xs)), mask))
    return sorted(found, key=lambda fm: -fm[0].area)


def _holds(relation: str, a: Found, b: Found) -> bool:
    """Whether a <relation> b: the centres differ most along the relation's axis, in its direction (y down)."""
    dx, dy = b.x - a.x, b.y - a.y
    return {
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
        "to the left of": dx > abs(dy),
        "to the right of": -dx > abs(dy),
    }[relation]


def judge(found: list[Found] | tuple[Found, ...], caption: str) -> Verdict:
    """Judge the objects found in a picture (find_objects) against `caption`; the first failing part decides."""
    scene: Scene = parse_caption(caption)
    found = tuple(found)
    wanted = scene.things
    seen = ", ".join(f"{f.colour} {f.shape}" for f in found) or "nothing"
    if len(found) != len(wanted):
        return Verdict(False, "count", f"wanted {len(wanted)} objects, found {len(found)}: {seen}", found)
    by_colour = {f.colour: f for f in found}
    if sorted(by_colour) != sorted(t.colour for t in wanted):
        return Verdict(False, "colour", f"wanted {', '.join(map(str, wanted))}; found {seen}", found)
    for t in wanted:
        if by_colour[t.colour].shape != t.shape:
            reason = f"the {t.colour} object is a {by_colour[t.colour].shape}, not a {t.shape}"
            return Verdict(False, "shape", reason, found)
    if scene.relation is not None:
        first, second = by_colour[scene.first.colour], by_colour[scene.second.colour]
        if not _holds(scene.relation, first, second):
            return Verdict(False, "relation", f"{scene.first} is not {scene.relation} {scene.second}", found)
    return Verdict(True, "", "matches", found)


def check_details(image: Tensor | Image.Image, caption: str) -> Verdict:
    """Judge `image` against `caption`; say which part failed first (count, colour, shape, relation).

    image: PIL image, uint8 pixels (3, h, w) or an image (3, h, w) in [-1, 1]. caption: the grammar of
    minisd.train.shapes ("a red circle above a blue square"). About 5 ms for a 64×64 picture on one CPU core.

    >>> from minisd.train.shapes import render
    >>> check_details(render("a red circle above a blue square", 0), "a blue square above a red circle").part
    'relation'
    """
    return judge(find_objects(image), caption)


def check(image: Tensor | Image.Image, caption: str) -> bool:
    """True when the picture shows exactly what the caption says (see check_details for why not)."""
    return check_details(image, caption).ok
