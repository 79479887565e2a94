"""VAE tiling: decode (and encode) large images in overlapping tiles, so memory no longer grows with the image.

The VAE decoder's activations are the biggest tensors of a Stable Diffusion run: 128 to 512 channels at the full
image size (a 512×512 decode holds several (1, 256, 512, 512) maps, 256 MiB each in fp32). Decoding the latents
tile by tile bounds that by the tile's size. Each tile is decoded alone, so neighbouring tiles disagree slightly
near their edges (the decoder's convolutions see different borders, and GroupNorm sees different statistics);
the tiles overlap and the overlaps are cross-faded linearly, so no hard seam shows. The result is close to, not
equal to, the untiled decode (tests/test_tiling.py measures how close).

    tile_size   side of one tile, in latent pixels (8× that in image pixels)
    overlap     latent pixels shared by neighbouring tiles; tiles start every tile_size − overlap latent pixels

Numerically equal to diffusers' AutoencoderKL.enable_tiling() (`tiled_decode`, `_tiled_encode`) with
tile_latent_min_size = tile_size, tile_sample_min_size = 8 · tile_size, tile_overlap_factor = overlap / tile_size
(diffusers' SD v1 defaults: 64, 512, 0.25, i.e. tile_size=64, overlap=16 here), including its choices:
  - nothing is tiled unless the input is larger than one tile (then this is the plain decode/encode);
  - tiles start at 0, stride, 2·stride, … while inside the input, so the last ones may be narrow;
  - each tile is blended, in place, first with the (already blended) tile above, then with the (already blended)
    tile to its left, over `overlap` latent pixels (8·overlap image pixels) or the narrower tile's size;
  - each blended tile keeps its first stride rows and columns (the rest is covered by the next tile).
The encoder is tiled the same way in image space; the blended quantities are its moments [mean, log σ²] (before
DiagonalGaussian clamps log σ²).

Tiles are decoded one row at a time and only the previous row is kept (diffusers keeps all of them), so peak
memory is the output plus two rows of tiles plus one tile's activations. The functions take the VAE as an
argument and change nothing in it: tiling is a way of calling the VAE, not a flag inside vae.py.
"""

import torch
from torch import Tensor

from minisd.errors import MinisdError
from minisd.vae import VAE, DiagonalGaussian

TILE_SIZE = 64  # latent pixels: 512 image pixels, SD v1's training size (diffusers tile_latent_min_size)
OVERLAP = 16  # latent pixels: a quarter of the tile (diffusers tile_overlap_factor = 0.25)


def check_tiles(tile_size: int, overlap: int) -> None:
    """One-line errors unless tile_size >= 1 and 0 <= overlap < tile_size (integers, in latent pixels)."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise MinisdError(f"tile_size must be an integer >= 1 (latent pixels), got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise MinisdError(f"overlap must be an integer in [0, tile_size={tile_size}), got {overlap!r}")


def blend_down(above: Tensor, below: Tensor, extent: int) -> None:
    """Cross-fade the top `extent` rows of `below` from the bottom rows of `above`, in place.

    above, below: (b, c, h, w) tiles of one column. Row y of the overlap becomes
    above[−extent + y] · (1 − y/extent) + below[y] · (y/extent): all `above` at the top, towards `below` going down.
    The weights are computed in float64 and rounded to the tiles' dtype: for float32 tiles exactly the numbers
    diffusers' Python-float weights give (for float16 tiles diffusers multiplies in float32: a last-bit difference).
    """
    extent = min(above.shape[2], below.shape[2], extent)
    if extent == 0:
        return
    w = (torch.arange(extent, dtype=torch.float64) / extent).reshape(extent, 1)  # y / extent, one per row
    w = w.to(device=below.device)
    below[:, :, :extent] = above[:, :, -extent:] * (1 - w).to(below.dtype) + below[:, :, :extent] * w.to(below.dtype)


def blend_right(left: Tensor, right: Tensor, extent: int) -> None:
    """Cross-fade the left `extent` columns of `right` from the right columns of `left`, in place (as blend_down,
    along the width). left, right: (b, c, h, w) tiles of one row."""
    extent = min(left.shape[3], right.shape[3], extent)
    if extent == 0:
        return
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(device=right.device)  # x / extent, one per column
    right[..., :extent] = left[..., -extent:] * (1 - w).to(right.dtype) + right[..., :extent] * w.to(right.dtype)


def run_tiled(x: Tensor, fn, tile_in: int, stride_in: int, blend: int, keep: int) -> Tensor:
    """Apply fn to overlapping tiles of x and blend the results back into one tensor.

    x: (b, c, H, W). fn maps a (b, c, h, w) tile to (b, c', f·h, f·w) (f = 8 for decoding, 1/8 for encoding).
    tile_in / stride_in: tile side and start spacing in x's pixels; blend: overlap in fn's output pixels;
    keep: how many output rows/columns of each blended tile are kept. Returns (b, c', f·H, f·W).
    """
    height, width = x.shape[-2:]
    previous_row: list[Tensor] = []
    result_rows = []
    for i in range(0, height, stride_in):
        row = []
        for j, left in enumerate(range(0, width, stride_in)):
            tile = fn(x[:, :, i : i + tile_in, left : left + tile_in])
            if previous_row:
                blend_down(previous_row[j], tile, blend)  # with the tile above (already blended itself)
            if row:
                blend_right(row[-1], tile, blend)  # with the tile to the left (already blended itself)
            row.append(tile)
        result_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
        previous_row = row  # the row before it is no longer needed: only the one above is blended with
    return torch.cat(result_rows, dim=2)


def tiled_decode(vae: VAE, vae_latents: Tensor, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> Tensor:
    """vae.decode in overlapping tiles: vae_latents (b, 4, h, w), unscaled -> image (b, 3, 8h, 8w).

    tile_size, overlap: latent pixels (module docstring). Latents no larger than one tile are decoded whole.
    Equal to diffusers' AutoencoderKL.tiled_decode with the same tile settings.
    """
    check_tiles(tile_size, overlap)
    c = vae.config.latent_channels
    if vae_latents.ndim != 4 or vae_latents.shape[1] != c:
        raise MinisdError(f"vae_latents must have shape (b, {c}, h, w), got {tuple(vae_latents.shape)}")
    if max(vae_latents.shape[-2:]) <= tile_size:
        return vae.decode(vae_latents)
    f = vae.config.downscale_factor
    stride = tile_size - overlap
    return run_tiled(vae_latents, vae.decode, tile_size, stride, blend=f * overlap, keep=f * stride)


def tiled_encode(vae: VAE, image: Tensor, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> DiagonalGaussian:
    """vae.encode in overlapping tiles: image (b, 3, H, W) in [-1, 1] -> q(z | image) over (b, 4, H/8, W/8).

    tile_size, overlap: latent pixels (tiles of 8·tile_size image pixels). Images no larger than one tile are
    encoded whole. Equal to diffusers' AutoencoderKL encode with enable_tiling() and the same tile settings.
    """
    check_tiles(tile_size, overlap)
    c, f = vae.config.in_channels, vae.config.downscale_factor
    if image.ndim != 4 or image.shape[1] != c:
        raise MinisdError(f"image must have shape (b, {c}, H, W), got {tuple(image.shape)}")
    if image.shape[2] % f or image.shape[3] % f:
        raise MinisdError(f"image height and width must be multiples of {f}, got {tuple(image.shape[2:])}")
    if max(image.shape[-2:]) <= f * tile_size:
        return vae.encode(image)

    def moments(tile: Tensor) -> Tensor:
        """(b, 3, 8h, 8w) image tile -> (b, 8, h, w) [mean, log σ²], unclamped: what the tiles blend."""
        return vae.quant_conv(vae.encoder(tile))

    stride = tile_size - overlap
    return DiagonalGaussian(run_tiled(image, moments, f * tile_size, f * stride, blend=overlap, keep=stride))
