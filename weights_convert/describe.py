"""What `python -m weights_convert info` and `minisd info` print: describe(path) for a weights file, a diffusers
folder or one of the files users add to a model (an embedding, a LoRA, a VAE on its own)."""

from pathlib import Path

from minisd.errors import MinisdError
from weights_convert.detect import LAYOUT_NAMES, ROUTES, CheckpointInfo, file_kind, inspect_checkpoint
from weights_convert.embeddings import read_embedding
from weights_convert.files import read_state_dict
from weights_convert.folders import VARIANTS, file_metadata, metadata_choice, prediction_of, read_folder
from weights_convert.vae_files import ldm_vae_to_minisd


def _prediction_line(info: CheckpointInfo, path: Path) -> str:
    if info.prediction_type is not None:
        return info.prediction_type
    if info.variant != "v2":
        return "epsilon (not recorded; every official SD v1 and SD 2 inpainting release predicts ε)"
    taken, _ = prediction_of(info, None, path.name)
    return f"not recorded (ε and v models share every key and shape): {taken} from the name; --prediction-type"


def describe(path: Path) -> str:
    """What a weights file or diffusers folder holds: format, layout, variant, EMA, dtypes, parameter counts."""
    if path.is_dir():
        info, kind = read_folder(path).info, "folder of safetensors files"
    elif not path.exists():
        raise MinisdError(f"{path}: no such file or folder")
    else:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch pickle (read without running code)"
        try:
            info = inspect_checkpoint(read_state_dict(path))
        except MinisdError as error:
            addition = describe_addition(path)
            if addition is None:  # one line that names the file once
                raise MinisdError(str(error) if str(path) in str(error) else f"{path}: {error}") from None
            return "\n".join([f"file:       {path}", f"format:     {kind}", *addition])
        if info.layout == "minisd":  # what minisd's files record beside their tensors
            metadata = file_metadata(path)
            info.variant = metadata_choice(metadata, "minisd.variant", VARIANTS) or info.variant
            info.prediction_type = metadata_choice(metadata, "minisd.prediction_type")
    order = ("unet", "unet_ema", "vae", "text_encoder")
    counts = {c: info.parameter_counts[c] for c in order if c in info.parameter_counts}
    dtypes = {c: info.dtypes[c] for c in order if c in info.dtypes}
    lines = [
        f"file:       {path}",
        f"format:     {kind}",
        f"layout:     {info.layout}" + (f" - {LAYOUT_NAMES[info.layout]}" if info.layout in LAYOUT_NAMES else ""),
        f"variant:    {info.variant}",
        f"prediction: {_prediction_line(info, path)}",
        "ema:        "
        + (
            "EMA and raw UNet (EMA used by default; the raw one: use_ema=False in Python, or python -m "
            "weights_convert convert --raw-unet)"
            if info.has_ema
            else "no"
        ),
        "dtype:      " + ", ".join(f"{c} {d}" for c, d in dtypes.items()),
        "parameters:",
        *[f"  {c:<14}{n:>15,}" for c, n in counts.items()],
        f"  {'total':<14}{sum(n for c, n in counts.items() if c != 'unet_ema'):>15,}"
        + ("  (without the EMA copy)" if info.has_ema else ""),
    ]
    return "\n".join(lines)


def describe_addition(path: Path) -> list[str] | None:
    """What `info` prints for the files users add to a model (an embedding, a LoRA, a VAE); None for other files."""
    try:
        embedding = read_embedding(path)
        n, d = embedding.vectors.shape
        model = {768: "SD v1", 1024: "SD 2.x", 64: "minisd's nano model"}.get(d)
        if model is None:  # one tensor of no text encoder's width: not an embedding
            raise MinisdError(f"{d} wide")
        return [f"kind:       {ROUTES['embedding']}", f"name:       {embedding.name} ({embedding.format} format)",
                f"vectors:    {n} × {d} ({model})"]  # fmt: skip
    except MinisdError:
        pass
    try:
        state_dict = read_state_dict(path)
    except MinisdError:
        return None
    kind = file_kind(state_dict)
    if kind == "lora":
        downs = {k: t for k, t in state_dict.items() if k.endswith(("lora_down.weight", "lora_A.weight"))}
        text = sum(k.startswith(("lora_te", "text_encoder")) for k in downs)
        alphas = sorted({round(float(t), 4) for k, t in state_dict.items() if k.endswith(".alpha")})
        convs = sum(t.dim() == 4 and t.shape[-1] > 1 for t in downs.values())
        return [f"kind:       {ROUTES['lora']}", f"layers:     {len(downs) - text} UNet, {text} text encoder "
                f"({convs} 3×3 convolutions: LoCon)", f"ranks:      {sorted({t.shape[0] for t in downs.values()})}",
                f"alphas:     {alphas or 'none stored (alpha = rank)'}"]  # fmt: skip
    if kind == "vae":
        vae = ldm_vae_to_minisd(state_dict)
        return [f"kind:       {ROUTES['vae']}", f"parameters: {sum(t.numel() for t in vae.values()):,}"]
    return None
