"""DistributedDataParallel: the same training on 2 CPU processes (gloo), each rank its half of the global batch.

Both ranks must end with bit-identical weights (DDP all-reduces the gradients, so every rank applies the same
update), and equal to one process training on the whole global batch, up to float32 summation order: the mean
over 8 samples becomes two means over 4, averaged by the all-reduce.
"""

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minisd.loading import load_components
from minisd.train.common import Distributed, init_distributed, read_log
from minisd.train.diffusion_training import train_diffusion
from minisd.train.vae_training import train_vae
from minisd.unet import UNetConfig
from tests.test_training import TINY_UNET, tiny_diffusion_config, tiny_vae_config

WORLD_SIZE = 2
# 8 GroupNorm groups of 4 channels: with test_training's 32 groups of 1 channel every per-channel bias in front
# of a GroupNorm has an exactly zero gradient, so its update is AdamW's normalised rounding noise (±lr).
DDP_UNET = UNetConfig(**{**TINY_UNET.__dict__, "norm_num_groups": 8})


def ddp_config():
    return tiny_diffusion_config(unet=DDP_UNET, batch_size=8, steps=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, run_dir: str, vae_path: str) -> None:
    """One DDP process, as torchrun would start it (the environment variables init_distributed reads)."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    distributed = init_distributed()
    assert distributed == Distributed(rank=rank, world_size=WORLD_SIZE, local_rank=rank)
    run = train_diffusion(run_dir, vae_path, ddp_config(), distributed=distributed)
    torch.save(run.denoiser.state_dict(), os.path.join(run_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_equals_single_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae_path = train_vae(tmp_path / "vae", tiny_vae_config(steps=1), progress=False).path
        single = train_diffusion(tmp_path / "single", vae_path, ddp_config(), progress=False)
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    mp.spawn(_rank_main, args=(_free_port(), str(run_dir), str(vae_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    expected = single.denoiser.state_dict()
    config = ddp_config()
    differences = []
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # the same all-reduced update on every rank
        difference = (tensor - expected[name]).abs().flatten()
        # AdamW moves each weight by at most ~lr a step whatever its gradient, so no weight can drift further than
        # 2·lr·steps from the single process's. Where a gradient is ~0 in exact arithmetic (the key bias:
        # softmax(q·(k + b)) = softmax(q·k + q·b) shifts every score of a query equally), AdamW normalises
        # float32 rounding noise and the bound is reached.
        assert difference.max() <= 2 * config.lr * config.steps, name
        if not name.endswith("self_attn.k_proj.bias"):
            differences.append(difference)
    differences = torch.cat(differences)
    # Elsewhere the gradients differ only in float32 summation order (one mean over 8 samples vs the all-reduced
    # average of two means over 4: ~1e-7 relative; oneDNN picks other kernels for batch 4 and 8 on some CPUs).
    # After 3 AdamW steps at lr 1e-3 that moves weights by ~1e-8 typically (measured: 99.9% of 1.55 M weights
    # within 2.3e-8), and by up to ~1e-5 for the handful whose gradient is itself near rounding noise (measured:
    # 3 weights above 2e-6 on an AMX Xeon, none on others). Bars: the 99.9th percentile under 2e-7, and at most
    # 1 weight in 10,000 above 2e-6 — 1/1500 of the 3e-3 a weight moves in 3 steps.
    assert differences.quantile(0.999) < 2e-7, differences.quantile(0.999)
    assert (differences > 2e-6).sum() <= differences.numel() // 10_000, (differences > 2e-6).sum()
    assert (run_dir / "model.safetensors").exists()
    # rank 0 logs the all-reduced loss of the global batch: the single process's loss, up to summation order
    logged = [(r["step"], r["loss"]) for r in read_log(run_dir / "log.jsonl")]
    expected_log = [(r["step"], r["loss"]) for r in read_log(tmp_path / "single" / "log.jsonl")]
    assert [s for s, _ in logged] == [s for s, _ in expected_log]
    for (_, loss), (_, expected_loss) in zip(logged, expected_log, strict=True):
        assert abs(loss - expected_loss) <= 1e-5 * expected_loss  # float32 sums of 256-value means: ~1e-7


def test_torchrun_all_trains_the_vae_on_rank_0_then_diffusion_on_both(tmp_path):
    """The one command for 2 cores: `torchrun --nproc_per_node=2 -m minisd.train all` (here with tiny step counts
    and the nano sizes): rank 0 trains the VAE while rank 1 waits, then both train the diffusion stage."""
    out = tmp_path / "model.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    command += ["-m", "minisd.train", "all", "--run-dir", str(tmp_path / "run"), "--out", str(out)]
    command += ["--vae-steps", "2", "--vae-batch-size", "2", "--vae-num-pictures", "8"]
    command += ["--steps", "2", "--batch-size", "4", "--num-pictures", "8", "--guidance-seeds", "0"]
    command += ["--text-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("vae: ") == 1 and f"model: {out}" in result.stdout  # one voice: rank 0
    assert [r["step"] for r in read_log(tmp_path / "run" / "diffusion" / "log.jsonl")][-1] == 2
    assert (tmp_path / "run" / "diffusion" / "text_encoder.safetensors").is_file()  # pretrained on rank 0
    assert load_components(out).sample_size == 64
