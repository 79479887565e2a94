"""minisd: Stable Diffusion v1 from scratch in plain PyTorch.

Data flows one way: tokenizer → clip → (pipeline: sampler ⇄ unet) → vae → images.

    pipe = minisd.StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors")
    image = pipe("a watercolour fox", num_inference_steps=25, seed=1).images[0]

The names below are handed on lazily (PEP 562): `import minisd.errors` (as every weights_convert module does) runs
this file, and an eager `from minisd.api import ...` here would load the loader, which imports weights_convert
back: an import loop that breaks `python -c "import weights_convert.keymap_ldm"`. tests/test_imports.py checks that
every module imports alone.
"""

import importlib

# name -> the module that defines it
_HOMES = {
    "AutoPipelineForImage2Image": "minisd.auto",
    "AutoPipelineForInpainting": "minisd.auto",
    "AutoPipelineForText2Image": "minisd.auto",
    "GenerationOutput": "minisd.api",
    "GenerationParameters": "minisd.parameters",
    "Kandinsky": "minisd.kandinsky.api",
    "MinisdError": "minisd.errors",
    "StableDiffusion": "minisd.api",
    "default_model": "minisd.api",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    """`minisd.StableDiffusion` etc.: import the defining module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'minisd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
