"""Stage 2a: a nano CLIP. Pretrain the text encoder contrastively against the pictures, then freeze it, as SD v1
froze the CLIP text encoder it was given (Rombach et al. 2022, §4.3.2 and appendix E; CLIP: Radford et al. 2021,
arXiv:2103.00020, Figure 3):

    I_f = image_tower(z)                       # the picture's VAE latents -> (n, d)
    T_f = text_projection(pooled(τ_θ(y)))      # the text encoder's state at the end token -> (n, d)
    logits = exp(t) · normalize(I_f) · normalize(T_f)ᵀ          # (n, n) cosine similarities, learned temperature
    L = (cross_entropy(logits, target) + cross_entropy(logitsᵀ, target)) / 2

`target` spreads each row's mass over every caption of the same *scene*: a batch draws with replacement, so it
holds the same scene several times, and "a red circle above a blue square" and "a blue square below a red circle"
are the same scene, which CLIP's one-hot targets would count as a wrong match.

Why: trained only through the diffusion loss, the nano text encoder learned colours and shapes but not which
object comes first (an earlier recipe's model, 7,000 steps, drew "a red circle above a blue square" and its
mirror alike: 40% held-out adherence; with this stage first, 99% after 5,000 steps). The causal mask lets only
the tokens after the relation word see the whole caption, and the gradient reaching them through the UNet is
weak. The contrastive loss asks the end token for the whole scene directly: a batch of 256 draws from ~200
training scenes almost always holds a scene's mirror image as a negative (the hard negatives of NegCLIP,
Yuksekgonul et al. 2023, arXiv:2210.01936). Three minutes on one CPU thread.

The image tower and the projections are thrown away; minisd keeps only the text encoder. The UNet then reads the
scene off the end and padding tokens, which attend to every word.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from minisd.clip import TextEncoder
from minisd.tokenizer import Tokenizer
from minisd.train import shapes
from minisd.train.captions import pick_phrasing
from minisd.train.common import LossLog, init_weights, linear_warmup

END = 49407  # <|endoftext|>: CLIP's end token, and SD v1's padding


@dataclass
class TextPretrainingConfig:
    """The contrastive stage's knobs (with the seed and the latents, reproducible bit for bit)."""

    steps: int = 1500  # 3.2 min on one thread (0.126 s a step); in-batch scene retrieval ~97% by then
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    embed_dim: int = 64  # the shared space of the two towers
    seed: int = 0


class ImageTower(nn.Module):
    """The picture side: an MLP on the flattened VAE latents (b, 4, h, w) -> (b, embed_dim). Flattening keeps
    where things are, which is what the captions talk about."""

    def __init__(self, latent_values: int, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(latent_values, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, embed_dim),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def pooled(text_encoder: TextEncoder, input_ids: Tensor) -> Tensor:
    """CLIP's pooled output: the last hidden state at the first end token. input_ids (b, 77) -> (b, d).

    Under the causal mask the end token never sees the padding after it, so the batch is cut after its longest
    caption: the same numbers, 6× less work than 77 tokens.
    """
    eos = (input_ids == END).int().argmax(-1)  # (b,): position of the first end token
    input_ids = input_ids[:, : int(eos.max()) + 1]
    hidden = text_encoder(input_ids).last_hidden_state  # (b, s, d)
    return hidden[torch.arange(len(input_ids)), eos]


def scene_ids(caption_ids: Tensor) -> Tensor:
    """An integer per caption, equal for captions that describe the same scene (the two orders of a pair, in any
    phrasing). caption_ids (n, 77) -> (n,) int64; (n, k, 77), k phrasings of each picture's caption -> (n,)."""
    if caption_ids.dim() == 3:
        caption_ids = caption_ids[:, 0]  # the k phrasings of a picture say one scene
    unique, inverse = torch.unique(caption_ids, dim=0, return_inverse=True)
    tokenizer = Tokenizer.from_default()
    keys = [shapes.scene_key(shapes.parse_caption(tokenizer.decode(ids))) for ids in unique]
    index: dict[tuple, int] = {}
    for key in keys:  # numbered in order of first appearance
        index.setdefault(key, len(index))
    return torch.tensor([index[key] for key in keys])[inverse]


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, scenes: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy, with every caption of the same scene a positive.

    image_embeds, text_embeds: (b, d); logit_scale: () = log(1 / temperature); scenes: (b,). Returns ().
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # (b, b); CLIP clips at 100
    same = (scenes[:, None] == scenes[None, :]).float()  # (b, b), symmetric
    target = same / same.sum(-1, keepdim=True)  # each row sums to 1
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain_text_encoder(
    text_encoder: TextEncoder,
    mean: Tensor,
    std: Tensor,
    caption_ids: Tensor,
    scale: float,
    config: TextPretrainingConfig,
    *,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> TextEncoder:
    """Train `text_encoder` in place against the training pictures' latents (mean, std: (n, 4, h, w), the VAE
    posterior of each picture; caption_ids: (n, 77), or (n, k, 77) with one of k phrasings picked per draw) and
    return it. The towers' weights are dropped after."""
    generator = torch.Generator().manual_seed(config.seed)
    image_tower = ImageTower(mean[0].numel(), config.embed_dim)
    text_projection = nn.Linear(text_encoder.config.hidden_size, config.embed_dim, bias=False)
    init_weights(image_tower, generator)  # from the run's generator, not the global RNG
    init_weights(text_projection, generator)
    logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial temperature
    params = [*text_encoder.parameters(), *image_tower.parameters(), *text_projection.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scenes = scene_ids(caption_ids)
    text_encoder.train()
    log = LossLog(log_path or "unused", enabled=log_path is not None)
    bar = tqdm(total=config.steps, desc="text encoder", disable=not progress)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * linear_warmup(step, config.warmup_steps)
        index = torch.randint(len(mean), (config.batch_size,), generator=generator)
        z = scale * (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator))
        text_embeds = text_projection(pooled(text_encoder, pick_phrasing(caption_ids, index, generator)))
        loss = contrastive_loss(image_tower(z), text_embeds, logit_scale, scenes[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            log.write(step + 1, loss=loss.item(), temperature=1 / logit_scale.exp().item())
        bar.update()
        bar.set_postfix(loss=loss.item(), refresh=False)
    bar.close()
    return text_encoder.eval()
