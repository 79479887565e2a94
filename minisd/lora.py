"""LoRA: a fine-tune stored as low-rank updates of some weight matrices (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models", arXiv:2106.09685), applied to the UNet and the text encoder.

    W' = W + scale · (alpha / r) · B A          Hu et al. eq. 3, with the α/r scaling of §4.1

code       paper   kohya / A1111          diffusers / PEFT        shape (Linear; Conv2d)
down       A       lora_down              lora_A                  (r, in); (r, in, kh, kw): the layer's own kernel
up         B       lora_up                lora_B                  (out, r); (out, r, 1, 1)
alpha      α       alpha                  lora_alpha              a number; none stored: α = r
rank       r       (A's rows)             r
scale      —       <lora:name:0.8>        adapter weight,         the user's strength
                                          fuse_lora(lora_scale)

Two ways to apply it, with the same result up to float rounding:
    on the fly   y = W x + scale · (α / r) · B (A x)     W untouched: a forward hook adds the low-rank path after the
                                                         layer (two small matmuls or convs per call); any number of
                                                         LoRAs, each with its own scale, changed or removed at will
    merged       W ← W + scale · (α / r) · B A           fuse(): no cost per call; the original W is kept, and
                                                         unload() copies it back, so the weights return bit for bit
A file's names are weights_convert.keymap_lora's business; here everything is minisd module paths.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from minisd.errors import MinisdError
from weights_convert.files import read_state_dict
from weights_convert.folders import file_metadata
from weights_convert.keymap_lora import LoraWeight, lora_weights

NETWORKS = ("unet", "text_encoder")  # what LoRAs for SD v1 adapt (never the VAE)


def read_lora(path: str | os.PathLike, networks: dict[str, nn.Module]) -> list[LoraWeight]:
    """A LoRA file (.safetensors, or a pickle through the safe unpickler) -> its layers in minisd names, for these
    networks ({"unet": …, "text_encoder": …}: their module paths resolve kohya's names)."""
    state_dict = read_state_dict(path)
    names = {component: networks[component].state_dict().keys() for component in NETWORKS}
    try:
        return lora_weights(state_dict, file_metadata(Path(path)), names)
    except MinisdError as error:
        raise MinisdError(f"{path}: {error}") from None


class LoraBranch(nn.Module):
    """The low-rank path beside one Linear or Conv2d: x -> scale · (α / r) · B (A x). Its `hook` adds it to the
    layer's output. down and up are kept in the layer's dtype and device, shaped as F.linear / F.conv2d want them."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, weight: LoraWeight, scale: float):
        super().__init__()
        down, up = _fit(layer, weight)
        self.down = nn.Parameter(down.to(layer.weight), requires_grad=False)  # (trainable: train/finetune.py)
        self.up = nn.Parameter(up.to(layer.weight), requires_grad=False)
        self.conv = isinstance(layer, nn.Conv2d)
        self.stride, self.padding, self.dilation = (
            (layer.stride, layer.padding, layer.dilation) if self.conv else (1,) * 3
        )
        self.factor = scale * weight.alpha / weight.rank  # scale · α / r

    def forward(self, x: Tensor) -> Tensor:
        """x: the layer's input ((b, s, in) or (b, in, h, w)). Returns the low-rank path's output, the layer's shape."""
        if self.conv:
            hidden = F.conv2d(x, self.down, stride=self.stride, padding=self.padding, dilation=self.dilation)  # A x
            return self.factor * F.conv2d(hidden, self.up)  # B (A x): a 1×1 conv
        return self.factor * F.linear(F.linear(x, self.down), self.up)

    def hook(self, layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """The forward hook: y = W x + scale · (α / r) · B (A x)."""
        return output + self(args[0])

    def delta(self) -> Tensor:
        """ΔW = scale · (α / r) · B A in the layer weight's shape, computed in float32."""
        up = self.up.float().flatten(1)  # (out, r)
        if self.conv:
            return self.factor * einsum(up, self.down.float(), "o r, r i h w -> o i h w")
        return self.factor * (up @ self.down.float())


def _fit(layer: nn.Module, weight: LoraWeight) -> tuple[Tensor, Tensor]:
    """A and B shaped for the layer (a 1×1 conv takes (r, in) factors and a Linear (r, in, 1, 1) ones), or a
    one-line MinisdError when they do not fit it."""
    where = f"LoRA layer {weight.component}.{weight.module}"
    if not isinstance(layer, nn.Linear | nn.Conv2d) or type(layer) not in (nn.Linear, nn.Conv2d):
        raise MinisdError(
            f"{where}: a {type(layer).__name__}, not a Linear or Conv2d (minisd.fast networks take no LoRA)"
        )
    down, up = weight.down, weight.up
    out_features, in_features, *kernel = layer.weight.shape
    r = down.shape[0] if down.dim() >= 2 else 0
    if isinstance(layer, nn.Conv2d):
        down = down[:, :, None, None] if down.dim() == 2 and kernel == [1, 1] else down
        up = up[:, :, None, None] if up.dim() == 2 else up
        want_down, want_up = (r, in_features, *kernel), (out_features, r, 1, 1)
    else:
        down = down.flatten(1) if down.dim() == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.dim() == 4 and up.shape[2:] == (1, 1) else up
        want_down, want_up = (r, in_features), (out_features, r)
    if r == 0 or tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise MinisdError(
            f"{where}: factors A {tuple(weight.down.shape)} and B {tuple(weight.up.shape)} do not fit its weight "
            f"{tuple(layer.weight.shape)} (want A {want_down}, B {want_up}): a LoRA for another model?"
        )
    if not (down.is_floating_point() and up.is_floating_point() and torch.isfinite(down).all() and up.isfinite().all()):
        raise MinisdError(f"{where}: factors must be finite floats")
    return down, up


@dataclass
class Adapter:
    """One LoRA in use: its name, file, short hash (A1111's "Lora hashes"), scale, and its branches by layer."""

    name: str
    path: Path | None
    hash: str | None
    scale: float
    branches: dict[tuple[str, str], LoraBranch] = field(default_factory=dict)  # (network, module path) -> branch
    handles: list[RemovableHandle] = field(default_factory=list)
    fused: bool = False


class Adapters:
    """The LoRAs applied to a UNet and a text encoder: on the fly or merged, several at once, and the way back.

    adapters = Adapters({"unet": unet, "text_encoder": text_encoder})
    adapters.add("style", read_lora("style.safetensors", networks), scale=0.8)   # on the fly
    adapters.fuse()       # merge every LoRA into the weights (the originals are kept)
    adapters.unload()     # every weight back, bit for bit; no hook left
    """

    def __init__(self, networks: dict[str, nn.Module]):
        self.networks = networks
        self.adapters: dict[str, Adapter] = {}
        self.originals: dict[tuple[str, str], Tensor] = {}  # weights before the first fuse() that changed them

    def add(
        self,
        name: str,
        weights: list[LoraWeight],
        scale: float = 1.0,
        path: Path | None = None,
        hash: str | None = None,
    ) -> Adapter:
        """Apply a LoRA on the fly under `name` (refused if the name is taken) with `scale`."""
        if not isinstance(name, str) or not name or name in self.adapters:
            raise MinisdError(
                f"adapter name must be a new non-empty str, got {name!r} (in use: {sorted(self.adapters)})"
            )
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not -100 <= scale <= 100:
            raise MinisdError(f"a LoRA's weight must be a number in [-100, 100], got {scale!r}")
        adapter = Adapter(name, path, hash, float(scale))
        modules = {c: dict(self.networks[c].named_modules()) for c in NETWORKS}
        for weight in weights:  # build every branch first: a misfit layer leaves nothing half-applied
            layer = modules[weight.component][weight.module]
            adapter.branches[(weight.component, weight.module)] = LoraBranch(layer, weight, float(scale))
        for (component, module), branch in adapter.branches.items():
            adapter.handles.append(modules[component][module].register_forward_hook(branch.hook))
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        """Take an on-the-fly LoRA off (its hooks removed; the weights were never touched)."""
        adapter = self.adapters.get(name)
        if adapter is None or adapter.fused:
            raise MinisdError(f"no on-the-fly LoRA named {name!r} (fused ones leave with unload())")
        for handle in adapter.handles:
            handle.remove()
        del self.adapters[name]

    @torch.no_grad()
    def fuse(self, names: list[str] | None = None) -> None:
        """Merge the on-the-fly LoRAs `names` (None: all) into the weights: W ← W + scale · (α / r) · B A, summed in
        float32 and cast back to the weight's dtype."""
        for adapter in self.adapters.values():
            if adapter.fused or (names is not None and adapter.name not in names):
                continue
            for handle in adapter.handles:
                handle.remove()
            adapter.handles.clear()
            for (component, module), branch in adapter.branches.items():
                weight = self.networks[component].get_submodule(module).weight
                self.originals.setdefault((component, module), weight.detach().clone())
                weight.copy_((weight.float() + branch.delta()).to(weight.dtype))
            adapter.fused = True

    @torch.no_grad()
    def unload(self) -> None:
        """Every LoRA off: hooks removed, fused weights restored from their saved originals (bit for bit)."""
        for adapter in self.adapters.values():
            for handle in adapter.handles:
                handle.remove()
        for (component, module), original in self.originals.items():
            self.networks[component].get_submodule(module).weight.copy_(original)
        self.adapters.clear()
        self.originals.clear()


# A1111's extra-network syntax (modules/extra_networks.py: `<(\w+):([^>]+)>`), for LoRAs: <lora:name> or <lora:name:w>
LORA_TAG = re.compile(r"<lora:([^>]*)>")


def lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """A1111's <lora:name> (weight 1) and <lora:name:weight> taken out of a prompt, as A1111 removes them before the
    prompt is encoded: (the prompt without them, {name: weight}).

    >>> lora_tags("a fox <lora:ink wash:0.8>, snow<lora:detail>")
    ('a fox , snow', {'ink wash': 0.8, 'detail': 1.0})
    """
    tags: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        name, *weights = match.group(1).split(":")
        if not name.strip() or len(weights) > 1 or name.strip() in tags:
            raise MinisdError(
                f"LoRA tags read <lora:name> or <lora:name:weight>, each name once (separate text encoder and UNet "
                f"weights are not supported), got {match.group(0)!r}"
            )
        try:
            tags[name.strip()] = float(weights[0]) if weights else 1.0
        except ValueError:
            raise MinisdError(f"a LoRA tag's weight must be a number, got {match.group(0)!r}") from None
    return LORA_TAG.sub("", prompt), tags
