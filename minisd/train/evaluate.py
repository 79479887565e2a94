"""How good is a trained nano model? Prompt adherence on captions it never saw, and the VAE's reconstruction.

    adherence  for every held-out caption (shapes.heldout_captions(): 28 scenes, 56 captions, none trained on),
               draw `seeds` pictures with the ordinary txt2img pipeline and ask checker.check whether each shows its
               caption (count, colour, shape, relation). The same on as many training captions, for comparison.
    phrasings  the same held-out scenes said each way people type them (phrasing_families: "over", "left of",
               "the", a full stop, ...): adherence per family, so a phrasing the model has not learned shows.
    PSNR       the VAE's deterministic reconstruction D(μ) of held-out pictures (vae_training.evaluate_vae).
    grid       one picture per caption, in rows, with the captions printed under them.
    guidance   the model's default guidance scale: the best of a few on training captions (choose_guidance),
               written into the file (record_guidance); `python -m minisd.train all` does this last.

`python -m minisd.train evaluate --model minisd/data/nano.safetensors --seeds 4 --phrasings --grid samples.png`.
"""

import os
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from minisd.errors import MinisdError
from minisd.images import image_to_pil
from minisd.loading import Components
from minisd.pipelines import txt2img
from minisd.pipelines.prompts import parse_emphasis
from minisd.train import checker, shapes
from minisd.train.vae_training import evaluate_vae
from weights_convert.folders import file_metadata


def prompt_note(source: str | os.PathLike, prompt: str) -> str | None:
    """A one-line note when weights trained by `python -m minisd.train` (the nano model) get a prompt outside the one
    grammar they were trained on: such a model draws *something* for any prompt, so `minisd generate` says so rather
    than stay silent, naming the words it does not know (or, when it knows them all, that they do not make one of
    its captions), with the grammar. None for other weights and for prompts in the grammar. Call it after loading:
    the file is known to be readable."""
    path = Path(source)
    if not path.is_file() or "minisd.train_config" not in file_metadata(path):
        return None
    text = "".join(text for text, _ in parse_emphasis(prompt))  # "(red:1.2)" is still "red"
    try:
        shapes.parse_caption(text)
        return None
    except MinisdError:
        unknown = shapes.unknown_words(text)
    if unknown:
        said = f"does not know {', '.join(repr(w) for w in unknown)}"
    else:
        said = f"knows every word of {text.strip()!r}, but that is not one of its captions"
    return f"note: {path.name} {said}; it draws only captions {shapes.grammar()}"


class Adherence(NamedTuple):
    """accepted / total pictures; failures: part that failed ("count", "colour", "shape", "relation") -> count;
    seconds: the wall time per picture."""

    accepted: int
    total: int
    failures: dict[str, int]
    seconds: float

    @property
    def rate(self) -> float:
        return self.accepted / self.total


@torch.no_grad()
def generate(
    components: Components,
    captions: list[str],
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    sampler: str = "DPM++ 2M",
    batch_size: int = 16,
) -> Tensor:
    """One picture per caption, (n, 3, 64, 64) in [0, 1]; batch k draws its noise from seed + k."""
    size = shapes.SIZE
    pictures = []
    for k, start in enumerate(range(0, len(captions), batch_size)):
        batch = captions[start : start + batch_size]
        picture = txt2img(
            components, batch, height=size, width=size, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed + k, output_type="pt",
        )  # fmt: skip
        pictures.append(picture)
    return torch.cat(pictures)


def adherence(
    components: Components, captions: list[str], seeds: int = 4, prompts: list[str] | None = None, **sampling
) -> Adherence:
    """Draw `seeds` pictures of every caption (seeds 0, 1000, 2000, …) and judge each with checker.check.
    prompts: what the model is given for each caption, when it is not the caption itself (a learned word such as
    "<star>" for "star": train/concept.py)."""
    accepted, total, failures = 0, 0, {}
    start = time.perf_counter()
    for s in range(seeds):
        pictures = generate(components, captions if prompts is None else prompts, seed=1000 * s, **sampling)
        for picture, caption in zip(pictures, captions, strict=True):
            verdict = checker.check_details(picture * 2 - 1, caption)  # the checker reads [-1, 1]
            accepted += verdict.ok
            total += 1
            if not verdict.ok:
                failures[verdict.part] = failures.get(verdict.part, 0) + 1
    return Adherence(accepted, total, failures, (time.perf_counter() - start) / total)


def phrasing_families() -> dict[str, list[str]]:
    """The held-out captions (28 scenes, never trained on in any phrasing) in each way shapes.py's grammar says them:
    "documented" (56 captions: a … a …, the documented relation), "the … the" (56), "trailing . or !" (56,
    alternately), and one family per other relation phrase ("over", "beneath", "left of", ...: the held-out captions
    of that relation, once with "a … a" and once with "the … the", 28 each)."""
    scenes = [shapes.parse_caption(c) for c in shapes.heldout_captions()]
    families = {
        "documented": [shapes.say(s) for s in scenes],
        "the … the": [shapes.say(s, None, ("the", "the")) for s in scenes],
        "trailing . or !": [shapes.say(s, None, ("a", "a"), ".!"[i % 2]) for i, s in enumerate(scenes)],
    }
    for relation, phrases in shapes.RELATION_PHRASES.items():
        for phrase in phrases[1:]:
            said = [s for s in scenes if s.relation == relation]
            families[f'"{phrase}"'] = [shapes.say(s, phrase, (x, x)) for x in shapes.ARTICLES for s in said]
    return families


def vae_psnr(components: Components, num_pictures: int = 512, seed: int = 1) -> float:
    """PSNR (dB) of the VAE's reconstruction of `num_pictures` held-out pictures (drawn from held-out captions).

    The shipped VAE has the latent scale folded into it (diffusion_training.fold_latent_scale), which changes
    μ and D by reciprocal factors only: D(μ) is the trained VAE's.
    """
    pixels, _ = shapes.dataset(num_pictures, seed=seed, split="heldout")
    return evaluate_vae(components.vae.float(), pixels)  # (already float32 when loaded so: .float() is a no-op)


def sample_captions_for_grid() -> list[str]:
    """Eight held-out scenes (every relation, colour and shape appears), said in as many ways (the documented
    phrasing first, then "left of", "beneath", "the", a full stop ...), and four training captions."""
    heldout = [shapes.parse_caption(c) for c in shapes.heldout_captions()[::7][:8]]
    said = []
    for i, scene in enumerate(heldout):
        phrases = shapes.RELATION_PHRASES[scene.relation]
        phrase = phrases[(i // 2 + 1) % len(phrases)] if i else None
        said.append(shapes.say(scene, phrase, (shapes.ARTICLES[i // 2 % 2],) * 2, shapes.ENDINGS[i % 3]))
    return said + shapes.train_captions()[::97][:4]


def labelled_grid(pictures: Tensor, captions: list[str], columns: int = 4, scale: int = 3) -> Image.Image:
    """Pictures (n, 3, h, w) in [0, 1], each enlarged `scale` times (nearest pixel: nothing is invented) with its
    caption written under it, `columns` to a row; white background."""
    n, _, h, w = pictures.shape
    rows = -(-n // columns)
    cell_w, text_h = w * scale + 16, 30
    cell_h = h * scale + text_h + 8
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        x, y = (i % columns) * cell_w + 8, (i // columns) * cell_h + 4
        pil = image_to_pil(picture.unsqueeze(0) * 2 - 1)[0].resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(pil, (x, y))
        lines = textwrap.wrap(caption, width=cell_w // 6)
        draw.multiline_text((x, y + h * scale + 3), "\n".join(lines[:2]), fill="black", font=font, spacing=2)
    return grid


GUIDANCE_CANDIDATES = (1.5, 2.0, 3.0, 5.0, 7.5)


def training_sample() -> list[str]:
    """Every 8th training caption (49 of 388): the training-side comparison and the guidance choice."""
    return shapes.train_captions()[::8]


def choose_guidance(
    components: Components, scales: tuple[float, ...] = GUIDANCE_CANDIDATES, seeds: int = 4
) -> tuple[float, dict[float, float]]:
    """The guidance scale with the best adherence on training captions (every 8th, `seeds` pictures each): the
    model's default, chosen without looking at the held-out captions. Returns (best, {scale: adherence})."""
    captions = training_sample()
    rates = {w: adherence(components, captions, seeds=seeds, guidance_scale=w).rate for w in scales}
    return max(rates, key=lambda w: (rates[w], -w)), rates  # ties: the smaller scale


def record_guidance(path: str | os.PathLike, guidance_scale: float) -> None:
    """Write "minisd.guidance_scale" into a model file's metadata (the API's and CLI's default for it); the
    tensors are copied unchanged. Atomic: written beside, then renamed."""
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = {**(file.metadata() or {}), "minisd.guidance_scale": f"{guidance_scale:g}"}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
