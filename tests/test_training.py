"""Training: a few steps on tiny configs. Overfitting a fixed batch, bit-identical resume, the exported file
loading through minisd.loading, the EMA formula, the latent-scale fold.

The tiny configs keep SD v1's head counts and GroupNorm groups (8 UNet heads, 12 CLIP heads, 32 groups): a
single file carries no config and the loader reads only sizes off the tensor shapes
(weights_convert.configs.configs_from_shapes).
"""

import json

import pytest
import safetensors
import torch
from torch import nn

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.errors import MinisdError
from minisd.loading import load_components
from minisd.samplers.schedule import alphas_cumprod_from_betas, scaled_linear_betas
from minisd.tokenizer import Tokenizer
from minisd.train import shapes
from minisd.train.common import EMA, LossLog, build, load_checkpoint, read_log
from minisd.train.diffusion_training import (
    NANO_TEXT_ENCODER,
    NANO_UNET,
    Denoiser,
    DiffusionTrainingConfig,
    diffusion_loss,
    draw_batch,
    fold_latent_scale,
    train_diffusion,
)
from minisd.train.text_pretraining import TextPretrainingConfig
from minisd.train.vae_training import NANO_VAE, VAETrainingConfig, kl_divergence, load_vae, train_vae, vae_loss
from minisd.unet import UNet, UNetConfig
from minisd.vae import LATENT_SCALE, VAE, VAEConfig

TINY_VAE = VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)  # 64×64 -> 8×8, as the nano VAE
TINY_UNET = UNetConfig(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=24)
TINY_TEXT_ENCODER = TextEncoderConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1)


def tiny_vae_config(**changes) -> VAETrainingConfig:
    values = {"vae": TINY_VAE, "steps": 3, "batch_size": 2, "num_pictures": 16, "log_every": 1, "warmup_steps": 2}
    values["eval_pictures"] = 2
    return VAETrainingConfig(**{**values, **changes})


def tiny_diffusion_config(**changes) -> DiffusionTrainingConfig:
    values = {
        "unet": TINY_UNET,
        "text_encoder": TINY_TEXT_ENCODER,
        "steps": 4,
        "batch_size": 4,
        "num_pictures": 16,
        "log_every": 1,
        "warmup_steps": 2,
        "lr": 1e-3,
        "text_pretraining": TextPretrainingConfig(steps=3, batch_size=8, warmup_steps=1),
    }
    return DiffusionTrainingConfig(**{**values, **changes})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: bit-reproducible runs, and 3-7× faster than two on the shared, loaded 2-core CI machine
    (measured: tiny VAE 3 steps 11 s vs 33 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    """A tiny VAE trained for 3 steps: enough to have a vae.safetensors for the diffusion stage."""
    return train_vae(tmp_path_factory.mktemp("vae"), tiny_vae_config(), progress=False).path


def test_nano_configs_fit_the_budget():
    """The shipped model's sizes: <= 25 MB of fp16 weights (the size study in minisd/train/__init__.py)."""
    with torch.device("meta"):  # sizes only, no memory
        counts = [
            sum(p.numel() for p in cls(config).parameters())
            for cls, config in ((UNet, NANO_UNET), (TextEncoder, NANO_TEXT_ENCODER), (VAE, NANO_VAE))
        ]
    assert 2 * sum(counts) <= 25e6, counts


def test_init_is_fixed_by_the_generator():
    a = build(UNet, TINY_UNET, torch.Generator().manual_seed(1)).state_dict()
    b = build(UNet, TINY_UNET, torch.Generator().manual_seed(1)).state_dict()
    c = build(UNet, TINY_UNET, torch.Generator().manual_seed(2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])


def test_ema_update_formula():
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)), n counted from 1 (LDM LitEma)."""
    module = nn.Linear(3, 2)
    ema = EMA(module, decay=0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    d = 2 / 11  # n = 1: the warm-up term (1 + 1) / (10 + 1) < 0.9
    torch.testing.assert_close(ema.shadow["weight"], d * before + (1 - d) * module.weight, rtol=0, atol=1e-6)
    assert ema.decay_at(1000) == 0.9  # capped by `decay` once (1 + n)/(10 + n) exceeds it (n >= 80)
    assert ema.decay_at(79) < 0.9 == ema.decay_at(80)


def test_kl_divergence_matches_torch_distributions():
    moments = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    from minisd.vae import DiagonalGaussian

    posterior = DiagonalGaussian(moments)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl_divergence(posterior), expected, rtol=1e-5, atol=1e-5)  # float32 rounding


def test_vae_overfits_a_fixed_batch():
    generator = torch.Generator().manual_seed(0)
    vae = build(VAE, TINY_VAE, generator)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    image = shapes.to_image(shapes.dataset(2, seed=0)[0])
    losses = []
    for _ in range(15):
        loss, metrics = vae_loss(vae, image, torch.Generator().manual_seed(0), kl_weight=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["l1"])
    assert losses[-1] < 0.6 * losses[0], losses


def test_diffusion_overfits_a_fixed_batch():
    """Same x0, t, ε and prompt every step: L_simple must fall well below its start (~1 at random init)."""
    generator = torch.Generator().manual_seed(0)
    denoiser = Denoiser(build(UNet, TINY_UNET, generator), build(TextEncoder, TINY_TEXT_ENCODER, generator))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=2e-3)
    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas())
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 300, 600, 900])
    input_ids = Tokenizer.from_default()(["a red circle", "a blue square", "", "a green triangle"])
    losses = []
    for _ in range(25):
        loss = diffusion_loss(denoiser, x0, input_ids, t, noise, alphas_cumprod)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_draw_batch_drops_captions_for_cfg():
    """p_uncond = 0.1 of the prompts become the empty prompt; t covers U{0..999}."""
    n = 4000
    caption_ids = Tokenizer.from_default()(["a red circle"])
    empty_ids = Tokenizer.from_default()("")
    mean, std = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    generator = torch.Generator().manual_seed(0)
    x0, input_ids, t, noise = draw_batch(generator, mean, std, caption_ids, empty_ids, 0.5, n, 0.1)
    assert abs(noise.std().item() - 1.0) < 0.02  # ε ~ N(0, I); 64,000 values
    dropped = (input_ids == empty_ids).all(dim=1).float().mean().item()
    assert abs(dropped - 0.1) < 0.02  # binomial std √(0.09/4000) ≈ 0.005: 4 σ
    assert t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 900
    assert abs(x0.std().item() - 0.5) < 0.02  # x0 = scale · z with z ~ N(0, 1): std = scale


def test_draw_batch_picks_one_of_each_pictures_phrasings():
    """With k phrasings a picture (n, k, 77), a draw takes one of that picture's, each about equally often; the
    draws before it (pictures, z, t, ε, dropout) are those of the (n, 77) case."""
    tokenizer = Tokenizer.from_default()
    options = [shapes.phrasings("a red circle")[:3], shapes.phrasings("a blue square above a red circle")[:3]]
    caption_ids = torch.stack([tokenizer(texts) for texts in options])  # (2, 3, 77)
    empty_ids = tokenizer("")
    mean, std = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    x0, input_ids, t, noise = draw_batch(
        torch.Generator().manual_seed(0), mean, std, caption_ids, empty_ids, 1, 3000, 0
    )
    x0_, _, t_, noise_ = draw_batch(
        torch.Generator().manual_seed(0), mean, std, caption_ids[:, 0], empty_ids, 1, 3000, 0
    )
    assert torch.equal(x0, x0_) and torch.equal(t, t_) and torch.equal(noise, noise_)
    texts = [tokenizer.decode(ids) for ids in input_ids]
    for picture in range(2):
        counts = [texts.count(tokenizer.decode(ids)) for ids in caption_ids[picture]]
        assert all(abs(c - 500) < 100 for c in counts), counts  # 3000 draws, 6 options: 500 ± 22 (σ)


def test_fold_latent_scale_keeps_the_autoencoder():
    """After folding, LATENT_SCALE · z' = scale · z and decode(z') = decode(z): the same function in SD v1's scale."""
    vae = build(VAE, TINY_VAE, torch.Generator().manual_seed(0)).eval()
    scale = 0.9
    folded = build(VAE, TINY_VAE, torch.Generator().manual_seed(1)).eval()
    folded.load_state_dict(fold_latent_scale(vae.state_dict(), scale))
    image = shapes.to_image(shapes.dataset(2, seed=0)[0])
    with torch.no_grad():
        posterior, posterior_folded = vae.encode(image), folded.encode(image)
        # one extra float32 multiply per value: relative rounding ~1e-7, bar 1e-5
        torch.testing.assert_close(LATENT_SCALE * posterior_folded.mean, scale * posterior.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(LATENT_SCALE * posterior_folded.std, scale * posterior.std, rtol=1e-5, atol=1e-6)
        # the ~1e-7 relative latent rounding passes ~10 conv/GroupNorm layers of the decoder: bar 1e-4
        torch.testing.assert_close(
            folded.decode(posterior_folded.mean), vae.decode(posterior.mean), rtol=1e-4, atol=1e-4
        )


def test_vae_resume_is_bit_identical(tmp_path):
    whole = train_vae(tmp_path / "whole", tiny_vae_config(), progress=False)
    stopped = train_vae(tmp_path / "resumed", tiny_vae_config(), progress=False, stop_at=1)
    assert stopped.path.name == "checkpoint.safetensors"
    resumed = train_vae(tmp_path / "resumed", tiny_vae_config(), progress=False)
    for name, tensor in whole.vae.state_dict().items():
        assert torch.equal(tensor, resumed.vae.state_dict()[name]), name
    assert read_log(tmp_path / "whole" / "log.jsonl") == read_log(tmp_path / "resumed" / "log.jsonl")
    assert torch.equal(load_vae(whole.path).decoder.conv_out.weight, whole.vae.decoder.conv_out.weight)


def test_diffusion_resume_is_bit_identical(tmp_path, vae_path):
    """Stop after 2 of 4 steps, resume from checkpoint.safetensors: weights, AdamW moments, EMA and log equal the
    uninterrupted run's bit for bit (same generator state, same data, same order of operations)."""
    train_diffusion(tmp_path / "whole", vae_path, tiny_diffusion_config(), progress=False)
    train_diffusion(tmp_path / "resumed", vae_path, tiny_diffusion_config(), progress=False, stop_at=2)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")["step"] == 2
    train_diffusion(tmp_path / "resumed", vae_path, tiny_diffusion_config(), progress=False)
    whole, resumed = (load_checkpoint(tmp_path / run / "checkpoint.safetensors") for run in ("whole", "resumed"))
    assert whole["step"] == resumed["step"] == 4
    for name in whole["denoiser"]:
        assert torch.equal(whole["denoiser"][name], resumed["denoiser"][name]), name
        assert torch.equal(whole["ema"]["shadow"][name], resumed["ema"]["shadow"][name]), name
    for i, state in whole["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed["optimizer"]["state"][i]["exp_avg_sq"]), i
    assert torch.equal(whole["generator"], resumed["generator"])
    assert read_log(tmp_path / "whole" / "log.jsonl") == read_log(tmp_path / "resumed" / "log.jsonl")


def test_the_pretrained_text_encoder_stays_frozen(tmp_path, vae_path):
    """Stage 2a writes text_encoder.safetensors; the diffusion steps leave it as it is (SD v1 froze CLIP), and
    it is not the fresh initialisation (the contrastive steps moved it)."""
    run = train_diffusion(tmp_path, vae_path, tiny_diffusion_config(), progress=False)
    pretrained = load_checkpoint(tmp_path / "text_encoder.safetensors")["text_encoder"]
    fresh = build(TextEncoder, TINY_TEXT_ENCODER, torch.Generator().manual_seed(0)).state_dict()
    trained = run.denoiser.text_encoder.state_dict()
    assert all(torch.equal(trained[name], tensor) for name, tensor in pretrained.items())
    assert not all(torch.equal(fresh[name], tensor) for name, tensor in pretrained.items())
    assert all(torch.equal(run.ema.shadow["text_encoder." + name], t) for name, t in pretrained.items())


def test_joint_text_encoder_training_and_a_frozen_random_one(tmp_path, vae_path):
    """freeze_text_encoder=False with no pretraining: LDM's joint training, the encoder moves. Frozen with no
    pretraining would condition on noise: refused before any work."""
    config = tiny_diffusion_config(freeze_text_encoder=False, text_pretraining=TextPretrainingConfig(steps=0))
    run = train_diffusion(tmp_path / "joint", vae_path, config, progress=False)
    fresh = build(TextEncoder, TINY_TEXT_ENCODER, torch.Generator().manual_seed(0))
    assert not (tmp_path / "joint" / "text_encoder.safetensors").exists()
    assert not torch.equal(run.denoiser.text_encoder.final_layer_norm.weight, fresh.final_layer_norm.weight)
    config = tiny_diffusion_config(text_pretraining=TextPretrainingConfig(steps=0))
    with pytest.raises(MinisdError, match=r"freeze_text_encoder needs text_pretraining\.steps"):
        train_diffusion(tmp_path / "frozen", vae_path, config, progress=False)


def test_a_text_encoder_pretrained_with_other_settings_is_refused(tmp_path, vae_path):
    train_diffusion(tmp_path, vae_path, tiny_diffusion_config(), progress=False)
    (tmp_path / "checkpoint.safetensors").unlink()  # a fresh start in the same run_dir
    config = tiny_diffusion_config(text_pretraining=TextPretrainingConfig(steps=4, batch_size=8, warmup_steps=1))
    with pytest.raises(MinisdError, match="other latents or settings"):
        train_diffusion(tmp_path, vae_path, config, progress=False)


def test_resume_refuses_another_network(tmp_path, vae_path):
    train_diffusion(tmp_path, vae_path, tiny_diffusion_config(), progress=False, stop_at=1)
    other = UNetConfig(**{**TINY_UNET.__dict__, "norm_num_groups": 8})  # same shapes, another network
    with pytest.raises(MinisdError, match="another unet config"):
        train_diffusion(tmp_path, vae_path, tiny_diffusion_config(unet=other), progress=False)
    with pytest.raises(MinisdError, match="another VAE or data set"):
        train_diffusion(tmp_path, vae_path, tiny_diffusion_config(num_pictures=8), progress=False)


def test_exported_file_loads_through_load_components(tmp_path, vae_path):
    config = tiny_diffusion_config(steps=2)
    run = train_diffusion(tmp_path, vae_path, config, progress=False)
    components = load_components(run.path)
    assert components.info.layout == "minisd"
    assert components.unet.config == TINY_UNET
    assert components.text_encoder.config == TINY_TEXT_ENCODER
    assert components.vae.config == TINY_VAE
    # the file holds the EMA weights, stored in fp16
    for name, tensor in components.unet.state_dict().items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, run.ema.shadow["unet." + name].half()), name
    for name, tensor in components.text_encoder.state_dict().items():
        assert torch.equal(tensor, run.ema.shadow["text_encoder." + name].half()), name
    with safetensors.safe_open(str(run.path), framework="pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["minisd.config"])["unet"]["block_out_channels"] == list(TINY_UNET.block_out_channels)
    scale = float(metadata["minisd.trained_latent_scale"])
    # the folded VAE: LATENT_SCALE · μ' = scale · μ of the trained VAE (fp16 weights: relative error ~1e-3)
    image = shapes.to_image(shapes.dataset(2, seed=5)[0])
    with torch.no_grad():
        mean = load_vae(vae_path).encode(image).mean
        mean_folded = components.vae.float().encode(image).mean
    torch.testing.assert_close(
        LATENT_SCALE * mean_folded, scale * mean, rtol=2e-2, atol=2e-2 * mean.abs().max() * scale
    )


def test_v_prediction_training_target_and_file(tmp_path, vae_path):
    """--prediction-type v: the loss's target is diffusers' get_velocity of the same x0, noise and t (diffusers'
    train_text_to_image.py for v_prediction), and the file says what it predicts, so loading and sampling use v."""
    from diffusers import DDPMScheduler

    from minisd.samplers.schedule import velocity

    alphas_cumprod = alphas_cumprod_from_betas(scaled_linear_betas())
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    want = reference.get_velocity(x0, noise, t)
    # diffusers keeps ᾱ in float32, minisd in float64 and casts once: ~1e-7 relative apart
    torch.testing.assert_close(velocity(x0, noise, t, alphas_cumprod), want, rtol=1e-5, atol=1e-6)

    class Constant(torch.nn.Module):  # a "model" that always says v = 0: the loss is then ‖v‖²'s mean
        def forward(self, x_t, t, input_ids):
            return torch.zeros_like(x_t)

    loss = diffusion_loss(Constant(), x0, None, t, noise, alphas_cumprod, "v_prediction")
    torch.testing.assert_close(loss, want.square().mean(), rtol=1e-5, atol=0)
    assert not torch.isclose(loss, noise.square().mean())  # not ε's target
    config = tiny_diffusion_config(steps=2, prediction_type="v_prediction")
    run = train_diffusion(tmp_path, vae_path, config, progress=False)
    components = load_components(run.path)
    assert components.prediction_type == "v_prediction" and components.note is None
    with pytest.raises(MinisdError, match="prediction_type must be one of epsilon, v_prediction"):
        tiny_diffusion_config(prediction_type="v").check()


def test_loss_log_resume_drops_later_lines(tmp_path):
    log = LossLog(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        log.write(step, loss=float(step))
    LossLog(tmp_path / "log.jsonl", resume_step=2).write(3, loss=9.0)
    assert [r["loss"] for r in read_log(tmp_path / "log.jsonl")] == [1.0, 2.0, 9.0]


def test_exported_file_records_its_picture_size(tmp_path, vae_path):
    run = train_diffusion(tmp_path, vae_path, tiny_diffusion_config(steps=1), progress=False)
    assert load_components(run.path).sample_size == shapes.SIZE  # 64: the API's and CLI's default size for it
    from minisd.api import StableDiffusion

    pipe = StableDiffusion.from_pretrained(run.path)
    assert pipe.dtype == torch.float32  # a float16 file computes in float32 on the CPU
    output = pipe("a red circle", num_inference_steps=1, seed=0)
    assert output.images[0].size == (shapes.SIZE, shapes.SIZE)


def test_adherence_counts_what_the_checker_accepts(monkeypatch):
    from minisd.train import evaluate

    captions = shapes.heldout_captions()[:6]
    swapped = {c: c.replace("red", "@").replace("blue", "red").replace("@", "blue") for c in captions}

    def rendered(components, captions, seed, wrong=False, **sampling):
        return torch.stack([shapes.render(swapped[c] if wrong else c, seed + i) for i, c in enumerate(captions)]) / 255

    monkeypatch.setattr(evaluate, "generate", rendered)
    result = evaluate.adherence(None, captions, seeds=2)
    assert (result.accepted, result.total, result.failures) == (12, 12, {})
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: rendered(*a, wrong=True, **k))
    result = evaluate.adherence(None, captions, seeds=1)
    changed = sum(swapped[c] != c for c in captions)
    assert changed >= 3 and result.accepted == 6 - changed and sum(result.failures.values()) == changed


def test_evaluate_command_writes_numbers_and_a_grid(tmp_path, vae_path, capsys):
    from PIL import Image

    from minisd.train.__main__ import main

    run = train_diffusion(tmp_path, vae_path, tiny_diffusion_config(steps=1), progress=False)
    grid = tmp_path / "grid.png"
    assert main(["evaluate", "--model", str(run.path), "--seeds", "1", "--steps", "2", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "held-out captions: 0/56 = 0.0% adherence" in out  # an untrained model draws no shapes
    assert "VAE reconstruction PSNR" in out
    assert Image.open(grid).size == (4 * (3 * 64 + 16), 3 * (3 * 64 + 30 + 8))


def test_choose_guidance_picks_the_best_on_training_captions_and_records_it(monkeypatch, tmp_path, vae_path):
    from minisd.train import evaluate

    seen = []

    def fake_adherence(components, captions, seeds, guidance_scale):
        seen.append(captions)
        rate = {1.5: 0.2, 2.0: 0.6, 3.0: 0.6, 5.0: 0.4, 7.5: 0.1}[guidance_scale]  # a tie: the smaller wins
        return evaluate.Adherence(round(rate * 10), 10, {}, 0.0)

    monkeypatch.setattr(evaluate, "adherence", fake_adherence)
    best, rates = evaluate.choose_guidance(None)
    assert best == 2.0 and rates[7.5] == 0.1
    assert all(not shapes.is_heldout(c) for captions in seen for c in captions)  # never the held-out captions
    run = train_diffusion(tmp_path, vae_path, tiny_diffusion_config(steps=1), progress=False)
    before = load_components(run.path)
    evaluate.record_guidance(run.path, best)
    after = load_components(run.path)
    assert (before.guidance_scale, after.guidance_scale) == (7.5, 2.0)
    same = zip(before.unet.state_dict().values(), after.unet.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in same)


def test_train_command_refuses_bad_settings_in_one_line(tmp_path, vae_path, capsys):
    """Every bad setting or file: one line on stderr, exit status 2, before any stage starts (nothing written)."""
    from minisd.api import default_model
    from minisd.train.__main__ import main

    (tmp_path / "done.safetensors").write_bytes(b"a finished model")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    run, out = str(tmp_path / "run"), str(tmp_path / "new.safetensors")
    invalid = "not a valid safetensors file"
    cases = {
        "vae lr": (["vae", "--run-dir", run, "--lr", "-1"], "lr must be > 0"),
        "vae pictures": (["vae", "--run-dir", run, "--num-pictures", "0"], "num_pictures must be > 0"),
        "checkpoint every": (["vae", "--run-dir", run, "--checkpoint-every", "0"], "checkpoint_every must be > 0"),
        "missing vae": (["diffusion", "--run-dir", run, "--vae", str(tmp_path / "no.safetensors")], "no such file"),
        "corrupt vae": (["diffusion", "--run-dir", run, "--vae", str(tmp_path / "junk.safetensors")], invalid),
        "text as vae": (["diffusion", "--run-dir", run, "--vae", str(tmp_path / "done.safetensors")], invalid),
        "model as vae": (["diffusion", "--run-dir", run, "--vae", str(default_model())], "not a minisd VAE"),
        "batch size": (["diffusion", "--run-dir", run, "--vae", str(vae_path), "--batch-size", "0"], "batch_size"),
        "frozen random": (["diffusion", "--run-dir", run, "--vae", str(vae_path), "--text-steps", "0"], "frozen"),
        "all, diffusion lr": (["all", "--run-dir", run, "--out", out, "--lr", "0"], "lr must be > 0"),
        "all, out exists": (["all", "--run-dir", run, "--out", str(tmp_path / "done.safetensors")], "--overwrite"),
        "all, out folder": (["all", "--run-dir", run, "--out", str(tmp_path / "no" / "m.safetensors")], "--out must"),
        "evaluate junk": (["evaluate", "--model", str(tmp_path / "junk.safetensors"), "--seeds", "1"], "junk"),
    }
    for name, (argv, expected) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "run").exists()  # refused before a run directory was made
    assert (tmp_path / "done.safetensors").read_bytes() == b"a finished model"  # never overwritten


def test_train_command_passes_the_text_encoder_options(monkeypatch, tmp_path, vae_path):
    """--text-steps and --train-text-encoder reach the config train_diffusion gets (the nano recipe otherwise)."""
    from minisd.train import __main__ as command

    seen = []

    def fake_train(run_dir, vae, config, device, distributed):
        seen.append(config)
        raise MinisdError("stop here")

    monkeypatch.setattr(command, "train_diffusion", fake_train)
    base = ["diffusion", "--run-dir", str(tmp_path / "run"), "--vae", str(vae_path)]
    extras = ([], ["--train-text-encoder"], ["--train-text-encoder", "--text-steps", "0"], ["--prediction-type", "v"])
    for extra in extras:
        assert command.main([*base, *extra]) == 2
    frozen, joint, scratch, v = seen
    assert frozen == DiffusionTrainingConfig()  # the shipped recipe: pretrained, then frozen
    assert v == DiffusionTrainingConfig(prediction_type="v_prediction")  # the same recipe, learning v
    assert not joint.freeze_text_encoder and joint.text_pretraining.steps == frozen.text_pretraining.steps
    assert not scratch.freeze_text_encoder and scratch.text_pretraining.steps == 0
