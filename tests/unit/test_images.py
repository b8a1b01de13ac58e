"""Image decoding for captioning and evaluation: every PIL mode becomes the right 8-bit
RGB (high bit depths scaled, never clipped), bombs and tiny images are handled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmfix.caption import load_image, to_rgb
from vlmfix.errors import DataError

GREY = 128  # every case below draws mid-grey in its own mode

# mode -> a 4x4 mid-grey image in that mode
CASES = {
    "1": lambda: Image.new("1", (4, 4), 1),  # 1-bit: white, checked separately
    "L": lambda: Image.new("L", (4, 4), GREY),
    "P": lambda: Image.new("L", (4, 4), GREY).convert("P"),
    "PA": lambda: Image.new("LA", (4, 4), (GREY, 255)).convert("PA"),
    "LA": lambda: Image.new("LA", (4, 4), (GREY, 255)),
    "La": lambda: Image.new("La", (4, 4), (GREY, 255)),
    "RGB": lambda: Image.new("RGB", (4, 4), (GREY,) * 3),
    "RGBA": lambda: Image.new("RGBA", (4, 4), (GREY, GREY, GREY, 255)),
    "RGBa": lambda: Image.new("RGBa", (4, 4), (GREY, GREY, GREY, 255)),
    "RGBX": lambda: Image.new("RGBX", (4, 4), (GREY, GREY, GREY, 0)),
    "CMYK": lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 255 - GREY)),
    "YCbCr": lambda: Image.new("YCbCr", (4, 4), (GREY, 128, 128)),
    "HSV": lambda: Image.new("HSV", (4, 4), (0, 0, GREY)),
    "LAB": lambda: Image.new("LAB", (4, 4), (int(0.5365 * 255), 128, 128)),  # L* 53.6 = sRGB 128
    "I": lambda: Image.fromarray(np.full((4, 4), GREY * 257, dtype=np.int32)),  # 16-bit data in I
    "I;16": lambda: Image.fromarray(np.full((4, 4), GREY * 257, dtype=np.uint16)),
    "I;16B": lambda: Image.new("I;16B", (4, 4), GREY * 257),
    "F": lambda: Image.fromarray(np.full((4, 4), GREY / 255, dtype=np.float32)),  # [0, 1] floats
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_every_mode_becomes_the_same_grey(mode):
    im = CASES[mode]()
    assert im.mode == mode
    rgb = np.asarray(to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    want = 255 if mode == "1" else GREY
    assert np.abs(rgb.astype(int) - want).max() <= 2, f"{mode}: got {rgb[0, 0].tolist()}"


def test_every_pil_mode_is_covered():
    from PIL import Image as _Image

    modes = set(getattr(_Image, "MODES", [])) or {m for m in CASES}
    legacy = {"I;16L", "I;16N", "BGR;15", "BGR;16", "BGR;24"}  # aliases / deprecated packings
    assert modes - legacy <= set(CASES), sorted(modes - legacy - set(CASES))


def test_sixteen_bit_range_is_scaled_not_clipped():
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(ramp)))[0, :, 0].tolist() == [0, 1, 128, 255]
    ints = np.array([[-100_000, 0, 500_000, 1_000_000]], dtype=np.int32)  # outside 16 bits: own range
    got = np.asarray(to_rgb(Image.fromarray(ints)))[0, :, 0].tolist()
    assert got[0] == 0 and got[-1] == 255 and got[1] < got[2] < got[3]


def test_sixteen_bit_grayscale_png_file(tmp_path):
    """A 16-bit PNG used to come out all white (values clipped at 255)."""
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    px = load_image(path).getpixel((0, 0))
    assert px == (156, 156, 156)  # 40000 / 257


def test_cmyk_jpeg_file(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # red
    r, g, b = load_image(path).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_one_pixel_image(tmp_path):
    path = tmp_path / "px.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    im = load_image(path)
    assert im.size == (1, 1) and im.getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_record_says_how_to_raise_the_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(DataError, match=r"400 pixels exceeds the limit of 100.*--max-pixels"):
        load_image(path, max_pixels=100)


def test_max_pixels_above_pils_own_limit_is_honoured(tmp_path, monkeypatch):
    """--max-pixels is the one limit: raising it above PIL's default really lets the image in."""
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # stands in for PIL's 89M default
    assert load_image(path, max_pixels=1000).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 50  # restored
    with pytest.raises(DataError, match="--max-pixels"):
        load_image(path, max_pixels=300)
