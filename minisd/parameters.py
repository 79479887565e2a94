"""The record of one generated image: GenerationParameters, its text in A1111's "parameters" format, both ways, and
the hashes that tie it to its weights and source images.

A1111's "parameters" text (its infotext, modules/processing.py `create_infotext`), three parts, one per line:
    a photo of a cat, (masterpiece:1.2)                       the prompt (may span several lines)
    Negative prompt: blurry, lowres                           only when there is one
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, Model: v1-5
The last line is "key: value" pairs; a value holding "," ":" or a newline is written as a JSON string ("...").
A1111 reads it back with `parse_generation_parameters` (modules/infotext_utils.py); parse_parameters reads what it
reads, and A1111 reads what format_parameters writes. images.save_png puts the text into a PNG.

What a GenerationParameters records (and `minisd regenerate` reads back), beside A1111's prompt, negative prompt,
Steps, Sampler, CFG scale, Seed, Size, Model and Model hash:
    Clip skip           A1111's numbering: minisd's clip_skip + 1 (written only when clip_skip is set)
    Eta                 DDIM's η, when not 0
    Denoising strength  img2img and inpaint
    Init image / Mask image, and their hashes: the source files (absolute paths) when given as paths, and the first
                        10 hex digits of the SHA-256 of their pixels (mode, size, bytes)
    Weights             what from_pretrained was given: an absolute file or folder path, or the hub id
    Dtype, Device       the UNet's: other arithmetic gives other bytes
    Fast                minisd.fast applied: the same image up to float rounding, not to the byte
Not recorded: the hub snapshot revision of a hub id (the cached `main` is used), library versions and GPU model.
Same recorded parameters, same weights, same device kind and dtype, same torch version -> same bytes.
"""

import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from minisd.errors import MinisdError
from minisd.images import open_image

MODES = ("txt2img", "img2img", "inpaint")
DRAWN_SEEDS = 2**32  # a seed left to chance is drawn below 2**32, as A1111 draws it (any seed < 2**64 works)


def draw_seed() -> int:
    """A seed for a run that names none: uniform in [0, 2**32), from the operating system (not torch's generator)."""
    return secrets.randbelow(DRAWN_SEEDS)


# ---------------------------------------------------------------------------------------------------------------
# Hashes


def short_hash(data: bytes) -> str:
    """The first 10 hex digits of SHA-256: A1111's short "Model hash" form.

    >>> short_hash(b"")
    'e3b0c44298'
    """
    return hashlib.sha256(data).hexdigest()[:10]


def file_hash(path: str | os.PathLike) -> str:
    """short_hash of a file's bytes, read in 16 MiB pieces (A1111's model hash of a single file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            digest.update(piece)
    return digest.hexdigest()[:10]


def pixels_hash(pil: Image.Image) -> str:
    """short_hash of an image's pixels: mode, size and bytes (the same picture in another file format hashes alike)."""
    return short_hash(f"{pil.mode} {pil.width}x{pil.height}\n".encode() + pil.tobytes())


# ---------------------------------------------------------------------------------------------------------------
# Source images: given as PIL images or paths, recorded by path and hash


def source_image(name: str, image: Image.Image | str | os.PathLike) -> tuple[Image.Image, str | None, str]:
    """image (PIL or a path) -> (the PIL image, its absolute path or None, its pixels hash)."""
    if isinstance(image, Image.Image):
        return image, None, pixels_hash(image)
    if isinstance(image, str | os.PathLike):
        pil = open_image(name, image)
        return pil, str(Path(image).resolve()), pixels_hash(pil)
    raise MinisdError(f"{name} must be a PIL image or an image file path, got {type(image).__name__}")


def recorded_image(name: str, path: str | None, recorded_hash: str | None) -> Image.Image:
    """A source image named in GenerationParameters, checked against its recorded pixels hash."""
    if path is None:
        raise MinisdError(f"the parameters name no {name} file (it was given as a PIL image): cannot make it again")
    pil = open_image(name, path)
    if recorded_hash is not None and pixels_hash(pil) != recorded_hash:
        raise MinisdError(
            f"{name} {path!r} has changed: its pixels hash is {pixels_hash(pil)}, recorded {recorded_hash}"
        )
    return pil


# ---------------------------------------------------------------------------------------------------------------
# A1111's "parameters" text

# One "key: value" pair of the last line, as A1111's parser reads it: a key of word characters, spaces, "-" and "/",
# then either a JSON string or anything up to the next comma. A1111 finds them with this regex (`re_param`), which
# takes quadratic time on a long run of key characters without a ":" (100 KB: 54 s); key_values reads the same
# pairs in one pass, with the four linear pieces below.
PARAMETER = re.compile(r'\s*(?P<key>\w[\w \-/]+):\s*(?P<value>"(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SPACES = re.compile(r"\s*")
_KEY_TAIL = re.compile(r"[\w \-/]*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
_UNQUOTED = re.compile(r"[^,]*")
MAX_PARAMETERS = 256 << 10  # characters of a "parameters" text (a 10,000-word prompt is ~60 KB)
NEGATIVE_PREFIX = "Negative prompt:"
FIXED_KEYS = ("Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model")


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
) -> str:
    """The A1111 "parameters" text for one image: prompt, "Negative prompt: ..." (if not empty), then
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: ..., Model: ...", then `extra`
    in its order (e.g. {"Denoising strength": 0.75, "Clip skip": 2}; None values are left out, as A1111 does).

    sampler is A1111's name ("Euler a", "DPM++ 2M Karras"); model_hash its short hash (first 10 hex digits of the
    file's SHA-256). Like A1111, the text is stripped at both ends and each prompt line is read back stripped; a
    prompt line starting with "Negative prompt:" cannot be told apart from the negative prompt.

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


def key_values(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a parameters line: what PARAMETER.findall(line) returns, in linear time.

    At each position: skip spaces; a key is a word character and the longest run of key characters after it, and
    must be followed by ":" (no shorter run can be: ":" is not a key character, so on failure the scan goes on after
    the run); the value is a JSON string followed by "," or the end, else everything up to the next ",".

    >>> key_values('Steps: 20, Size: 512x512, Model: "a, b", ok')
    [('Steps', '20'), ('Size', '512x512'), ('Model', '"a, b"')]
    """
    pairs = []
    i, n = 0, len(line)
    while i < n:
        j = _SPACES.match(line, i).end()
        if j == n:
            break
        if not (line[j].isalnum() or line[j] == "_"):  # \w
            i = j + 1
            continue
        k = _KEY_TAIL.match(line, j + 1).end()
        if k - j < 2 or k == n or line[k] != ":":
            i = k
            continue
        start = _SPACES.match(line, k + 1).end()
        quoted = _QUOTED.match(line, start)
        if quoted and (quoted.end() == n or line[quoted.end()] == ","):
            end = quoted.end()
        else:
            end = _UNQUOTED.match(line, start).end()
        pairs.append((line[j:k], line[start:end]))
        i = end + 1
    return pairs


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


@dataclass
class GenerationParameters:
    """Everything needed to make one image again (see the module docstring for what is and is not recorded)."""

    mode: str  # "txt2img", "img2img" or "inpaint"
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    sampler: str  # A1111's display name, e.g. "Euler a"
    guidance_scale: float
    seed: int
    width: int
    height: int
    eta: float = 0.0
    clip_skip: int | None = None  # minisd's / diffusers' numbering (A1111's "Clip skip" minus 1)
    strength: float | None = None
    image: str | None = None  # absolute path of the source image, when it was given as a path
    image_hash: str | None = None
    mask_image: str | None = None
    mask_hash: str | None = None
    model_name: str | None = None
    model_hash: str | None = None
    weights: str | None = None  # what from_pretrained was given (absolute path or hub id)
    dtype: str | None = None
    device: str | None = None
    fast: bool = False  # minisd.fast.make_fast applied: the same image up to float rounding, not to the byte

    def source_images(self) -> list[Image.Image]:
        """The source images its mode needs (none, the image, or the image and the mask), read again from their
        recorded paths and checked against their recorded pixel hashes."""
        if self.mode not in MODES:
            raise MinisdError(f"params.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        sources = []
        if self.mode in ("img2img", "inpaint"):
            sources.append(recorded_image("image", self.image, self.image_hash))
        if self.mode == "inpaint":
            sources.append(recorded_image("mask_image", self.mask_image, self.mask_hash))
        return sources

    def text(self) -> str:
        """A1111's "parameters" text (images.format_parameters) with minisd's extra keys."""
        extra = {
            "Clip skip": None if self.clip_skip is None else self.clip_skip + 1,
            "Eta": self.eta or None,
            "Denoising strength": self.strength,
            "Init image": self.image,
            "Init image hash": self.image_hash,
            "Mask image": self.mask_image,
            "Mask image hash": self.mask_hash,
            "Weights": self.weights,
            "Dtype": self.dtype,
            "Device": self.device,
            "Fast": "True" if self.fast else None,
        }
        return format_parameters(
            self.prompt, self.negative_prompt, self.num_inference_steps, self.sampler, self.guidance_scale,
            self.seed, self.width, self.height, self.model_name, self.model_hash, extra,
        )  # fmt: skip

    @classmethod
    def from_text(cls, text: str) -> "GenerationParameters":
        """Read a "parameters" text that minisd wrote (A1111's own need at least Steps, Sampler, CFG scale, Seed and
        Size). The mode is inpaint with a mask, img2img with a denoising strength, txt2img otherwise."""
        fields = parse_parameters(text)
        missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in fields]
        if missing:
            raise MinisdError(f"parameters lack {', '.join(missing)}: not written by minisd or A1111")
        try:
            width, height = (int(v) for v in fields["Size"].split("x"))
            clip_skip = fields.get("Clip skip")
            strength = fields.get("Denoising strength")
            mask = fields.get("Mask image hash")
            return cls(
                mode="inpaint" if mask else "img2img" if strength else "txt2img",
                prompt=fields["Prompt"],
                negative_prompt=fields["Negative prompt"],
                num_inference_steps=int(fields["Steps"]),
                sampler=fields["Sampler"],
                guidance_scale=float(fields["CFG scale"]),
                seed=int(fields["Seed"]),
                width=width,
                height=height,
                eta=float(fields.get("Eta", 0.0)),
                clip_skip=None if clip_skip is None else int(clip_skip) - 1,
                strength=None if strength is None else float(strength),
                image=fields.get("Init image"),
                image_hash=fields.get("Init image hash"),
                mask_image=fields.get("Mask image"),
                mask_hash=mask,
                model_name=fields.get("Model"),
                model_hash=fields.get("Model hash"),
                weights=fields.get("Weights"),
                dtype=fields.get("Dtype"),
                device=fields.get("Device"),
                fast=fields.get("Fast") == "True",
            )
        except ValueError as error:
            raise MinisdError(f"parameters hold a value that is not a number: {error}") from None
