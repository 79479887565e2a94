"""Standard normal noise, drawn one way everywhere: the rule of diffusers' `randn_tensor`, so that one generator
gives diffusers' numbers.

    randn(shape, generator, dtype, device)
      = torch.randn(shape, generator=generator, dtype=dtype, device=<the generator's device, or device without
        one>).to(device)

The dtype is always the caller's explicit choice: a float16 draw is its own sequence of numbers, not a float32 draw
rounded. The device the numbers are drawn on is the generator's: a CPU generator draws on the CPU whatever the
target device, so one seed gives one noise on the CPU and on a GPU. Where each draw happens, and which reference
draw it mirrors:

    draw                                      dtype, device                   mirrors
    a pipeline's starting noise               float32 on the CPU, then cast   randn_tensor(shape, cpu generator,
    and the VAE posterior's ε (pipelines/)    and moved to the UNet's / VAE's  float32), then .to(device, dtype)
    DiagonalGaussian.sample(generator)        the posterior mean's            DiagonalGaussianDistribution.sample
    a sampler's per-step noise (DDPM, DDIM    ε's (the UNet output's)         the scheduler's step
    η > 0, Euler a)
    DPM++ 2M SDE's per-step noise             float32, then cast to x_t's     DPMSolverMultistepScheduler.step
"""

import torch
from torch import Generator, Tensor


def randn(
    shape: tuple[int, ...] | torch.Size, generator: Generator | None, dtype: torch.dtype, device: str | torch.device
) -> Tensor:
    """Standard normal noise of `shape` in `dtype` on `device`, drawn on the generator's device (on `device` when
    generator is None, from torch's global generator there), then moved.

    >>> randn((3,), torch.Generator().manual_seed(0), torch.float32, "cpu")
    tensor([ 1.5410, -0.2934, -2.1788])
    """
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=draw_device).to(device)
