"""Stage 2: train the nano UNet as a latent diffusion model on the frozen nano VAE's latents.

The lesson's training loop (Ho et al. 2020, arXiv:2006.11239, Algorithm 1, in LDM's latent space, Rombach et al.
2022 eq. 2). As in SD v1 the text encoder τ_θ comes pretrained and stays frozen: SD v1 took CLIP's, the nano model
pretrains its own first (`pretrain`, text_pretraining.py: a nano CLIP on the same pictures). With
freeze_text_encoder=False it is trained jointly instead, as LDM trained its BERT-like encoder:

    x0 = scale · z,  z ~ q(z | image)         # latents of a training picture (frozen VAE)
    t ~ U{0, …, 999},  ε ~ N(0, I)
    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε          # add_noise, DDPM eq. 4
    L_simple = ‖ε − ε_θ(x_t, t, τ_θ(y))‖²     # DDPM eq. 14; τ_θ the text encoder, y the caption

With prediction_type "v_prediction" (SD 2's 768 models; `--prediction-type v`) the network learns the velocity
instead, v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0 (Salimans & Ho 2022, §4; schedule.velocity), with the same L2 loss:
    L_v = ‖v − v_θ(x_t, t, τ_θ(y))‖²
Everything else (data, noise, schedule, guidance dropout) is the same, and the file records what it predicts.

10% of captions are replaced by the empty prompt, so the same network also learns ε_θ(x_t, t, τ_θ("")) for
classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, Algorithm 1 with p_uncond = 0.1).

`scale` makes the latents unit-variance: 1 / std of the VAE latents over the training pictures, LDM's
`scale_by_std` (§4.3.2 and appendix G; SD v1's VAE got 0.18215 this way). SD v1's pipelines use the constant
LATENT_SCALE, so the exported file folds the nano scale into the VAE's 1×1 quant convs (`fold_latent_scale`):
LATENT_SCALE · z' = scale · z exactly, and the file is an ordinary SD v1 file for minisd's loader and pipelines.

code                paper                               diffusers (train_text_to_image.py)
x0                  x_0 = scale · z                     latents
noise               ε                                   noise
t                   t                                   timesteps
x_t                 x_t                                 noisy_latents
eps                 ε_θ(x_t, t, τ_θ(y))                 model_pred
alpha_bar_t         ᾱ_t                                 alphas_cumprod[t]
p_uncond            p_uncond (CFG)                      (proportion_empty_prompts)
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.samplers.base import check_prediction_type
from minisd.samplers.schedule import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    alphas_cumprod_from_betas,
    scaled_linear_betas,
    velocity,
)
from minisd.tokenizer import Tokenizer
from minisd.train import shapes
from minisd.train.captions import PHRASINGS_PER_PICTURE, phrasing_ids, pick_phrasing
from minisd.train.common import (
    EMA,
    Distributed,
    LossLog,
    build,
    check_positive,
    config_to_json,
    linear_warmup,
    load_checkpoint,
    make_run_dir,
    read_resume_state,
    resuming,
    save_checkpoint,
    save_minisd_file,
)
from minisd.train.text_pretraining import TextPretrainingConfig, pretrain_text_encoder
from minisd.train.vae_training import load_vae
from minisd.unet import UNet, UNetConfig
from minisd.vae import LATENT_SCALE, VAE

# The size study in minisd/train/__init__.py: 3.37 M + 5.80 M parameters; 25 CFG steps at 8×8 in ~0.5 s.
NANO_TEXT_ENCODER = TextEncoderConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
NANO_UNET = UNetConfig(
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=64,
    norm_num_groups=16,
)


@dataclass
class DiffusionTrainingConfig:
    """Everything that fixes a diffusion training run (with the seed and the VAE, reproducible bit for bit)."""

    unet: UNetConfig = field(default_factory=lambda: NANO_UNET)
    text_encoder: TextEncoderConfig = field(default_factory=lambda: NANO_TEXT_ENCODER)
    steps: int = 5000  # the shipped run (minisd/train/__init__.py): held-out adherence 99% at 5,000
    batch_size: int = 64  # the global batch; under DDP each of the world_size ranks takes batch_size / world_size
    lr: float = 5e-4  # AdamW; constant after the warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.01  # AdamW's default (diffusers train_text_to_image adam_weight_decay)
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # Ho & Salimans 2022: the caption is dropped 10% of the time
    num_pictures: int = 20_000  # training pictures, drawn once from shapes.dataset(seed=seed), encoded once
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    text_pretraining: TextPretrainingConfig = field(default_factory=TextPretrainingConfig)  # steps 0: none
    freeze_text_encoder: bool = True  # SD v1: the pretrained text encoder stays as it is
    prediction_type: str = "epsilon"  # what the UNet learns: ε (SD v1) or "v_prediction" (SD 2's 768 models)

    def check(self, world_size: int = 1) -> None:
        """Refuse settings that cannot train, before any work is done: one line naming the setting."""
        check_positive(self, "steps", "batch_size", "lr", "num_pictures", "checkpoint_every")
        check_positive(self.text_pretraining, "batch_size", "lr")
        if self.batch_size % world_size != 0:
            raise MinisdError(f"batch_size must be a multiple of world_size {world_size}, got {self.batch_size}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise MinisdError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        check_prediction_type(self.prediction_type)
        if self.freeze_text_encoder and self.text_pretraining.steps < 1:
            raise MinisdError("freeze_text_encoder needs text_pretraining.steps >= 1 (frozen random weights are noise)")


class DiffusionRun(NamedTuple):
    """What train_diffusion returns: the file written (model.safetensors, or checkpoint.safetensors when stopped early),
    the trained module (this rank's copy) and its EMA."""

    path: Path
    denoiser: "Denoiser"
    ema: EMA


class Denoiser(nn.Module):
    """ε_θ(x_t, t, τ_θ(y)): the text encoder and the UNet as one module, the unit that is trained, averaged
    (EMA) and wrapped by DistributedDataParallel. Its state-dict prefixes unet. / text_encoder. are minisd's
    single-file layout."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        """x_t: (b, 4, h, w) noisy latents; t: (b,) timesteps; input_ids: (b, 77) tokens. Returns ε: (b, 4, h, w)."""
        context = self.text_encoder(input_ids).last_hidden_state  # (b, 77, d)
        return self.unet(x_t, t, context)


@torch.no_grad()
def encode_pictures(vae: VAE, pixels: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """The posterior of every picture, computed once: μ and σ of q(z | image), each (n, 4, h, w), float32 CPU.
    Training samples z = μ + σ·ε afresh each time a picture is drawn, as LDM does (it encodes every step)."""
    device = vae.post_quant_conv.weight.device
    means, stds = [], []
    for batch in pixels.split(batch_size):
        posterior = vae.encode(shapes.to_image(batch).to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean: Tensor, std: Tensor, generator: torch.Generator) -> float:
    """LDM's scale_by_std: 1 / std of sampled VAE latents z = μ + σ·ε, so that x0 = scale · z has unit variance
    (CompVis LatentDiffusion.on_train_batch_start: `1. / z.flatten().std()`, there over the first batch; here
    over every training picture)."""
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return 1.0 / z.flatten().std().item()


@torch.no_grad()
def fold_latent_scale(vae_state_dict: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Rescale a VAE's latent space so that LATENT_SCALE · z' = scale · z: z' = k · z with k = scale / LATENT_SCALE.

    quant_conv (1×1, 2c -> 2c) makes the moments [μ, log σ²]: its μ rows are multiplied by k (μ' = k μ) and
    log σ² gets + 2 ln k (σ' = k σ). post_quant_conv (1×1, c -> c) reads z = z' / k: its input columns are divided
    by k. Encoder and decoder are otherwise untouched, so decode(encode(x)) is the same function. Returns a new
    state dict.
    """
    k = scale / LATENT_SCALE
    out = dict(vae_state_dict)
    c = out["post_quant_conv.weight"].shape[1]  # latent channels
    weight, bias = out["quant_conv.weight"].clone(), out["quant_conv.bias"].clone()  # (2c, 2c, 1, 1), (2c,)
    weight[:c] *= k
    bias[:c] *= k
    bias[c:] += 2.0 * math.log(k)
    out["quant_conv.weight"], out["quant_conv.bias"] = weight, bias
    out["post_quant_conv.weight"] = out["post_quant_conv.weight"] / k  # (c_out, c_in, 1, 1): scale the inputs
    return out


def diffusion_loss(
    denoiser: nn.Module,
    x0: Tensor,
    input_ids: Tensor,
    t: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
) -> Tensor:
    """L_simple = ‖ε − ε_θ(x_t, t, τ_θ(y))‖² (DDPM eq. 14), or ‖v − v_θ‖² for "v_prediction"; mean over the batch
    and the latent values.

    x0, noise: (b, 4, h, w); input_ids: (b, 77); t: (b,) in [0, 999]. Returns ().
    """
    x_t = add_noise(x0, noise, t, alphas_cumprod)  # DDPM eq. 4
    target = velocity(x0, noise, t, alphas_cumprod) if prediction_type == "v_prediction" else noise
    model_pred = denoiser(x_t, t, input_ids)  # ε_θ or v_θ
    return (target - model_pred).square().mean()


def draw_batch(
    generator: torch.Generator,
    mean: Tensor,
    std: Tensor,
    caption_ids: Tensor,
    empty_ids: Tensor,
    scale: float,
    batch_size: int,
    p_uncond: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One global batch, every draw from `generator` on the CPU: x0 (b, 4, h, w), input_ids (b, 77), t (b,),
    noise (b, 4, h, w). caption_ids: (n, 77), or (n, k, 77) with k phrasings a picture, one picked per draw
    (captions.py). Every DDP rank draws the same global batch and keeps its own shard, so the run does not depend
    on the number of processes."""
    index = torch.randint(len(mean), (batch_size,), generator=generator)
    z = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)  # z ~ q(z | image)
    x0 = scale * z
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)  # t ~ U{0, …, 999}
    noise = torch.randn(x0.shape, generator=generator)  # ε ~ N(0, I)
    drop = torch.rand(batch_size, generator=generator) < p_uncond  # classifier-free guidance: y -> ""
    input_ids = torch.where(drop[:, None], empty_ids, pick_phrasing(caption_ids, index, generator))
    return x0, input_ids, t, noise


def reusable(path: Path, source: dict, what: str) -> bool:
    """True when a stage's output `path` exists and was made from the same `source` (inputs and settings): later
    runs and resumes reuse it. One made from other inputs is an error, never silently mixed in."""
    if not path.exists():
        return False
    with resuming(path):
        cached = load_checkpoint(path)["source"]
    if cached != source:
        raise MinisdError(f"{path} was made from {what} ({cached}); use a new run_dir")
    return True


def prepare_latents(run_dir: Path, vae_path: str | os.PathLike, vae: VAE, config: DiffusionTrainingConfig) -> Path:
    """Draw the training pictures, encode them with the frozen VAE (`vae`, read from `vae_path`) and tokenize
    PHRASINGS_PER_PICTURE phrasings of each caption (captions.py), once; saved as run_dir/latents.safetensors
    (mean, std, caption_ids (n, k, 77), scale), which later runs and resumes reuse."""
    path = run_dir / "latents.safetensors"
    source = {"vae_sha256": hashlib.sha256(Path(vae_path).read_bytes()).hexdigest(), "seed": config.seed}
    source["num_pictures"] = config.num_pictures
    source["phrasings"] = {"per_picture": PHRASINGS_PER_PICTURE, "documented_fraction": shapes.DOCUMENTED_FRACTION}
    source["phrasings"]["relations"] = {r: list(p) for r, p in shapes.RELATION_PHRASES.items()}  # JSON: lists
    if reusable(path, source, "another VAE or data set"):
        return path
    pixels, captions = shapes.dataset(config.num_pictures, seed=config.seed)
    mean, std = encode_pictures(vae, pixels)
    scale = latent_scale(mean, std, torch.Generator().manual_seed(config.seed))
    caption_ids = phrasing_ids(captions, PHRASINGS_PER_PICTURE, torch.Generator().manual_seed(config.seed))
    save_checkpoint(path, {"mean": mean, "std": std, "caption_ids": caption_ids, "scale": scale, "source": source})
    return path


def pretrain(path: Path, run_dir: Path, config: DiffusionTrainingConfig, progress: bool = True) -> Path:
    """Stage 2a (text_pretraining.py): a fresh text encoder trained contrastively on the run's latents, saved as
    run_dir/text_encoder.safetensors; a file already there from the same configs is reused."""
    data = load_checkpoint(run_dir / "latents.safetensors")
    source = {"latents": data["source"], "config": json.loads(config_to_json(config.text_pretraining))}
    source["text_encoder"] = json.loads(config_to_json(config.text_encoder))
    if reusable(path, source, "other latents or settings"):
        return path
    generator = torch.Generator().manual_seed(config.text_pretraining.seed)
    text_encoder = build(TextEncoder, config.text_encoder, generator)
    pretrain_text_encoder(
        text_encoder, data["mean"], data["std"], data["caption_ids"], data["scale"], config.text_pretraining,
        log_path=run_dir / "text_log.jsonl", progress=progress,
    )  # fmt: skip
    save_checkpoint(path, {"text_encoder": text_encoder.state_dict(), "source": source})
    return path


def train_diffusion(
    run_dir: str | os.PathLike,
    vae_path: str | os.PathLike,
    config: DiffusionTrainingConfig,
    *,
    device: str | torch.device = "cpu",
    distributed: Distributed | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> DiffusionRun:
    """Train (or resume, if run_dir holds a checkpoint) and export run_dir/model.safetensors: minisd's single
    file with the EMA weights of the UNet and text encoder and the VAE (scale folded in).

    run_dir gets checkpoint.safetensors (resumable: weights, AdamW state, EMA, step, generator), log.jsonl and
    latents.safetensors.
    distributed: this process's place in a DDP run (`common.init_distributed()`); rank 0 writes the files.
    stop_at: stop (with a checkpoint) before that step, as if killed; for tests of resuming.
    """
    dist_ = distributed or Distributed()
    config.check(dist_.world_size)
    vae = load_vae(vae_path)  # read once; a missing or wrong file fails now, before the run directory is made
    run_dir = make_run_dir(run_dir)
    device = torch.device(device)
    checkpoint_path = run_dir / "checkpoint.safetensors"
    state = read_resume_state(checkpoint_path, run_dir / "log.jsonl")  # checked before any work
    if state is not None:
        with resuming(checkpoint_path):
            saved = json.loads(state["config"])
            for name in ("unet", "text_encoder"):
                if saved[name] != json.loads(config_to_json(getattr(config, name))):
                    raise MinisdError(f"{checkpoint_path} holds another {name} config; use a new run_dir")

    if dist_.is_main:
        prepare_latents(run_dir, vae_path, vae, config)
    dist_.barrier()  # the other ranks wait for latents.safetensors
    data = load_checkpoint(run_dir / "latents.safetensors")
    mean, std, caption_ids, scale = data["mean"], data["std"], data["caption_ids"], data["scale"]
    empty_ids = Tokenizer.from_default()("")  # (1, 77): start, end, padding
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas()).to(device)

    pretrained_path = run_dir / "text_encoder.safetensors"
    if config.text_pretraining.steps > 0 and dist_.is_main and state is None:
        pretrain(pretrained_path, run_dir, config, progress)
    dist_.barrier()  # the other ranks wait for text_encoder.safetensors

    generator = torch.Generator().manual_seed(config.seed)  # every random draw of this run comes from here
    denoiser = Denoiser(build(UNet, config.unet, generator), build(TextEncoder, config.text_encoder, generator))
    if config.text_pretraining.steps > 0 and state is None:
        denoiser.text_encoder.load_state_dict(load_checkpoint(pretrained_path)["text_encoder"])
    denoiser.text_encoder.requires_grad_(not config.freeze_text_encoder)
    denoiser = denoiser.to(device).train()
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(denoiser, config.ema_decay)
    step = 0
    if state is not None:
        with resuming(checkpoint_path):
            denoiser.load_state_dict(state["denoiser"])
            optimizer.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
            generator.set_state(state["generator"])
            step = state["step"]
    model = DistributedDataParallel(denoiser) if dist_.world_size > 1 else denoiser

    def checkpoint() -> None:
        if dist_.is_main:
            state = {"denoiser": denoiser.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
            save_checkpoint(
                checkpoint_path,
                {**state, "generator": generator.get_state(), "step": step, "config": config_to_json(config)},
            )
        dist_.barrier()

    log = LossLog(run_dir / "log.jsonl", resume_step=step, enabled=dist_.is_main)
    bar = tqdm(total=config.steps, initial=step, desc="diffusion", disable=not (progress and dist_.is_main))
    while step < config.steps:
        if step == stop_at:
            checkpoint()
            return DiffusionRun(checkpoint_path, denoiser, ema)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * linear_warmup(step, config.warmup_steps)
        batch = draw_batch(generator, mean, std, caption_ids, empty_ids, scale, config.batch_size, config.p_uncond)
        x0, input_ids, t, noise = (dist_.shard(x).to(device) for x in batch)  # this rank's share
        loss = diffusion_loss(model, x0, input_ids, t, noise, alphas_cumprod, config.prediction_type)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}; try a lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over the ranks = the gradient of the global batch's mean
        optimizer.step()
        ema.update(denoiser)
        step += 1
        if step % config.log_every == 0 or step == config.steps:
            log.write(step, loss=dist_.mean(loss.detach()).item())  # the global batch's loss
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
        bar.update()
        bar.set_postfix(loss=loss.item(), refresh=False)  # this rank's shard
    bar.close()

    out = run_dir / "model.safetensors"
    if dist_.is_main:
        export_model(out, ema.shadow, vae, scale, config, step)
    dist_.barrier()
    return DiffusionRun(out, denoiser, ema)


def export_model(
    path: str | os.PathLike,
    denoiser_state_dict: dict[str, Tensor],
    vae: VAE,
    scale: float,
    config: DiffusionTrainingConfig,
    step: int,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write minisd's single file: UNet and text encoder from `denoiser_state_dict` (keys unet.* / text_encoder.*,
    e.g. the EMA shadow), the trained VAE with `scale` folded in. The metadata records the configs (the heads and
    GroupNorm groups are not in the tensor shapes) and the scale."""
    components = {
        "unet": {k.removeprefix("unet."): v for k, v in denoiser_state_dict.items() if k.startswith("unet.")},
        "text_encoder": {
            k.removeprefix("text_encoder."): v for k, v in denoiser_state_dict.items() if k.startswith("text_encoder.")
        },
        "vae": fold_latent_scale(vae.state_dict(), scale),
    }
    metadata = {
        "minisd.config": json.dumps(
            {
                "unet": json.loads(config_to_json(config.unet)),
                "text_encoder": json.loads(config_to_json(config.text_encoder)),
                "vae": json.loads(config_to_json(vae.config)),
            }
        ),
        "minisd.sample_size": str(shapes.SIZE),  # pixels: the size the model was trained at, its default
        "minisd.latent_scale": str(LATENT_SCALE),  # after folding: the file is used with SD v1's constant
        "minisd.trained_latent_scale": repr(scale),  # 1 / std of the VAE's own latents, before folding
        "minisd.train_steps": str(step),
        "minisd.prediction_type": config.prediction_type,  # what the UNet predicts (loading reads it)
        "minisd.train_config": config_to_json(config),
    }
    save_minisd_file(path, components, metadata, dtype)
