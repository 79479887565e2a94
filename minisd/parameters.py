"""The record of one generated image: GenerationParameters, its text in A1111's "parameters" format, both ways, and
what A1111's fields mean to minisd. The hashes that tie it to its weights and source images are minisd/hashes.py's.

A1111's "parameters" text (its infotext, modules/processing.py `create_infotext`), three parts, one per line:
    a photo of a cat, (masterpiece:1.2)                       the prompt (may span several lines)
    Negative prompt: blurry, lowres                           only when there is one
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: ...
The last line is "key: value" pairs; a value holding "," ":" or a newline is written as a JSON string ("...").
A1111 reads it back with `parse_generation_parameters` (modules/infotext_utils.py); parse_parameters reads what it
reads, and A1111 reads what format_parameters writes. images.save_png puts the text into a PNG.

What a GenerationParameters records (and `minisd regenerate` reads back), in A1111's keys where A1111 has one:
    Steps, Sampler, CFG scale, Seed, Size, the prompt and negative prompt
    Schedule type       the σ samplers' schedule (A1111 1.9+: Uniform, Karras, Exponential, SGM Uniform)
    Model, Model hash   the weights' name (file stem, folder name or hub id) and a file's short hash: never a path
    Clip skip           A1111's numbering: minisd's clip_skip + 1 (written only when clip_skip is set)
    Eta DDIM, Eta       DDIM's η (when not 0), and the ancestral η of Euler a / DPM++ 2M SDE (when not 1), as A1111
    Denoising strength  img2img and inpaint
    Init image hash, Mask image hash   the first 10 hex digits of the SHA-256 of the source images' pixels (mode,
                        size, bytes): the images themselves are named again on regenerate (--image, --mask)
minisd's own keys, for what A1111 lacks or does otherwise (A1111 shows them and ignores them):
    Timestep spacing    diffusers' leading / linspace / trailing, when not the sampler's default
    Guidance rescale, VAE tiling, Paste unmasked   when used
    Dtype, Device       the UNet's: other arithmetic gives other bytes
    Threads             the CPU threads torch computed with: the CPU's float sums depend on how work is split
    Fast                minisd.fast applied: the same image up to float rounding, not to the byte
    Prediction type     SD 2's and v models' ε or v (SD 2 files lack it); Zero terminal SNR (Lin et al. 2023) when on
    TI hashes           A1111's: each embedding the prompts used, "name: 12 hex digits of its file's SHA-256, …"
    Lora hashes         A1111's: each LoRA applied, "name: 12 hex digits of its tensor bytes' SHA-256, …"
                        (hashes.lora_hash); minisd adds Lora weights, {name: {"weight": w, "fused": bool}} as JSON, for
                        LoRAs loaded for every image (a <lora:name:w> tag's weight is in the prompt)
    VAE, VAE hash       A1111's: a separate VAE's file name (or folder name, or hub id) and its file's 10-digit hash
No path of the maker's machine is written (minisd before this wrote "Weights", "Init image" and "Mask image" paths;
they are read no more). Not recorded: library versions and the CPU or GPU model. Same recorded parameters, weights,
torch version, device kind, dtype, CPU thread count and CPU or GPU model -> same bytes (see README "Same bytes").
Texts from A1111 read into the same sampler and schedule ("DPM++ 2M Karras" of 1.5-era A1111 and "DPM++ 2M,
Schedule type: Karras" of 1.9+ alike); A1111 fields that change the picture and that minisd cannot honour (hires fix,
an A1111 sampler or schedule minisd lacks, ...) are refused in one line naming the field (check_fields).
"""

import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field

from PIL import Image

from minisd import samplers
from minisd.errors import MinisdError
from minisd.hashes import recorded_image
from minisd.parameter_line import key_values  # the last line's pairs, in linear time

MODES = ("txt2img", "img2img", "inpaint")
MAX_THREADS = 1024  # a recorded CPU thread count regenerate sets: more is a tampered file, not a machine
DRAWN_SEEDS = 2**32  # a seed left to chance is drawn below 2**32, as A1111 draws it (any seed < 2**64 works)


def draw_seed() -> int:
    """A seed for a run that names none: uniform in [0, 2**32), from the operating system (not torch's generator)."""
    return secrets.randbelow(DRAWN_SEEDS)


# ---------------------------------------------------------------------------------------------------------------
# A1111's "parameters" text

MAX_PARAMETERS = 256 << 10  # characters of a "parameters" text (a 10,000-word prompt is ~60 KB)
NEGATIVE_PREFIX = "Negative prompt:"
FIXED_KEYS = (
    "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash",
    "Model",
)  # fmt: skip


def _format_value(name: str, value: str | int | float) -> str:
    """A value as A1111 writes it: numbers plainly (7.0 as 7), a str quoted by quote_value."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MinisdError(f"{name} must be a str, int or float, got {type(value).__name__}")
    if isinstance(value, str):
        return quote_value(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MinisdError(f"{name} must be a finite number, got {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def quote_value(value: str) -> str:
    """A str value as it goes on the parameters line: A1111 writes one holding "," ":" or a newline as a JSON string;
    minisd also quotes one that is empty, starts with '"' or has spaces at either end, so each reads back unchanged.

    >>> quote_value("Euler a"), quote_value("a, b")
    ('Euler a', '"a, b"')
    """
    if any(c in value for c in ",:\n") or not value or value != value.strip() or value.startswith('"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def format_parameters(
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str | None = None,
    model_hash: str | None = None,
    extra: dict[str, str | int | float | None] | None = None,
    schedule_type: str | None = None,
) -> str:
    """The A1111 "parameters" text for one image: prompt, "Negative prompt: ..." (if not empty), then "Steps: 20,
    Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: ..., Model: ...",
    then `extra` in its order (e.g. {"Denoising strength": 0.75, "Clip skip": 2}; None values are left out, as A1111
    does); A1111 1.9+'s order.

    sampler is A1111's name ("Euler a", "DPM++ 2M"); schedule_type its "Schedule type" ("Karras"); model_hash its
    short hash (first 10 hex digits of the file's SHA-256). Like A1111, the text is stripped at both ends and each
    prompt line is read back stripped; a prompt line starting with "Negative prompt:" cannot be told apart from the
    negative prompt.

    >>> format_parameters("a cat", "", 20, "Euler a", 7.0, 123, 512, 512)
    'a cat\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512'
    """
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt), ("sampler", sampler)):
        if not isinstance(value, str):
            raise MinisdError(f"{name} must be a str, got {type(value).__name__}")
    if not sampler:
        raise MinisdError("sampler must be a non-empty str (A1111's name, e.g. 'Euler a'), got ''")
    for name, value, low in (("steps", steps, 1), ("seed", seed, 0), ("width", width, 1), ("height", height, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MinisdError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, int | float):
        raise MinisdError(f"cfg_scale must be a number, got {cfg_scale!r}")
    fields: dict[str, str | int | float | None] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    if extra is not None and not isinstance(extra, dict):
        raise MinisdError(f"extra must be a dict or None, got {type(extra).__name__}")
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not re.fullmatch(r"\w[\w \-/]+", key) or key in FIXED_KEYS:
            raise MinisdError(
                f"extra keys must be 2+ letters, digits, spaces, '-' or '/', starting with a letter or digit, and not "
                f"one of {FIXED_KEYS}, got {key!r}"
            )
        fields[key] = value
    line = ", ".join(f"{key}: {_format_value(key, value)}" for key, value in fields.items() if value is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 "parameters" text: {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}, every value a
    str as written (JSON strings decoded). The last line is the parameters when it holds at least 3 "key: value"
    pairs (A1111's rule); otherwise the whole text is prompt. Each prompt line is stripped, as A1111 does.

    >>> parse_parameters("a cat\\nNegative prompt: dog\\nSteps: 20, Sampler: Euler a, CFG scale: 7.5")
    {'Prompt': 'a cat', 'Negative prompt': 'dog', 'Steps': '20', 'Sampler': 'Euler a', 'CFG scale': '7.5'}
    """
    if not isinstance(text, str):
        raise MinisdError(f"text must be a str, got {type(text).__name__}")
    if len(text) > MAX_PARAMETERS:
        raise MinisdError(f"parameters text must be at most {MAX_PARAMETERS} characters, got {len(text)}")
    *lines, last = text.strip().split("\n")
    pairs = key_values(last)
    if len(pairs) < 3:
        lines, pairs = [*lines, last], []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        target = negative_lines if in_negative else prompt_lines
        if target or line:  # A1111 drops empty lines before the first text
            target.append(line)
    fields = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in pairs:
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # A1111 keeps a value it cannot decode as written
        fields[key] = value
    return fields


# ---------------------------------------------------------------------------------------------------------------
# A1111's fields, as minisd reads them

# Fields A1111 writes that change its picture and that minisd cannot honour: refused, with what they are.
REFUSED = {
    "Hires": "hires fix (A1111's upscaled second pass)",  # every "Hires ..." key, and "First pass size"
    "First pass size": "hires fix (A1111's upscaled second pass)",
    "Face restoration": "face restoration (GFPGAN / CodeFormer)",
    "Variation seed": "variation seeds",
    "Variation seed strength": "variation seeds",
    "Seed resize from": "variation seeds",
    "Refiner": "a refiner checkpoint",
    "Image CFG scale": "InstructPix2Pix's image guidance",
    "Tiling": "seamless tiling",
    "Schedule rho": "a schedule with another ρ",
    "Schedule min sigma": "a schedule with another σ_min",
    "Schedule max sigma": "a schedule with another σ_max",
    "Discard penultimate sigma": "discarding the penultimate σ",
    "Mask blur": "A1111's inpainting (mask blur, inpaint area, masked content)",
    "Inpaint area": "A1111's inpainting (mask blur, inpaint area, masked content)",
    "Masked content": "A1111's inpainting (mask blur, inpaint area, masked content)",
    "Conditional mask weight": "A1111's conditional mask weight",
    "Noise multiplier": "A1111's img2img noise multiplier",
    "SGM noise multiplier": "SGM's noise multiplier",
    "Token merging ratio": "token merging (ToMe)",
    "NGMS": "skipping the negative prompt at small σ (NGMS)",
    "Emphasis": "an emphasis mode other than A1111's Original",  # refused unless "Original"
    "FP8 weight": "FP8 weights",
    "VAE Decoder": "another VAE decoder (TAESD)",
    "VAE Encoder": "another VAE encoder (TAESD)",
    "Downcast alphas_cumprod": "a float16 ᾱ table",
}
# Fields that do not change minisd's picture: A1111's version, user, hash list, noise source (README "A1111 and
# minisd"), "Pad conds" (prompt and negative padded to the same 77-token chunks: minisd always does), old paths.
IGNORED = ("Version", "User", "Hashes", "RNG", "ENSD", "Pad conds", "Weights", "Init image", "Mask image")
READ = (
    *FIXED_KEYS, "Clip skip", "Eta", "Eta DDIM", "Denoising strength", "Init image hash", "Mask image hash",
    "Timestep spacing", "Guidance rescale", "VAE tiling", "Paste unmasked", "Dtype", "Device", "Threads", "Fast",
    "Prediction type", "Zero terminal SNR", "TI hashes", "Lora hashes", "Lora weights", "VAE", "VAE hash",
)  # fmt: skip


def check_fields(fields: dict[str, str]) -> list[str]:
    """Refuse (one line, naming the field) what minisd cannot honour; return the keys it neither reads nor knows
    (an extension's, say), for the caller to mention."""
    for key, value in fields.items():
        what = REFUSED.get("Hires" if key.startswith("Hires ") else key)
        if what is not None and not (key == "Emphasis" and value == "Original"):
            raise MinisdError(f"{key}: {value[:60]!r} asks for {what}, which minisd does not have")
    return [key for key in fields if key not in READ and key not in IGNORED and not key.endswith(("-1", "-2"))]


def sampler_settings(fields: dict[str, str]) -> tuple[str, str, float | None]:
    """(sampler, schedule type, η) from the Sampler, Schedule type, Eta and Eta DDIM fields, as A1111 reads them:
    a schedule in the sampler's name ("DPM++ 2M Karras", before 1.9) wins; "Automatic" is A1111's default for the
    sampler; no Schedule type at all (1.5-era A1111, and minisd before it wrote one) is that era's meaning, the
    name's schedule or Uniform. DDPM, DDIM and PLMS take no schedule (A1111's DDIM and PLMS ignore the field).
    Eta DDIM is DDIM's η, Eta the ancestral η (for DDIM too, as minisd wrote it before this)."""
    try:
        display, implied = samplers.resolve_name(fields["Sampler"])
    except MinisdError as error:
        raise MinisdError(f"Sampler: {error}") from None
    label = fields.get("Schedule type")
    label = None if label is None else samplers.schedule_type_label(label)  # A1111 reads "karras" as "Karras"
    schedule = implied or ("Uniform" if label in (None, "Automatic") else label)
    if label == "Automatic" and implied is None:
        schedule = samplers.A1111_AUTOMATIC.get(display, "Uniform")
    if display not in samplers.SIGMA_SAMPLERS:
        schedule = "Uniform"
    elif schedule not in samplers.SCHEDULE_TYPES:
        raise MinisdError(
            f"Schedule type: {label!r} is an A1111 schedule minisd does not have; it has "
            f"{', '.join(samplers.SCHEDULE_TYPES)}"
        )
    key = "Eta DDIM" if display == "DDIM" and "Eta DDIM" in fields else "Eta"
    eta = fields.get(key)
    if eta is not None and display not in ("DDIM", *samplers.ANCESTRAL):
        raise MinisdError(f"Eta: {eta!r} is an ancestral sampler's η; {display} takes none")
    try:
        return display, schedule, None if eta is None else float(eta)
    except ValueError:
        raise MinisdError(f"{key}: {eta[:40]!r} is not a number") from None


@dataclass
class GenerationParameters:
    """Everything needed to make one image again (see the module docstring for what is and is not recorded)."""

    mode: str  # "txt2img", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    sampler: str  # A1111's display name, e.g. "Euler a", "DPM++ 2M"
    guidance_scale: float
    seed: int
    width: int
    height: int
    schedule_type: str = "Uniform"  # A1111's "Schedule type"; the σ samplers' (minisd.samplers.sigmas)
    timestep_spacing: str | None = None  # diffusers' name; None: the sampler's default
    eta: float | None = None  # None: the sampler's default (DDIM 0, Euler a and DPM++ 2M SDE 1)
    clip_skip: int | None = None  # minisd's / diffusers' numbering (A1111's "Clip skip" minus 1)
    strength: float | None = None
    image_hash: str | None = None  # pixels_hash of the source image (img2img, inpaint)
    mask_hash: str | None = None
    model_name: str | None = None  # a file's stem, a folder's name or a hub id
    model_hash: str | None = None  # a single file's short hash (A1111's "Model hash"); None for folders and hub ids
    guidance_rescale: float = 0.0
    vae_tiling: bool = False
    paste_unmasked: bool = False  # inpaint: the image's own pixels pasted back outside the mask
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None  # torch.get_num_threads() of a CPU run
    fast: bool = False  # minisd.fast.make_fast applied: the same image up to float rounding, not to the byte
    prediction_type: str | None = None  # "epsilon" / "v_prediction"; recorded for SD 2 and v models (None: ε)
    rescale_betas_zero_snr: bool = False
    ti_hashes: dict[str, str] = field(default_factory=dict)  # embedding name as typed -> 12 hex digits
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRA name -> 12 hex digits (lora_hash)
    lora_weights: dict[str, dict] = field(default_factory=dict)  # loaded LoRA -> {"weight": w, "fused": bool}
    vae: str | None = None  # a separate VAE's file name or hub id (A1111's "VAE")
    vae_hash: str | None = None

    def source_images(
        self,
        image: Image.Image | str | os.PathLike | None = None,
        mask_image: Image.Image | str | os.PathLike | None = None,
    ) -> list[Image.Image]:
        """The source images its mode needs (none, the image, or the image and the mask), given again (PIL images
        or paths) and checked against the recorded pixel hashes; one-line error for what is missing or changed."""
        if self.mode not in MODES:
            raise MinisdError(f"params.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        sources = []
        if self.mode in ("img2img", "inpaint"):
            sources.append(recorded_image("image", image, self.image_hash))
        if self.mode == "inpaint":
            sources.append(recorded_image("mask_image", mask_image, self.mask_hash))
        return sources

    def text(self) -> str:
        """A1111's "parameters" text (format_parameters) with minisd's extra keys."""
        ancestral = self.sampler in samplers.ANCESTRAL
        extra = {
            "Denoising strength": self.strength,
            "Clip skip": None if self.clip_skip is None else self.clip_skip + 1,
            "Eta DDIM": self.eta if self.sampler == "DDIM" and self.eta not in (None, 0.0) else None,
            "Eta": self.eta if ancestral and self.eta not in (None, 1.0) else None,
            "Init image hash": self.image_hash,
            "Mask image hash": self.mask_hash,
            "Timestep spacing": self.timestep_spacing,
            "Guidance rescale": self.guidance_rescale or None,
            "VAE tiling": "True" if self.vae_tiling else None,
            "Paste unmasked": "True" if self.paste_unmasked else None,
            "Dtype": self.dtype,
            "Device": self.device,
            "Threads": self.threads,
            "Fast": "True" if self.fast else None,
            "Prediction type": self.prediction_type,
            "Zero terminal SNR": "True" if self.rescale_betas_zero_snr else None,
            "TI hashes": _name_list(self.ti_hashes),
            "Lora hashes": _name_list(self.lora_hashes),
            "Lora weights": json.dumps(self.lora_weights) if self.lora_weights else None,
            "VAE": self.vae,
            "VAE hash": self.vae_hash,
        }
        schedule = self.schedule_type if self.sampler in samplers.SIGMA_SAMPLERS else None
        return format_parameters(
            self.prompt, self.negative_prompt, self.num_inference_steps, self.sampler, self.guidance_scale,
            self.seed, self.width, self.height, self.model_name, self.model_hash, extra, schedule,
        )  # fmt: skip

    @classmethod
    def from_text(cls, text: str) -> "GenerationParameters":
        """Read a "parameters" text that minisd or A1111 wrote (at least Steps, Sampler, CFG scale, Seed and Size).
        The mode is inpaint with a mask hash, img2img with a denoising strength, txt2img otherwise. A1111 fields
        minisd cannot honour are refused in one line (check_fields)."""
        fields = parse_parameters(text)
        missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in fields]
        if missing:
            raise MinisdError(f"parameters lack {', '.join(missing)}: not written by minisd or A1111")
        check_fields(fields)
        sampler, schedule_type, eta = sampler_settings(fields)
        threads = fields.get("Threads")
        if threads is not None and not (re.fullmatch(r"[0-9]{1,4}", threads) and 1 <= int(threads) <= MAX_THREADS):
            raise MinisdError(f"Threads: must be an integer in [1, {MAX_THREADS}], got {threads[:40]!r}")
        try:
            width, height = (int(v) for v in fields["Size"].split("x"))
            clip_skip, strength = fields.get("Clip skip"), fields.get("Denoising strength")
            mask = fields.get("Mask image hash")
            return cls(
                mode="inpaint" if mask else "img2img" if strength else "txt2img",
                prompt=fields["Prompt"],
                negative_prompt=fields["Negative prompt"],
                num_inference_steps=int(fields["Steps"]),
                sampler=sampler,
                guidance_scale=float(fields["CFG scale"]),
                seed=int(fields["Seed"]),
                width=width,
                height=height,
                schedule_type=schedule_type,
                timestep_spacing=fields.get("Timestep spacing"),
                eta=eta,
                clip_skip=None if clip_skip is None else int(clip_skip) - 1,
                strength=None if strength is None else float(strength),
                image_hash=fields.get("Init image hash"),
                mask_hash=mask,
                model_name=fields.get("Model"),
                model_hash=fields.get("Model hash"),
                guidance_rescale=float(fields.get("Guidance rescale", 0.0)),
                vae_tiling=fields.get("VAE tiling") == "True",
                paste_unmasked=fields.get("Paste unmasked") == "True",
                dtype=fields.get("Dtype"),
                device=fields.get("Device"),
                threads=None if threads is None else int(threads),
                fast=fields.get("Fast") == "True",
                prediction_type=fields.get("Prediction type"),
                rescale_betas_zero_snr=fields.get("Zero terminal SNR") == "True",
                ti_hashes=_read_name_list(fields.get("TI hashes")),
                lora_hashes=_read_name_list(fields.get("Lora hashes")),
                lora_weights=_read_json("Lora weights", fields.get("Lora weights")),
                vae=fields.get("VAE"),
                vae_hash=fields.get("VAE hash"),
            )
        except ValueError as error:
            raise MinisdError(f"parameters hold a value that is not a number: {error}") from None


def _name_list(names: dict[str, str]) -> str | None:
    """A1111's list form "name: hash, name: hash" (None when empty).

    >>> _name_list({"cat-toy": "0123456789ab", "neg": "ba9876543210"})
    'cat-toy: 0123456789ab, neg: ba9876543210'
    """
    return ", ".join(f"{name}: {value}" for name, value in names.items()) or None


def _read_name_list(text: str | None) -> dict[str, str]:
    """_name_list read back: each ", "-separated entry split at its last ": " (a name may hold ": ", a hash never)."""
    pairs = [entry.rpartition(": ") for entry in (text or "").split(", ") if entry]
    return {name.strip(): value.strip() for name, _, value in pairs}


def _read_json(key: str, text: str | None) -> dict:
    """One of minisd's JSON-valued keys (Lora weights) read back; {} when absent."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise MinisdError(f"parameters' {key} must be a JSON object, got {text!r:.60}")
    return value
