"""Stage 1: train the nano VAE (SD v1's KL autoencoder, small) to compress 64×64 shape pictures into 8×8×4
latents.

LDM (Rombach et al. 2022, arXiv:2112.10752, §3 and appendix G) trains its autoencoders with

    L = L_rec + λ_KL · KL(q(z | x) ‖ N(0, I)) + LPIPS perceptual loss + a patch-GAN adversarial loss

(CompVis `ldm/modules/losses/contperceptual.py` LPIPSWithDiscriminator; the kl-f8 config sets λ_KL = 1e-6 and
an L1 pixel loss). The nano VAE keeps the first two terms only: L1 reconstruction plus a small KL. Flat-coloured
shapes on white have no texture for LPIPS or a GAN to sharpen, and LPIPS would need a pretrained VGG (a
download). L1 rather than MSE: LDM's choice, and it blurs edges less (the median, not the mean, of plausible
pixels). As in LDM the terms are sums over each picture's values, averaged over the batch; the log also shows the
per-pixel L1 and the PSNR.

code            paper / LDM
image           x ∈ [-1, 1], (b, 3, 64, 64)
posterior       q(z | x) = N(μ, diag σ²) (DiagonalGaussian: .mean μ, .logvar log σ², .std σ)
vae_latents     z ~ q(z | x), (b, 4, 8, 8)
recon           x̂ = D(z)
kl_weight       λ_KL (kl-f8 config `kl_weight: 0.000001`)
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from minisd.errors import MinisdError
from minisd.train import shapes
from minisd.train.common import (
    LossLog,
    build,
    check_positive,
    config_to_json,
    linear_warmup,
    make_run_dir,
    read_resume_state,
    read_safetensors,
    resuming,
    save_checkpoint,
)
from minisd.vae import VAE, VAEConfig
from weights_convert.configs import check_config, fields_from

# The size study in minisd/train/__init__.py: 1.03 M parameters, decode 64×64 in ~12 ms on one CPU thread.
NANO_VAE = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16)


@dataclass
class VAETrainingConfig:
    """Everything that fixes a VAE training run (with the seed, the run is reproducible bit for bit)."""

    vae: VAEConfig = field(default_factory=lambda: NANO_VAE)
    steps: int = 1250  # the shipped run: held-out PSNR 32.1 dB (2,000 steps gave 33.4 dB, 12 min more)
    batch_size: int = 16
    lr: float = 5e-4  # AdamW; constant after the warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0  # the VAE has no dropout and few parameters; LDM's Adam has no decay
    kl_weight: float = 1e-6  # λ_KL, LDM kl-f8
    num_pictures: int = 20_000  # training pictures, drawn once from shapes.dataset(seed=seed)
    eval_pictures: int = 256  # held-out pictures for the final PSNR
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10

    def check(self) -> None:
        """Refuse settings that cannot train, before any work is done: one line naming the setting."""
        check_positive(self, "steps", "batch_size", "lr", "num_pictures", "checkpoint_every")


class VAERun(NamedTuple):
    """What train_vae returns: the file written (vae.safetensors, or checkpoint.safetensors when stopped early) and the
    trained VAE."""

    path: Path
    vae: VAE


def kl_divergence(posterior) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over each picture's latent values: ½ Σ (μ² + σ² − 1 − log σ²) (Kingma &
    Welling 2014, appendix B; CompVis DiagonalGaussianDistribution.kl). Returns (b,).

    >>> from minisd.vae import DiagonalGaussian
    >>> kl_divergence(DiagonalGaussian(torch.zeros(1, 2, 1, 1))).item()  # μ = 0, σ = 1: q is the prior
    0.0
    """
    mean, logvar = posterior.mean, posterior.logvar
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def psnr(image: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2): 10 · log10(2² / MSE). Returns ().

    >>> round(psnr(torch.zeros(4), torch.full((4,), 0.02)).item(), 2)
    40.0
    """
    return 10.0 * torch.log10(4.0 / (image - target).square().mean())


def vae_loss(vae: VAE, image: Tensor, generator: torch.Generator, kl_weight: float) -> tuple[Tensor, dict[str, float]]:
    """The training objective on one batch: L = Σ|x − x̂| + λ_KL · KL, per picture, batch mean.

    image: (b, 3, H, W) in [-1, 1]. Returns the loss and what to log (floats).
    """
    posterior = vae.encode(image)
    vae_latents = posterior.sample(generator)  # z = μ + σ·ε, the reparameterisation trick
    recon = vae.decode(vae_latents)
    rec = (recon - image).abs().sum(dim=(1, 2, 3)).mean()
    kl = kl_divergence(posterior).mean()
    loss = rec + kl_weight * kl
    metrics = {
        "loss": loss.item(),
        "l1": rec.item() / image[0].numel(),
        "kl": kl.item(),
        "psnr": psnr(recon.detach(), image).item(),
    }
    return loss, metrics


@torch.no_grad()
def evaluate_vae(vae: VAE, pixels: Tensor, batch_size: int = 64) -> float:
    """PSNR (dB) of x̂ = D(μ) over `pixels` (n, 3, H, W) uint8: the deterministic reconstruction, as used when
    encoding images for img2img."""
    device = vae.post_quant_conv.weight.device
    total, count = 0.0, 0
    for batch in pixels.split(batch_size):
        image = shapes.to_image(batch).to(device)
        recon = vae.decode(vae.encode(image).mean)
        total += (recon - image).square().sum().item()
        count += image.numel()
    return 10.0 * math.log10(4.0 / (total / count))


def train_vae(
    run_dir: str | os.PathLike,
    config: VAETrainingConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_at: int | None = None,
) -> VAERun:
    """Train (or resume, if run_dir holds a checkpoint) and write run_dir/vae.safetensors.

    run_dir gets: checkpoint.safetensors (resumable state, every checkpoint_every steps and at the end),
    log.jsonl (the loss curve), vae.safetensors (the weights, float32, config in the metadata). stop_at: stop
    (with a checkpoint) before that step, as if killed; for tests of resuming.
    """
    config.check()
    run_dir = make_run_dir(run_dir)
    checkpoint_path = run_dir / "checkpoint.safetensors"
    state = read_resume_state(checkpoint_path, run_dir / "log.jsonl")  # checked before any work
    if state is not None:
        with resuming(checkpoint_path):
            if json.loads(state["config"])["vae"] != json.loads(config_to_json(config.vae)):
                raise MinisdError(f"{checkpoint_path} holds another VAE config; use a new run_dir")
    device = torch.device(device)

    generator = torch.Generator().manual_seed(config.seed)  # every random draw of this run comes from here
    vae = build(VAE, config.vae, generator).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step = 0
    if state is not None:
        with resuming(checkpoint_path):
            vae.load_state_dict(state["vae"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            step = state["step"]
    pixels, _ = shapes.dataset(config.num_pictures, seed=config.seed)  # (n, 3, 64, 64) uint8

    def checkpoint() -> None:
        state = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
        save_checkpoint(checkpoint_path, {**state, "step": step, "config": config_to_json(config)})

    log = LossLog(run_dir / "log.jsonl", resume_step=step)
    bar = tqdm(total=config.steps, initial=step, desc="vae", disable=not progress)
    while step < config.steps:
        if step == stop_at:
            checkpoint()
            return VAERun(checkpoint_path, vae)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * linear_warmup(step, config.warmup_steps)
        index = torch.randint(len(pixels), (config.batch_size,), generator=generator)
        image = shapes.to_image(pixels[index]).to(device)  # (b, 3, 64, 64) in [-1, 1]
        loss, metrics = vae_loss(vae, image, generator, config.kl_weight)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"the loss is {metrics['loss']} at step {step}; try a lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % config.log_every == 0 or step == config.steps:
            log.write(step, **metrics)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
        bar.update()
        bar.set_postfix(l1=metrics["l1"], psnr=metrics["psnr"], refresh=False)
    bar.close()

    vae.eval()
    heldout, _ = shapes.dataset(config.eval_pictures, seed=config.seed + 1, split="heldout")
    heldout_psnr = evaluate_vae(vae, heldout)
    out = run_dir / "vae.safetensors"
    metadata = {"minisd.vae_config": config_to_json(config.vae), "minisd.heldout_psnr": f"{heldout_psnr:.2f}"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out), metadata)
    return VAERun(out, vae)


def load_vae(path: str | os.PathLike) -> VAE:
    """Read a vae.safetensors written by train_vae: the VAE (CPU, float32, eval mode) of the config it names."""
    state_dict, metadata = read_safetensors(path)
    if "minisd.vae_config" not in metadata:
        raise MinisdError(f"{path}: not a minisd VAE training output (no minisd.vae_config metadata)")
    with resuming(Path(path)):  # one line for metadata or weights that do not fit
        fields = json.loads(metadata["minisd.vae_config"])
        try:
            if not isinstance(fields, dict):
                raise MinisdError("its minisd.vae_config metadata is not a config")
            config = fields_from(VAEConfig, fields)
            check_config("vae", config, state_dict)  # the sizes the weights show, before anything is built
        except MinisdError as error:
            raise MinisdError(f"{path}: {error}") from None
        with torch.device("meta"):
            vae = VAE(config)
        vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.eval()
