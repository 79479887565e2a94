"""Teach a trained model a new concept from a few dozen pictures, two ways, with the lesson's loss (L_simple, DDPM
eq. 14) and everything else frozen:

    textual inversion (Gal et al. 2022, arXiv:2208.01618)     LoRA (Hu et al. 2021, arXiv:2106.09685)
    learns n new rows v* of the token table: a new word        learns W' = W + (α / r) · B A beside chosen layers
    "<diamond>"; the UNet and text encoder stay as they are    of the UNet and text encoder; the word is "diamond"
    context = text half 2( token rows with v* spliced in        hooks add B (A x) after each adapted layer
              + positions )                                    (minisd/lora.py), A random, B = 0 at the start
    saved as diffusers' learned_embeds.safetensors             saved as a kohya/A1111 LoRA (lora_unet_…,
    ({"<diamond>": (n, d)}) or A1111's .pt:                    lora_down/lora_up/alpha): load_lora_weights reads it
    load_textual_inversion reads either

One training step, both ways (the model's own VAE encodes the pictures once; LATENT_SCALE as its pipelines use):
    x0 = LATENT_SCALE · z, z ~ q(z | picture);  t ~ U{0, …, 999};  ε ~ N(0, I);  x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε
    loss = ‖ε − ε_θ(x_t, t, context(caption))‖²  with the caption in either phrasing of its scene (concept.phrasings)

code          paper / diffusers textual_inversion.py / kohya
learned       v* (learned_embeds)          initializer: the row v* starts from (diffusers' initializer_token)
down, up      A (lora_down), B (lora_up)   rank r, alpha α (network_dim, network_alpha)
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import safetensors.torch
import torch
from torch import Tensor, nn
from tqdm import tqdm

from minisd.errors import MinisdError
from minisd.loading import Components
from minisd.lora import Adapters
from minisd.samplers.schedule import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod_from_betas, scaled_linear_betas
from minisd.textual_inversion import add_embedding
from minisd.train import concept, shapes
from minisd.train.common import check_positive
from minisd.vae import LATENT_SCALE
from weights_convert.keymap_lora import LoraWeight

LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


@dataclass
class FinetuneConfig:
    """One fine-tuning run (with the seed and the model file: reproducible on one machine and thread count)."""

    steps: int = 400
    batch_size: int = 16
    lr: float = 0.0  # 0: the method's default (textual inversion 5e-3, LoRA 2e-3)
    seed: int = 0
    num_vectors: int = 1  # textual inversion: vectors of the new word
    initializer: str = "square"  # textual inversion: the word whose row v* starts from (a diamond is a square)
    rank: int = 4  # LoRA: r
    alpha: float = 4.0  # LoRA: α (α = r: ΔW = B A)
    text_encoder: bool = True  # LoRA: adapt the text encoder's linears too (kohya's default), not only the UNet's
    preserve: int = 0  # pictures of the model's own training captions mixed in (prior preservation; 0: none)

    def check(self) -> None:
        check_positive(self, "steps", "batch_size", "num_vectors", "rank", "alpha")
        if self.preserve < 0:
            raise MinisdError(f"preserve must be >= 0, got {self.preserve}")
        if self.lr < 0 or not math.isfinite(self.lr):
            raise MinisdError(f"lr must be >= 0 (0: the method's default), got {self.lr}")


def _latents(components: Components, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """μ and σ of q(z | picture) for every training picture (frozen VAE, computed once)."""
    with torch.no_grad():
        posterior = components.vae.encode(shapes.to_image(pixels))
    return posterior.mean, posterior.std


def _batches(components: Components, config: FinetuneConfig, word: str):
    """Endless (x_t, t, ε, captions) batches from the concept's training pictures (and config.preserve pictures of
    the model's own training captions), every draw from config.seed."""
    pixels, captions = concept.pictures(config.seed)
    if config.preserve:  # DreamBooth's prior preservation (Ruiz et al. 2022, §3.3), with drawn, not sampled, pictures
        known, known_captions = shapes.dataset(config.preserve, config.seed + 1, "train")
        pixels, captions = torch.cat([pixels, known]), captions + known_captions
    mean, std = _latents(components, pixels)
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas())
    generator = torch.Generator().manual_seed(config.seed)
    while True:
        index = torch.randint(len(mean), (config.batch_size,), generator=generator)
        z = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)  # z ~ q(z | picture)
        x0 = LATENT_SCALE * z
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (config.batch_size,), generator=generator)  # t ~ U{0, …, 999}
        noise = torch.randn(x0.shape, generator=generator)  # ε
        which = torch.randint(2, (config.batch_size,), generator=generator).tolist()  # one of the two phrasings
        prompts = []
        for i, w in zip(index.tolist(), which, strict=True):
            options = concept.phrasings(captions[i])
            prompts.append(concept.as_prompt(options[w % len(options)], word))
        yield add_noise(x0, noise, t, alphas_cumprod), t, noise, prompts


def _train(parameters: list[nn.Parameter], loss_of, config: FinetuneConfig, lr: float, progress: bool) -> list[float]:
    """AdamW on `parameters` for config.steps steps of loss_of(); returns the loss of each step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    for step in tqdm(range(config.steps), desc="fine-tuning", disable=not progress):
        loss = loss_of()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}; try a lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _frozen(components: Components) -> None:
    for network in (components.unet, components.text_encoder, components.vae):
        network.requires_grad_(False).eval()


def train_textual_inversion(
    components: Components, out: str | os.PathLike, config: FinetuneConfig, progress: bool = True
) -> list[float]:
    """Learn the word concept.TOKEN: n rows v* of the token table, spliced into the input embeddings by hand (the
    lesson's token_embeddings + position_embeddings, then get_output_embeds). Writes {"<diamond>": v*} to `out`
    (diffusers' format), or A1111's .pt when `out` ends with .pt."""
    config.check()
    _frozen(components)
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    start = text_encoder.embeddings.token_embedding.weight[tokenizer.encode(config.initializer)[0]]
    learned = nn.Parameter(start.detach().float().repeat(config.num_vectors, 1))  # (n, d): v*
    first = add_embedding(tokenizer, text_encoder, concept.TOKEN, learned.detach())[0]  # the word's ids
    batches = _batches(components, config, concept.TOKEN)

    def loss_of() -> Tensor:
        x_t, t, noise, prompts = next(batches)
        ids = tokenizer(prompts)  # (b, 77)
        token_embeddings = text_encoder.embeddings.token_embedding(ids)  # (b, 77, d): the frozen table
        is_new = (ids >= first)[..., None]
        token_embeddings = torch.where(is_new, learned[(ids - first).clamp(min=0)], token_embeddings)  # v* spliced in
        input_embeddings = token_embeddings + text_encoder.embeddings.position_embedding.weight[: ids.shape[1]]
        context = text_encoder.output_embeddings(input_embeddings).last_hidden_state
        return (noise - components.unet(x_t, t, context)).square().mean()  # L_simple

    losses = _train([learned], loss_of, config, config.lr or 5e-3, progress)
    with torch.no_grad():
        text_embedding = text_encoder.embeddings.token_embedding.weight
        text_embedding[first : first + config.num_vectors] = learned.to(text_embedding.dtype)  # the model uses it now
    vectors = learned.detach().contiguous()  # (n, d)
    if str(out).endswith(".pt"):  # A1111's training output (weights_convert/embeddings.py), a pickle of plain data
        a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": concept.TOKEN}
        torch.save({**a1111, "step": config.steps, "sd_checkpoint": None, "sd_checkpoint_name": "nano"}, str(out))
    else:  # diffusers' learned_embeds.safetensors
        metadata = {"minisd.concept": concept.CONCEPT, "minisd.finetune_config": json.dumps(asdict(config))}
        safetensors.torch.save_file({concept.TOKEN: vectors}, str(out), metadata=metadata)
    return losses


def lora_targets(components: Components, text_encoder: bool) -> list[tuple[str, str, nn.Module]]:
    """(network, module path, layer) of what the LoRA adapts: the UNet's attention, projections, feed-forward and
    ResNet convolutions (LORA_LAYERS; LoCon's conv1/conv2), and with text_encoder every Linear of the text encoder."""
    targets = [("unet", name, m) for name, m in components.unet.named_modules() if name.endswith(LORA_LAYERS)]
    if text_encoder:
        modules = components.text_encoder.named_modules()
        targets += [("text_encoder", name, m) for name, m in modules if isinstance(m, nn.Linear)]
    return targets


def train_lora(components: Components, out: str | os.PathLike, config: FinetuneConfig, progress: bool = True):
    """Learn a LoRA for the word "diamond": A (r, in[, kh, kw]) random as nn.Linear's init (PEFT's), B = 0, so the
    model starts exactly as it was. Writes a kohya/A1111 file to `out`. Returns the losses."""
    config.check()
    _frozen(components)
    generator = torch.Generator().manual_seed(config.seed + 1)
    weights = []
    for network, name, layer in lora_targets(components, config.text_encoder):
        out_features, in_features, *kernel = layer.weight.shape
        bound = 1 / math.sqrt(in_features * math.prod(kernel))  # U(−1/√fan_in, 1/√fan_in): nn.Linear's init
        down = (torch.rand(config.rank, in_features, *kernel, generator=generator) * 2 - 1) * bound
        up = torch.zeros(out_features, config.rank, *([1, 1] if kernel else []))
        weights.append(LoraWeight(network, name, down, up, config.alpha))
    adapters = Adapters({"unet": components.unet, "text_encoder": components.text_encoder})
    adapter = adapters.add("training", weights)
    parameters = [p for branch in adapter.branches.values() for p in (branch.down, branch.up)]
    for parameter in parameters:
        parameter.requires_grad_(True)
    batches = _batches(components, config, concept.CONCEPT)

    def loss_of() -> Tensor:
        x_t, t, noise, prompts = next(batches)
        context = components.text_encoder(components.tokenizer(prompts)).last_hidden_state
        return (noise - components.unet(x_t, t, context)).square().mean()  # L_simple

    losses = _train(parameters, loss_of, config, config.lr or 2e-3, progress)
    state_dict = {}
    for (network, name), branch in adapter.branches.items():
        prefix = "lora_unet_" if network == "unet" else "lora_te_text_model_"  # kohya's names (keymap_lora.py)
        key = prefix + name.replace(".", "_")
        state_dict[f"{key}.lora_down.weight"] = branch.down.detach().half().contiguous()  # float16: kohya's usual
        state_dict[f"{key}.lora_up.weight"] = branch.up.detach().half().contiguous()  # save_precision, half the size
        state_dict[f"{key}.alpha"] = torch.tensor(config.alpha)
    metadata = {"minisd.concept": concept.CONCEPT, "minisd.finetune_config": json.dumps(asdict(config))}
    metadata["ss_network_dim"], metadata["ss_network_alpha"] = str(config.rank), str(config.alpha)  # as kohya's
    safetensors.torch.save_file(state_dict, str(out), metadata=metadata)
    adapters.unload()  # the model as it was; load `out` to use the LoRA
    return losses
