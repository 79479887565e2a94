"""Training captions in the phrasings people type (shapes.py's grammar: "over", "left of", "the", a full stop...).

Each training picture is drawn once, from its documented caption. It gets `k` phrasings of that caption, tokenized
once; every time training draws the picture it picks one of them:

    picture i ── documented caption ── k phrasings ── ids (n, k, 77)       each phrasing: the documented one with
                                                                           probability shapes.DOCUMENTED_FRACTION,
    one draw of picture i ── one of its k phrasings, uniformly              else any of the caption's 6–48
                                                                           phrasings (documented one included)

A training scene has ~50 pictures, so it is seen in every one of its phrasings: the model learns that "over" means
"above" from the same pictures, not from other ones. With k = 1 and the documented fraction 1, this is the
documented caption alone (the first nano recipe).
"""

import torch
from torch import Tensor

from minisd.tokenizer import Tokenizer
from minisd.train import shapes

PHRASINGS_PER_PICTURE = 8  # k: 20,000 pictures × 8 × 77 ids = 99 MB in the run's latents file


def phrasing_ids(captions: list[str], k: int, generator: torch.Generator) -> Tensor:
    """k phrasings of every caption, tokenized: (n, k, 77) int64. Slot j of caption i is the documented phrasing
    with probability shapes.DOCUMENTED_FRACTION, else uniform over shapes.phrasings(caption)."""
    unique = sorted(set(captions))
    options = {c: shapes.phrasings(c) for c in unique}  # the documented phrasing is options[c][0]
    documented = torch.rand(len(captions), k, generator=generator) < shapes.DOCUMENTED_FRACTION
    u = torch.rand(len(captions), k, generator=generator)
    texts = sorted({p for ps in options.values() for p in ps})
    row = {text: i for i, text in enumerate(texts)}
    table = Tokenizer.from_default()(texts)  # (phrasings, 77): each phrasing tokenized once
    which = [
        [row[options[c][0 if d else int(x * len(options[c]))]] for d, x in zip(ds, xs, strict=True)]
        for c, ds, xs in zip(captions, documented.tolist(), u.tolist(), strict=True)
    ]
    return table[torch.tensor(which).view(len(captions), k)]


def pick_phrasing(caption_ids: Tensor, index: Tensor, generator: torch.Generator) -> Tensor:
    """The ids of pictures `index` (b,), one phrasing each: caption_ids (n, k, 77) -> (b, 77), a uniform pick of
    the k per picture, drawn from `generator`. caption_ids (n, 77), one phrasing per picture: its rows, no draw."""
    if caption_ids.dim() == 2:
        return caption_ids[index]
    j = torch.randint(caption_ids.shape[1], (len(index),), generator=generator)
    return caption_ids[index, j]
