"""Images: pixels <-> tensors exactly as diffusers' VaeImageProcessor, PNG files carrying a "parameters" text, grids.
(The text format itself: tests/test_parameters.py.)"""

import json

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from minisd.errors import MinisdError
from minisd.images import image_to_pil, make_grid, mask_to_tensor, pil_to_image, read_png_parameters, save_png
from tests.test_parameters import A1111_TEXT


def random_pil(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """A random image of `mode` ("L", "RGB", "RGBA", "LA"), every byte drawn uniformly."""
    n_bands = len(Image.new(mode, (1, 1)).getbands())
    data = torch.randint(0, 256, (h * w * n_bands,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.frombytes(mode, (w, h), bytes(data.tolist()))


def assert_one_line_error(call, fragment: str) -> None:
    with pytest.raises(MinisdError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


# -- PIL <-> tensors ------------------------------------------------------------------------------------------------


def test_pil_to_image_equals_diffusers_exactly():
    pil = random_pil("RGB", 24, 16, seed=0)  # a multiple of 8, so diffusers does not resize
    want = VaeImageProcessor().preprocess(pil)
    got = pil_to_image(pil)
    assert got.shape == (1, 3, 16, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_grey_image_is_repeated_into_rgb_as_diffusers_convert_rgb():
    pil = random_pil("L", 24, 16, seed=1)
    torch.testing.assert_close(
        pil_to_image(pil), VaeImageProcessor(do_convert_rgb=True).preprocess(pil), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_over_white_as_a1111(mode):
    pil = random_pil(mode, 24, 16, seed=2)
    # A1111's images.flatten(img, "#ffffff"): paste onto a white RGBA canvas through the image's own alpha.
    canvas = Image.new("RGBA", pil.size, "#ffffff")
    canvas.paste(pil.convert("RGBA"), mask=pil.convert("RGBA"))
    torch.testing.assert_close(pil_to_image(pil), pil_to_image(canvas.convert("RGB")), rtol=0, atol=0)
    # ... which is rgb·α + white·(1 − α), to PIL's integer rounding (≤ 1 level of 255, 2/255 in [-1, 1]).
    rgba = pil_to_image(pil.convert("RGBA").convert("RGB")), pil_to_image(pil.getchannel("A").convert("RGB"))
    alpha = (rgba[1] + 1) / 2
    torch.testing.assert_close(pil_to_image(pil), rgba[0] * alpha + (1 - alpha), rtol=0, atol=2 / 255 + 1e-6)


def test_opaque_and_transparent_extremes():
    rgb = random_pil("RGB", 8, 8, seed=3)
    opaque = rgb.copy()
    opaque.putalpha(255)
    torch.testing.assert_close(pil_to_image(opaque), pil_to_image(rgb), rtol=0, atol=0)
    clear = rgb.copy()
    clear.putalpha(0)
    assert pil_to_image(clear).eq(1.0).all()  # fully transparent -> white


def test_palette_image_with_a_transparent_colour():
    pil = Image.new("P", (4, 2), 0)
    pil.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    pil.putpixel((1, 0), 1)
    pil.info["transparency"] = 1  # blue is the transparent colour
    got = image_to_pil(pil_to_image(pil))[0]
    assert got.getpixel((0, 0)) == (255, 0, 0) and got.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["CMYK", "F", "I", "1", "YCbCr"])
def test_other_modes_are_refused(mode):
    assert_one_line_error(lambda: pil_to_image(Image.new(mode, (8, 8))), "convert('RGB')")


def test_pil_to_image_refuses_non_images():
    assert_one_line_error(lambda: pil_to_image(torch.zeros(1, 3, 8, 8)), "pil must be a PIL.Image.Image")


def test_image_to_pil_equals_diffusers_exactly():
    image = torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 0.7  # some beyond [-1, 1]
    image[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.0, 2.0, -3.0, 0.5])
    want = VaeImageProcessor().postprocess(image, output_type="pil")
    got = image_to_pil(image)
    assert len(got) == 3 and all(g.mode == "RGB" and g.size == (24, 16) for g in got)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]


def test_pixels_round_trip():
    pil = random_pil("RGB", 40, 8, seed=5)
    assert image_to_pil(pil_to_image(pil))[0].tobytes() == pil.tobytes()
    half = pil_to_image(pil).half()  # half precision still lands on the same levels
    assert image_to_pil(half)[0].tobytes() == pil.tobytes()


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (torch.zeros(3, 8, 8), "(batch, 3, height, width)"),
        (torch.zeros(1, 4, 8, 8), "(batch, 3, height, width)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating"),
        ("image", "got str"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    ],
)
def test_image_to_pil_bad_input(image, fragment):
    assert_one_line_error(lambda: image_to_pil(image), fragment)


MASK_PROCESSOR = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)  # diffusers'


@pytest.mark.parametrize(("mode", "size"), [("L", (24, 16)), ("RGB", (24, 16)), ("RGBA", (24, 16)), ("L", (37, 29))])
def test_mask_equals_diffusers_inpainting_mask_exactly(mode, size):
    pil = random_pil(mode, *size, seed=6)
    want = MASK_PROCESSOR.preprocess(pil, height=16, width=24)  # (37, 29) is resized with Lanczos
    got = mask_to_tensor(pil, 16, 24)
    assert got.shape == (1, 1, 16, 24) and set(got.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mask_threshold_is_128():
    pil = Image.frombytes("L", (4, 1), bytes([0, 127, 128, 255]))
    assert mask_to_tensor(pil, 1, 4).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(("height", "width", "fragment"), [(0, 8, "height"), (8, 8.0, "width"), (True, 8, "height")])
def test_mask_bad_size(height, width, fragment):
    assert_one_line_error(lambda: mask_to_tensor(Image.new("L", (8, 8)), height, width), f"{fragment} must be")


# -- grids ----------------------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def test_grid_layout_is_row_by_row():
    grid = make_grid([Image.new("RGB", (4, 3), c) for c in COLOURS], rows=2)
    assert grid.size == (12, 6) and grid.mode == "RGB"
    corners = [(0, 0), (4, 0), (8, 0), (0, 3), (4, 3), (8, 3)]
    assert [grid.getpixel(xy) for xy in corners] == [*COLOURS, (0, 0, 0)]  # the sixth cell is empty: black
    assert make_grid([Image.new("RGB", (4, 3))] * 3, rows=3).size == (4, 9)  # one column


@pytest.mark.parametrize(
    ("images", "rows", "fragment"),
    [
        ([], 1, "non-empty list"),
        ([Image.new("RGB", (4, 3))] * 2, 0, "rows must be an int in [1, 2]"),
        ([Image.new("RGB", (4, 3))] * 2, 3, "rows must be an int in [1, 2]"),
        ([Image.new("RGB", (4, 3)), Image.new("RGB", (3, 4))], 1, "one size and mode"),
        ([Image.new("RGB", (4, 3)), Image.new("L", (4, 3))], 1, "one size and mode"),
        ([Image.new("RGB", (4, 3)), "image"], 1, "non-empty list"),
    ],
)
def test_grid_bad_input(images, rows, fragment):
    assert_one_line_error(lambda: make_grid(images, rows), fragment)


# -- PNG files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [A1111_TEXT, "猫 (cat:1.2), emoji 🐈\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 0"]
)
def test_png_round_trip(tmp_path, text):
    pil = random_pil("RGB", 16, 8, seed=7)
    path = tmp_path / "out.png"
    save_png(pil, path, text)
    assert read_png_parameters(path) == text  # Latin-1 in a tEXt chunk, the rest in iTXt
    with Image.open(path) as im:
        assert im.format == "PNG" and im.tobytes() == pil.tobytes()


def test_png_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (4, 4)), path, "first")
    assert_one_line_error(lambda: save_png(Image.new("RGB", (4, 4)), path, "second"), "overwrite=True")
    assert read_png_parameters(path) == "first"
    save_png(Image.new("RGB", (4, 4)), str(path), "second", overwrite=True)
    assert read_png_parameters(str(path)) == "second"


def test_png_without_parameters_reads_none(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_parameters(tmp_path / "plain.png") is None


def test_png_bad_paths(tmp_path):
    pil = Image.new("RGB", (4, 4))
    assert_one_line_error(lambda: save_png(pil, tmp_path / "missing" / "x.png", "p"), "existing folder")
    assert_one_line_error(lambda: save_png(pil, tmp_path, "p"), "folder")
    assert_one_line_error(lambda: save_png(pil, tmp_path / "x.png", 3), "parameters must be a str or None")
    save_png(pil, tmp_path / "grid.png", None)  # a picture with no parameters text (a grid)
    assert read_png_parameters(tmp_path / "grid.png") is None
    assert_one_line_error(lambda: save_png(Image.new("CMYK", (4, 4)), tmp_path / "x.png", "p"), "mode")
    assert_one_line_error(lambda: save_png("pil", tmp_path / "x.png", "p"), "pil must be")
    assert_one_line_error(lambda: read_png_parameters(tmp_path / "nope.png"), "no such file")
    pil.save(tmp_path / "x.jpg")
    assert_one_line_error(lambda: read_png_parameters(tmp_path / "x.jpg"), "PNG")
    (tmp_path / "junk.png").write_text(json.dumps({"not": "an image"}))
    assert_one_line_error(lambda: read_png_parameters(tmp_path / "junk.png"), "cannot read")
