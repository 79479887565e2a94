"""Images in and out: PIL <-> tensors, masks, grids, image files and PNGs carrying a "parameters" text.

    PIL RGB uint8 (h, w, 3) ──pil_to_image──▶ image (1, 3, h, w) in [-1, 1] ──(VAE, UNet)──▶ image ──image_to_pil──▶ PIL

pil_to_image and image_to_pil compute exactly what diffusers' VaeImageProcessor.preprocess / .postprocess compute
for RGB images and float32 tensors; mask_to_tensor what its inpainting mask processor computes. The "parameters"
text itself (AUTOMATIC1111's format, both ways) is minisd/parameters.py's; save_png and read_png_parameters put it
into a PNG and take it out.
"""

import math
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import torch
from einops import rearrange
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from minisd.errors import MinisdError

WHITE = (255, 255, 255)  # what transparent pixels become: A1111's default img2img_background_color "#ffffff"
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # the modes PIL can write as PNG
MAX_IMAGE_SIDE = (
    8192  # pixels: the largest picture minisd makes (pipelines/checks.py MAX_SIDE), so the largest it reads
)

# ---------------------------------------------------------------------------------------------------------------
# PIL <-> tensors


def pil_to_image(pil: Image.Image) -> Tensor:
    """A PIL image -> (1, 3, h, w) float32 in [-1, 1]: pixel / 255 · 2 − 1 (diffusers' VaeImageProcessor).

    Modes: "RGB" as is; "L" (grey) repeated into R, G, B; "RGBA", "LA" and "P" (palette, possibly with a
    transparent colour) composited over white, as A1111 flattens img2img inputs: out = (rgb·α + 255·(255 − α)) / 255
    in PIL's integer arithmetic. Other modes are refused: convert them first, e.g. pil.convert("RGB").

    >>> pil_to_image(Image.new("RGB", (2, 1), (255, 0, 51))).tolist()
    [[[[1.0, 1.0]], [[-1.0, -1.0]], [[-0.6000000238418579, -0.6000000238418579]]]]
    """
    if not isinstance(pil, Image.Image):
        raise MinisdError(f"pil must be a PIL.Image.Image, got {type(pil).__name__}")
    if pil.mode in ("RGBA", "LA", "P"):
        rgba = pil.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))  # alpha 0 keeps the white, 255 takes the pixel
        pil = flat
    elif pil.mode == "L":
        pil = pil.convert("RGB")
    elif pil.mode != "RGB":
        raise MinisdError(f"pil must be an RGB, RGBA, L, LA or P image, got mode {pil.mode!r}: use pil.convert('RGB')")
    w, h = pil.size
    pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)  # h·w·3 bytes, row by row, R G B
    pixels = rearrange(pixels, "(b h w c) -> b c h w", b=1, h=h, w=w, c=3)
    # contiguous: the channels-last view rearrange gives makes the VAE's convolutions ~50x slower on the CPU
    return (pixels.float() / 255 * 2 - 1).contiguous()


def image_to_unit(image: Tensor) -> Tensor:
    """image in [-1, 1] -> [0, 1]: image / 2 + 1/2, clipped (diffusers' VaeImageProcessor.denormalize). Any shape,
    the input's dtype.

    >>> image_to_unit(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([0.0000, 0.5000, 0.7500])
    """
    return (image / 2 + 0.5).clamp(0, 1)


def image_to_pixels(image: Tensor) -> Tensor:
    """image (b, 3, h, w) in [-1, 1] -> pixels (b, h, w, 3) uint8 on the CPU: round(image_to_unit(image) · 255)
    (diffusers' rule, round half to even), in PIL's byte order. NaN becomes 0.

    Computed in float32: equal to diffusers for float32 input; for fp16/bf16 input diffusers does the first step in
    half precision, which can differ by one level.

    >>> image_to_pixels(torch.tensor([-1.0, 0.0, 2.0]).reshape(1, 3, 1, 1)).tolist()
    [[[[0, 128, 255]]]]
    """
    image = image.detach().float().cpu().nan_to_num(-1.0)
    pixels = (image_to_unit(image) * 255).round().to(torch.uint8)
    return rearrange(pixels, "b c h w -> b h w c")  # PIL's byte order: row by row, R G B


def image_to_pil(image: Tensor) -> list[Image.Image]:
    """(b, 3, h, w) in [-1, 1] -> b RGB PIL images of image_to_pixels(image). Values outside [-1, 1] clip; NaN and
    inf are refused.

    >>> [pil.getpixel((0, 0)) for pil in image_to_pil(torch.tensor([-1.0, 0.0, 2.0]).reshape(1, 3, 1, 1))]
    [(0, 128, 255)]
    """
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        what = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
        raise MinisdError(f"image must be a floating (batch, 3, height, width) tensor, got {what}")
    if not image.isfinite().all():  # inf would clip silently to white or black
        hint = (
            "a VAE decode in float16 can overflow: decode in float32"
            if image.dtype == torch.float16
            else ("the latents were not finite: check the weights, the guidance scale and the emphasis weights")
        )
        raise MinisdError(f"image must not contain NaN or inf ({hint})")
    pixels = image_to_pixels(image)
    h, w = pixels.shape[1:3]
    return [Image.frombytes("RGB", (w, h), bytes(p.flatten().tolist())) for p in pixels]


def mask_to_tensor(pil: Image.Image, height: int, width: int) -> Tensor:
    """An inpainting mask -> (1, 1, height, width) float32 of 0.0 (keep) and 1.0 (repaint), as diffusers' inpainting
    pipeline prepares it: resized to (width, height) with Lanczos when the size differs, converted to "L" (grey;
    alpha is ignored), then pixel / 255 ≥ 0.5 is 1 (white, pixel ≥ 128), the rest 0.

    >>> mask_to_tensor(Image.new("L", (2, 1), 128), 1, 2).tolist()
    [[[[1.0, 1.0]]]]
    """
    if not isinstance(pil, Image.Image):
        raise MinisdError(f"pil must be a PIL.Image.Image, got {type(pil).__name__}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MinisdError(f"{name} must be a positive int, got {value!r}")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.Resampling.LANCZOS)  # diffusers' default resample="lanczos"
    pil = pil.convert("L")
    pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
    pixels = rearrange(pixels, "(b c h w) -> b c h w", b=1, c=1, h=height, w=width)
    return (pixels.float() / 255 >= 0.5).float()  # diffusers' binarize: < 0.5 -> 0, ≥ 0.5 -> 1


def make_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """Paste equal-size images into `rows` rows, row by row, ceil(n / rows) columns; empty cells black (A1111's
    image_grid). Returns one image of their mode, (columns · w, rows · h).

    >>> make_grid([Image.new("RGB", (4, 3))] * 5, rows=2).size  # 3 columns, the last cell empty
    (12, 6)
    """
    if not isinstance(images, list) or not images or not all(isinstance(im, Image.Image) for im in images):
        raise MinisdError(f"images must be a non-empty list of PIL images, got {images!r:.80}")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= len(images):
        raise MinisdError(f"rows must be an int in [1, {len(images)}] (the number of images), got {rows!r}")
    w, h = images[0].size
    mode = images[0].mode
    for i, im in enumerate(images):
        if im.size != (w, h) or im.mode != mode:
            raise MinisdError(
                f"images must share one size and mode ({w}x{h} {mode}), got {im.size[0]}x{im.size[1]} "
                f"{im.mode} at index {i}"
            )
    cols = math.ceil(len(images) / rows)
    grid = Image.new(mode, (cols * w, rows * h))  # zeros: black
    for i, im in enumerate(images):
        grid.paste(im, (i % cols * w, i // cols * h))
    return grid


MAX_DOWNLOAD = 64 << 20  # bytes: load_image refuses larger answers (a 4096² PNG is ~50 MB at most)


def load_image(image: str | os.PathLike | Image.Image, timeout: float = 30.0) -> Image.Image:
    """An image from a path, an http(s) URL or a PIL image -> an RGB PIL image, turned upright by its EXIF
    orientation (what diffusers.utils.load_image returns, so the course's examples run unchanged).

    URLs are fetched with the standard library (at most MAX_DOWNLOAD bytes, `timeout` seconds); any failure is one
    MinisdError line.
    """
    import io
    import urllib.error
    import urllib.request

    if isinstance(image, str) and image.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(image, timeout=timeout) as response:
                data = response.read(MAX_DOWNLOAD + 1)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise MinisdError(f"cannot download {image}: {getattr(error, 'reason', error)}") from None
        if len(data) > MAX_DOWNLOAD:
            raise MinisdError(f"{image}: larger than {MAX_DOWNLOAD >> 20} MB, not loaded")
        source = io.BytesIO(data)
    elif isinstance(image, str | os.PathLike):  # opened once, a regular file, its size checked, upright
        return open_image("image", image).convert("RGB")
    elif isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    else:
        raise MinisdError(f"image must be a path, an http(s) URL or a PIL image, got {type(image).__name__}")
    with _open_pil("image", source, image) as pil:  # the declared size checked before any pixel is decoded
        try:
            return ImageOps.exif_transpose(pil).convert("RGB")
        except Exception as error:  # truncated or corrupt pixel data, a crafted EXIF block: PIL raises many kinds
            raise MinisdError(f"cannot read {image} as an image ({type(error).__name__})") from None


def make_image_grid(images: list[Image.Image], rows: int, cols: int, resize: int | None = None) -> Image.Image:
    """rows × cols images in one RGB picture, row by row, each cell the first image's size (diffusers.utils'
    make_image_grid: a smaller image sits in its cell's top-left corner, black around). resize: first resize every
    image to resize × resize.

    >>> make_image_grid([Image.new("RGB", (4, 3))] * 2, rows=1, cols=2).size
    (8, 3)
    """
    if not isinstance(images, list) or not images or not all(isinstance(im, Image.Image) for im in images):
        raise MinisdError(f"images must be a non-empty list of PIL images, got {images!r:.80}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (rows, cols)):
        raise MinisdError(f"rows and cols must be integers >= 1, got {rows!r} and {cols!r}")
    if rows * cols != len(images):
        raise MinisdError(f"rows × cols must equal the number of images ({len(images)}), got {rows} × {cols}")
    if resize is not None:
        images = [im.resize((resize, resize)) for im in images]
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * w, i // cols * h))
    return grid


# ---------------------------------------------------------------------------------------------------------------
# Image files


def open_file(name: str, path: str | os.PathLike) -> BinaryIO:
    """A regular file opened once for reading (binary), or a one-line MinisdError: missing, a folder, a FIFO, socket or
    device (opened without waiting for a writer, then refused: reading it could block forever), unreadable.
    Checking the path and then opening it would leave a gap in which it can change; this opens, then checks."""
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO opens at once instead of waiting
    except FileNotFoundError:
        raise MinisdError(f"{name}: no such file: {shown!r}") from None
    except OSError as error:
        raise MinisdError(f"{name}: cannot read {shown!r} ({error.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "the folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise MinisdError(f"{name} must be a regular file, got {what} {shown!r}")
    return os.fdopen(fd, "rb")


def _open_pil(name: str, file: BinaryIO, shown: str) -> Image.Image:
    """Image.open on an open file, its size checked before any pixel is decoded (a 296 KB PNG can declare
    10000×10000: 300 MB decoded); PIL's decompression-bomb warning and error are the same one-line refusal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MinisdError(f"{name}: {shown!r} declares more pixels than {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}") from None
    except Exception as error:  # PIL raises many kinds for a crafted file: each is "not an image we can read"
        raise MinisdError(f"{name}: cannot read {shown!r} as an image ({error.__class__.__name__})") from None
    if max(pil.size) > MAX_IMAGE_SIDE:
        raise MinisdError(
            f"{name}: {shown!r} is {pil.width}x{pil.height} pixels; images go up to {MAX_IMAGE_SIDE} on a side"
        )
    return pil


def open_image(name: str, path: str | os.PathLike) -> Image.Image:
    """An image file, opened once, checked, fully read and upright: its EXIF orientation applied (a phone photo
    stores its pixels sideways and says so), as diffusers' load_image and A1111 do. A one-line MinisdError for a
    missing, unreadable or special file (open_file), a file PIL cannot read, or one over MAX_IMAGE_SIDE."""
    with open_file(name, path) as file, _open_pil(name, file, os.fspath(path)) as pil:
        try:
            pil.load()
            return ImageOps.exif_transpose(pil)  # a transposed copy, or a plain copy when upright already
        except Exception as error:  # truncated or corrupt pixel data, a crafted EXIF block: PIL raises many kinds
            shown = f"{os.fspath(path)!r} as an image ({error.__class__.__name__})"
            raise MinisdError(f"{name}: cannot read {shown}") from None


def save_png(pil: Image.Image, path: str | os.PathLike, parameters: str | None, overwrite: bool = False) -> None:
    """Write `pil` as a PNG with `parameters` in a text chunk named "parameters" (tEXt; iTXt, UTF-8, when the text
    is not Latin-1, PIL's rule), where A1111 and most SD tools look; None writes none (a grid, say). An existing
    file is an error unless overwrite."""
    if not isinstance(pil, Image.Image):
        raise MinisdError(f"pil must be a PIL.Image.Image, got {type(pil).__name__}")
    if pil.mode not in PNG_MODES:
        raise MinisdError(f"pil mode must be one of {PNG_MODES} to be saved as PNG, got {pil.mode!r}")
    if parameters is not None and not isinstance(parameters, str):
        raise MinisdError(f"parameters must be a str or None, got {type(parameters).__name__}")
    if not isinstance(path, str | os.PathLike):
        raise MinisdError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise MinisdError(f"path must be in an existing folder, got {str(path)!r}")
    if path.is_dir():
        raise MinisdError(f"path must be a file name, got the folder {str(path)!r}")
    if path.exists() and not path.is_file():  # opening a FIFO to write waits for a reader: forever
        raise MinisdError(f"path must be a regular file, got a pipe, socket or device: {str(path)!r}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    try:
        with open(path, "wb" if overwrite else "xb") as f:  # "x": fail if it exists, checked and created at once
            pil.save(f, format="PNG", pnginfo=info)
    except FileExistsError:
        raise MinisdError(f"path already exists (pass overwrite=True to replace it): {str(path)!r}") from None


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The "parameters" text of a PNG (A1111's or save_png's), or None when it has none. A PNG whose (compressed)
    text inflates past PIL's limit is refused, not read; the text's own limit is parameters.parse_parameters'."""
    if not isinstance(path, str | os.PathLike):
        raise MinisdError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with open_file("the PNG", path) as file, _open_pil("the PNG", file, os.fspath(path)) as im:
        if im.format != "PNG":
            raise MinisdError(f"the PNG must be a PNG file, got a {im.format} file: {os.fspath(path)!r}")
        try:
            text = im.text.get("parameters")  # .text also reads text chunks stored after the pixels
        except Exception as error:  # PIL: "Decompressed Data Too Large", a truncated or crafted file
            raise MinisdError(f"the PNG: cannot read the text of {os.fspath(path)!r} ({error})") from None
    return text
