"""What both training loops share: EMA of the weights, checkpoints (resume and export), the loss log, a progress
line, and the DistributedDataParallel set-up.

Nothing here seeds anything: randomness comes from the torch.Generator the caller passes, and a checkpoint stores
that generator's state so a resumed run draws exactly the numbers the uninterrupted run would have drawn.
"""

import datetime
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from minisd.errors import MinisdError
from weights_convert.detect import MINISD_METADATA, join_minisd_file
from weights_convert.files import read_state_dict

# ---------------------------------------------------------------------------------------------------------------
# Initialisation from an explicit generator


def build(module_class: type[nn.Module], config, generator: torch.Generator) -> nn.Module:
    """A freshly initialised network: built on the meta device (no memory, no draw from the global RNG), then
    given storage and initialised by `init_weights` from `generator`. On the CPU; move it after."""
    with torch.device("meta"):
        module = module_class(config)
    module = module.to_empty(device="cpu")
    init_weights(module, generator)
    return module


@torch.no_grad()
def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from `generator` instead of the global RNG:

    Linear, Conv2d      weight and bias ~ U(−1/√fan_in, 1/√fan_in)  (nn.Linear.reset_parameters: kaiming_uniform
                        with a = √5 has exactly this bound)
    GroupNorm, LayerNorm  weight 1, bias 0
    Embedding           N(0, 0.02²) (CLIP's initializer_range, transformers CLIPTextEmbeddings; PyTorch's N(0, 1)
                        is far too wide for a 64-wide token table)
    """
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            bound = 1.0 / math.sqrt(m.weight[0].numel())  # fan_in = in_channels · kernel area
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 2 * bound - bound)
        elif isinstance(m, nn.GroupNorm | nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.fill_(0.0)
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
    for name, p in module.named_parameters():
        assert not p.is_meta and p.isfinite().all(), f"{name} was not initialised"


# ---------------------------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a module's parameters (Polyak averaging), the weights SD v1 ships.

        θ_ema ← d · θ_ema + (1 − d) · θ,     d = min(decay, (1 + n) / (10 + n)),  n = updates so far (from 1)

    The warm-up term (1 + n) / (10 + n) is LDM's `LitEma` (CompVis ldm/modules/ema.py, after TensorFlow's
    ExponentialMovingAverage `num_updates`): early averages forget the random initialisation quickly. The shadow
    weights are float32 copies keyed by parameter name.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise MinisdError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    def decay_at(self, num_updates: int) -> float:
        """d for the num_updates-th update (counted from 1).

        >>> ema = EMA(nn.Linear(1, 1), decay=0.999)
        >>> ema.decay_at(1), ema.decay_at(10_000)
        (0.18181818181818182, 0.999)
        """
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards the module's current parameters (call after each optimizer step)."""
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # θ_ema + (1 − d)(θ − θ_ema)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise MinisdError("the EMA state's parameter names do not match the module's")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {name: t.float().clone() for name, t in state["shadow"].items()}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write a training checkpoint (state dicts of the modules and the optimizer, EMA, step, generator state,
    config JSON, ...) as safetensors: every tensor under its dotted path, everything else (numbers, strings,
    lists, the dicts' key types) as JSON in the metadata. No pickle. Written atomically: to a temporary name,
    then renamed, so a kill mid-write keeps the previous checkpoint."""
    tensors: dict[str, Tensor] = {}
    tree = _to_json_tree(state, "", tensors)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata={"minisd.checkpoint": json.dumps(tree)})
    os.replace(tmp, path)


def check_positive(config, *names: str) -> None:
    """Refuse a training config whose named fields are not > 0 (steps, batch_size, lr, ...), naming the first."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise MinisdError(f"{name} must be > 0, got {value}")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A .safetensors file's tensors and metadata. The tensors come through weights_convert's read_state_dict,
    so a missing, empty, truncated or foreign file is its one-line MinisdError."""
    if Path(path).suffix != ".safetensors":
        raise MinisdError(f"{path}: not a .safetensors file")
    tensors = read_state_dict(path)
    with safetensors.safe_open(str(path), framework="pt") as file:
        return tensors, file.metadata() or {}


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before any work, a run directory that is a file, or that cannot be made because the nearest existing
    path on its way is a file."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise MinisdError(f"run directory {run_dir}: {existing} is a file, not a folder")


def make_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory, made if missing; a one-line MinisdError when it is a file or cannot be made."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MinisdError(f"cannot make the run directory {run_dir}: {error.strerror or error}") from None
    return run_dir


@contextmanager
def resuming(path: Path):
    """Around the code that restores a run (or a model) from the file at `path`: a file whose state does not fit
    (a missing entry, wrong shapes, another optimizer, a bad generator state, bad JSON) is a one-line MinisdError."""
    try:
        yield
    except MinisdError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        raise MinisdError(f"{path}: cannot use its state ({type(error).__name__}: {error})") from None


def read_resume_state(checkpoint_path: Path, log_path: Path) -> dict | None:
    """The state a run resumes from (None: a fresh run), read and checked before any work: a checkpoint with a
    step and a config, and a readable loss log."""
    if not checkpoint_path.exists():
        return None
    state = load_checkpoint(checkpoint_path)
    step, config = state.get("step"), state.get("config")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(config, str):
        raise MinisdError(f"{checkpoint_path}: not a resumable checkpoint (no step >= 0 or no config)")
    with resuming(checkpoint_path):
        json.loads(config)
    if log_path.exists():
        read_log(log_path)
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by save_checkpoint back into the same nested dict (tensors on the CPU).

    >>> import tempfile
    >>> state = {"step": 3, "opt": {"state": {0: {"m": torch.ones(2)}}, "betas": [0.9, 0.999]}, "name": "x"}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_checkpoint(f"{d}/c.safetensors", state)
    ...     back = load_checkpoint(f"{d}/c.safetensors")
    >>> back["step"], back["opt"]["state"][0]["m"].tolist(), back["opt"]["betas"], back["name"]
    (3, [1.0, 1.0], [0.9, 0.999], 'x')
    """
    tensors, metadata = read_safetensors(path)
    if "minisd.checkpoint" not in metadata:
        raise MinisdError(f"{path}: not a minisd training checkpoint (no minisd.checkpoint metadata)")
    try:
        state = _from_json_tree(json.loads(metadata["minisd.checkpoint"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise MinisdError(f"{path}: its minisd.checkpoint metadata is corrupt ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise MinisdError(f"{path}: its minisd.checkpoint metadata is corrupt (not a dict)")
    return state


def _to_json_tree(value, key: str, tensors: dict[str, Tensor]):
    """Nested dicts/lists/scalars with tensors -> JSON-able tree; tensors go to `tensors[key]`, the tree keeps
    {"tensor": key}. Dicts become {"items": [[key, value], ...]} so int keys (optimizer state) stay ints."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"items": [[k, _to_json_tree(v, f"{key}.{k}".lstrip("."), tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_to_json_tree(v, f"{key}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
    assert value is None or isinstance(value, bool | int | float | str), f"{key}: cannot store {type(value)}"
    return value


def _from_json_tree(tree, tensors: dict[str, Tensor]):
    if isinstance(tree, dict):
        if "tensor" in tree:
            return tensors[tree["tensor"]]
        return {k: _from_json_tree(v, tensors) for k, v in tree["items"]}
    if isinstance(tree, list):
        return [_from_json_tree(v, tensors) for v in tree]
    return tree


def config_to_json(config) -> str:
    """A (nested) dataclass config -> JSON text (tuples become lists)."""
    return json.dumps(asdict(config), sort_keys=True)


def save_minisd_file(
    path: str | os.PathLike,
    components: dict[str, dict[str, Tensor]],
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write minisd's single file (unet.* / vae.* / text_encoder.*, weights_convert.detect's layout) that
    `minisd.loading.load_components(path)` reads. Floats are cast to `dtype` (fp16 halves the file)."""
    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in join_minisd_file(components).items()
    }
    safetensors.torch.save_file(tensors, str(path), metadata={**MINISD_METADATA, **metadata})


# ---------------------------------------------------------------------------------------------------------------
# Loss log and progress


class LossLog:
    """The loss curve as JSON lines, one {"step": ..., "loss": ..., ...} per logged step, in `path`.

    Resuming at step k drops any lines past k (written after the checkpoint the run resumes from), so the log
    of a resumed run equals the uninterrupted one's.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [record for record in read_log(self.path) if record["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, step: int, **values: float) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": step, **values}) + "\n")


def read_log(path: str | os.PathLike) -> list[dict]:
    """A LossLog file back as a list of dicts; a one-line MinisdError naming the first line that is not a record."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise MinisdError(f'{path}: line {number} is not a loss record {{"step": ..., ...}}: {line[:60]!r}')
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Distributed data parallel


@dataclass
class Distributed:
    """Where this process sits in a DDP run: rank in [0, world_size). world_size 1 is a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and progress."""
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (the batch dimension split into world_size parts).

        >>> Distributed(rank=1, world_size=2).shard(torch.arange(6)).tolist()
        [3, 4, 5]
        """
        if x.shape[0] % self.world_size != 0:
            raise MinisdError(f"batch size must be a multiple of world_size {self.world_size}, got {x.shape[0]}")
        return x.chunk(self.world_size)[self.rank]

    def mean(self, x: Tensor) -> Tensor:
        """The average of x over the ranks (for logging the global batch's loss); x itself if one process."""
        if self.world_size == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)  # sum over ranks
        return x / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> Distributed:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR):
    nccl when CUDA is available, gloo on CPU. Without WORLD_SIZE > 1 it is a single process and starts nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # 3 hours, not the default 30 minutes: under `all` the other ranks wait while rank 0 trains the VAE
        timeout = datetime.timedelta(hours=3)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear from 1/warmup_steps to 1 over the first warmup_steps steps, then constant 1
    (LDM's LambdaLinearScheduler warm-up, without the decay).

    >>> [linear_warmup(s, 4) for s in (0, 1, 3, 10)]
    [0.25, 0.5, 1.0, 1.0]
    """
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
