"""Do the nano model's per-word maps point at the object? Measured on the shapes captions, with probes for why not.

    python -m minisd.train.localisation --captions 60        (the shipped nano model; --model FILE for another)

localisation   draw one picture per caption (txt2img, the model's guidance, DPM++ 2M, 25 steps) while
               pipelines.attention_maps.CrossAttentionMaps records the cross-attention; find the objects in the
               picture with checker.find_object_masks; count how often the map of each object's colour word and of
               its shape word peaks inside that object's bounding box. Pictures the checker rejects are left out
               (there is no box to aim at). `chance`: the mean share of the picture a box covers, the hit rate of
               a map that peaks anywhere.
attention share  how each pixel's attention splits over <start>, the caption's words, <end> and the padding.
context swap   where the caption lives in the 77 context vectors: pictures made from the words' vectors with
               the empty prompt's <end> and padding, and from the empty prompt's word slots with the caption's
               <end> and padding (SD v1 pads with <end>, and CLIP is causal, so these read the whole caption),
               judged by checker.check.
edit maps      where a word acts in the picture, whichever token carries it: at every step, the change of the
               UNet's conditional ε when only that word is swapped for another of its kind (Σ over steps of
               ‖ε(x_t, c) − ε(x_t, c_edited)‖ over the channels, x_t from the run on c), scored like the maps.
"""

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from minisd.errors import MinisdError
from minisd.loading import Components
from minisd.pipelines import txt2img
from minisd.pipelines.attention_maps import CrossAttentionMaps, peak
from minisd.train import checker, shapes

KINDS = ("colour", "shape")
SAMPLING = {"num_inference_steps": 25, "sampler": "DPM++ 2M"}


class Score(NamedTuple):
    """hits[kind] of totals[kind] maps peaked inside their object's box (kind: "colour", "shape"); chance: the
    mean box area / picture area; skipped: pictures the checker rejected."""

    hits: dict[str, int]
    totals: dict[str, int]
    chance: float
    skipped: int

    def rate(self, kind: str) -> float:
        return self.hits[kind] / max(self.totals[kind], 1)

    def line(self) -> str:
        parts = [f"{kind} word {self.hits[kind]}/{self.totals[kind]} = {100 * self.rate(kind):.0f}%" for kind in KINDS]
        return f"{', '.join(parts)} (chance {100 * self.chance:.0f}%; {self.skipped} pictures rejected by the checker)"


def word_slots(caption: str) -> list[tuple[shapes.Thing, str, int]]:
    """(thing, kind, context position) of each object's colour and shape word; every word is one token and
    position 0 is <start>, so word i (from 0) sits at i + 1.

    >>> [(t.colour, kind, p) for t, kind, p in word_slots("a red circle above a blue square")]
    [('red', 'colour', 2), ('red', 'shape', 3), ('blue', 'colour', 6), ('blue', 'shape', 7)]
    """
    scene = shapes.parse_caption(caption)
    n = len(caption.split())
    slots = [(scene.first, "colour", 2), (scene.first, "shape", 3)]
    if scene.second is not None:
        slots += [(scene.second, "colour", n - 1), (scene.second, "shape", n)]
    return slots


def boxes(picture: Tensor) -> dict[str, tuple[int, int, int, int]]:
    """colour -> (x0, y0, x1, y1), inclusive pixel bounds of each object the checker finds in picture (3, h, w)
    in [0, 1]."""
    found = {}
    for obj, mask in checker.find_object_masks(picture * 2 - 1):  # the checker reads [-1, 1]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        found[obj.colour] = (xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item())
    return found


def score(maps: Tensor, pictures: Tensor, captions: list[str], slot_maps: bool = False) -> Score:
    """Score maps (b, 77, h, w) on the picture grid (or (b, 4, h, w), one per word_slots entry, with slot_maps)."""
    hits, totals = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    areas, skipped = [], 0
    for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        if not checker.check(picture * 2 - 1, caption):
            skipped += 1
            continue
        found = boxes(picture)
        for j, (thing, kind, position) in enumerate(word_slots(caption)):
            x0, y0, x1, y1 = found[thing.colour]
            row, column = peak(maps[i, j if slot_maps else position]).tolist()
            hits[kind] += x0 <= column <= x1 and y0 <= row <= y1
            totals[kind] += 1
            areas.append((x1 - x0 + 1) * (y1 - y0 + 1) / (pictures.shape[-1] * pictures.shape[-2]))
    return Score(hits, totals, sum(areas) / max(len(areas), 1), skipped)


def run_with_maps(components: Components, captions: list[str], seed: int, guidance_scale: float) -> tuple:
    """One picture per caption, (b, 3, 64, 64) in [0, 1], and the cross-attention maps on its grid (b, 77, 64, 64)."""
    recorder = CrossAttentionMaps(components.unet, guided=guidance_scale > 1)
    with recorder:
        pictures = txt2img(components, captions, guidance_scale=guidance_scale, seed=seed, output_type="pt", **SAMPLING)
    return pictures, recorder.token_maps(size=tuple(pictures.shape[-2:]))


def attention_share(maps: Tensor, captions: list[str]) -> dict[str, float]:
    """The mean share of a pixel's attention that goes to <start>, the words, <end> and the padding."""
    share = maps.mean(dim=(-2, -1))  # (b, 77): each row sums to 1
    totals = dict.fromkeys(("<start>", "words", "<end>", "padding"), 0.0)
    for row, caption in zip(share, captions, strict=True):
        n = len(caption.split())  # one token a word
        totals["<start>"] += row[0].item()
        totals["words"] += row[1 : n + 1].sum().item()
        totals["<end>"] += row[n + 1].item()
        totals["padding"] += row[n + 2 :].sum().item()
    return {name: value / len(captions) for name, value in totals.items()}


@torch.no_grad()
def context_swap(components: Components, captions: list[str], seed: int, guidance_scale: float) -> dict[str, float]:
    """Adherence (checker.check) of pictures from mixed contexts: the caption's word vectors with the empty
    prompt's <end> and padding, and the empty prompt's word slots with the caption's <end> and padding. (With the
    whole caption: 1 − score(...).skipped / len(captions) of the run_with_maps pictures.)"""
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    caption_embeds = text_encoder(tokenizer(captions)).last_hidden_state  # (b, 77, d)
    empty = text_encoder(tokenizer([""] * len(captions))).last_hidden_state
    lengths = torch.tensor([len(c.split()) for c in captions])
    words = (torch.arange(caption_embeds.shape[1]) <= lengths[:, None])[..., None]  # (b, 77, 1): <start> + words
    mixes = {
        "words only (end and padding from the empty prompt)": torch.where(words, caption_embeds, empty),
        "end and padding only (word slots from the empty prompt)": torch.where(words, empty, caption_embeds),
    }
    rates = {}
    for name, embeds in mixes.items():
        pictures = txt2img(
            components, prompt_embeds=embeds, negative_prompt_embeds=empty, guidance_scale=guidance_scale,
            seed=seed, output_type="pt", **SAMPLING,
        )  # fmt: skip
        rates[name] = sum(checker.check(p * 2 - 1, c) for p, c in zip(pictures, captions, strict=True)) / len(captions)
    return rates


def edited_captions(caption: str) -> list[str]:
    """One caption per word_slots entry, that word swapped for the first of its kind the caption does not use.

    >>> edited_captions("a red circle above a blue square")
    ['a yellow circle above a blue square', 'a red square above a blue square', \
'a red circle above a yellow square', 'a red circle above a blue circle']
    """
    words = caption.split()
    used = {thing.colour for thing in shapes.parse_caption(caption).things}
    edits = []
    for thing, kind, position in word_slots(caption):
        choices = [c for c in shapes.COLOURS if c not in used] if kind == "colour" else shapes.SHAPES
        swapped = list(words)
        swapped[position - 1] = next(c for c in choices if c != getattr(thing, kind))
        edits.append(" ".join(swapped))
    return edits


@torch.no_grad()
def edit_maps(components: Components, captions: list[str], seed: int, guidance_scale: float) -> tuple:
    """Pictures (b, 3, 64, 64) and edit maps (b, 4, 64, 64), one per word_slots entry: where swapping the word
    changes the conditional ε, summed over the steps (module docstring). Captions of two objects only."""
    unet, text_encoder, tokenizer = components.unet, components.text_encoder, components.tokenizer
    edits = [edited_captions(c) for c in captions]
    if any(len(e) != 4 for e in edits):
        raise MinisdError("edit_maps needs captions of two objects")
    edited = torch.stack([text_encoder(tokenizer(e)).last_hidden_state for e in edits])  # (b, 4, 77, d)
    guided, total, inside = guidance_scale > 1, [0.0], [False]

    def compare(module, args, noise_pred):  # a forward hook on the UNet: args = (latent_model_input, t, context)
        if inside[0]:
            return  # the hook's own UNet calls below
        x, t, _ = args
        if guided:  # the conditional half of [∅; c]
            x, noise_pred = x[x.shape[0] // 2 :], noise_pred[noise_pred.shape[0] // 2 :]
        k = edited.shape[1]
        inside[0] = True
        noise_pred_edited = unet(x.repeat_interleave(k, dim=0), t, edited.flatten(0, 1))  # (b·4, c, h, w), one call
        inside[0] = False
        noise_pred_edited = rearrange(noise_pred_edited, "(b k) c h w -> b k c h w", k=k)
        total[0] = total[0] + (noise_pred_edited - noise_pred[:, None]).norm(dim=2)  # (b, 4, h, w)

    handle = unet.register_forward_hook(compare)
    try:
        pictures = txt2img(components, captions, guidance_scale=guidance_scale, seed=seed, output_type="pt", **SAMPLING)
    finally:
        handle.remove()
    return pictures, F.interpolate(total[0].float().cpu(), size=pictures.shape[-2:], mode="bilinear")


def two_object_captions(n: int) -> list[str]:
    """n training captions of two objects, evenly spaced through shapes.train_captions() (a fixed list)."""
    pairs = [c for c in shapes.train_captions() if shapes.parse_caption(c).relation is not None]
    if not 0 < n <= len(pairs):
        raise MinisdError(f"n must be in [1, {len(pairs)}], got {n}")
    return [pairs[i * len(pairs) // n] for i in range(n)]


def batched(run, components: Components, captions: list[str], seed: int, guidance_scale: float, batch_size: int = 20):
    """run_with_maps or edit_maps over the captions in batches (batch k draws its noise from seed + k); returns the
    pictures and the maps, concatenated."""
    batches = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    results = [run(components, batch, seed + k, guidance_scale) for k, batch in enumerate(batches)]
    return torch.cat([p for p, _ in results]), torch.cat([m for _, m in results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisd.train.localisation", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a nano model file (default: the shipped one)")
    parser.add_argument("--captions", type=int, default=60, help="two-object training captions (60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from minisd.api import default_model
    from minisd.loading import load_components

    model = args.model or default_model()
    components = load_components(model, dtype=torch.float32)
    w = components.guidance_scale
    captions = two_object_captions(args.captions)
    print(f"{model}: {len(captions)} two-object captions, DPM++ 2M, 25 steps, guidance {w:g}")
    pictures, maps = batched(run_with_maps, components, captions, args.seed, w)
    result = score(maps, pictures, captions)
    print(f"cross-attention maps peak inside their object's box: {result.line()}")
    print(f"adherence, the whole caption: {100 * (1 - result.skipped / len(captions)):.0f}%")
    share = attention_share(maps, captions)
    print("a pixel's attention goes to: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items()))
    for name, rate in context_swap(components, captions, args.seed, w).items():
        print(f"adherence, {name}: {100 * rate:.0f}%")
    pictures, maps = batched(edit_maps, components, captions, args.seed, w)
    print(f"edit maps peak inside their object's box: {score(maps, pictures, captions, slot_maps=True).line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
