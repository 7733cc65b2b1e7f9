import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from emotion.preprocess import decode_image, normalize
from tests.images import decompression_bomb, exif_rotated, image_in_mode, jpeg

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "animated"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_the_model_shape(mode, channels):
    decoded = decode_image(image_in_mode(mode), 48, channels)
    assert decoded.error is None
    assert decoded.pixels.shape == (48, 48, channels)
    assert decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (64, 40)
    assert decoded.pixels.std() > 5, "content survived the conversion"


def test_sixteen_bit_is_scaled_not_clipped():
    decoded = decode_image(image_in_mode("I;16"), 48, 1)
    reference = decode_image(image_in_mode("L"), 48, 1)
    assert np.abs(decoded.pixels.astype(int) - reference.pixels.astype(int)).max() <= 2


def test_transparency_is_composited_on_white():
    decoded = decode_image(image_in_mode("RGBA"), 48, 1)
    reference = decode_image(image_in_mode("L"), 48, 1)
    # Half-transparent pixels sit halfway between the image and white.
    assert abs(decoded.pixels.mean() - (reference.pixels.mean() + 255) / 2) < 3


def test_exif_orientation_is_applied():
    decoded = decode_image(exif_rotated(6), 48, 1)
    assert (decoded.width, decoded.height) == (30, 60)
    # Rotated 90 degrees clockwise, the dark left half becomes the top half.
    top, bottom = decoded.pixels[:20].mean(), decoded.pixels[-20:].mean()
    assert top < 60 < 200 < bottom


def test_a_48px_face_passes_through_unchanged():
    data = jpeg()
    decoded = decode_image(data, 48, 1)
    assert np.array_equal(decoded.pixels[..., 0], np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, this is text saved as .jpg\n", "not an image"),
        (b"<!doctype html><html><body>404</body></html>", "not an image"),
        (jpeg(256)[:700], "truncated"),
        (decompression_bomb(), "too many pixels: 3600000000"),
    ],
)
def test_undecodable_input_is_an_error_value(data, reason):
    decoded = decode_image(data, 48, 1)
    assert decoded.pixels is None
    assert decoded.error == reason


def test_pixel_limit_is_configurable():
    decoded = decode_image(jpeg(100), 48, 1, max_pixels=99 * 99)
    assert decoded.error == "too many pixels: 10000"
    assert (decoded.width, decoded.height) == (100, 100)


def test_pixel_limit_refuses_from_the_header_without_decoding(monkeypatch):
    """A PNG's EXIF lookup decodes the image, so the cap must come first (a 13,000 x 13,000 PNG
    is half a megabyte and would cost its full size in memory)."""
    png = io.BytesIO()
    Image.new("RGB", (3000, 2000), (120, 130, 140)).save(png, "PNG")

    def refuse_to_decode(self, *args, **kwargs):
        raise AssertionError("pixels decoded for an image over the cap")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse_to_decode)
    decoded = decode_image(png.getvalue(), 48, 1, max_pixels=1000 * 1000)
    assert decoded.error == "too many pixels: 6000000"
    assert (decoded.width, decoded.height) == (3000, 2000)


def test_pixel_limit_reports_upright_dimensions_of_a_rotated_jpeg():
    decoded = decode_image(exif_rotated(6), 48, 1, max_pixels=100)
    assert decoded.error == "too many pixels: 1800"
    assert (decoded.width, decoded.height) == (30, 60)


def test_normalize_is_vectorised_nchw():
    pixels = np.stack([np.full((48, 48, 1), v, np.uint8) for v in (0, 255)])
    out = normalize(pixels, (0.5,), (0.25,))
    assert out.shape == (2, 1, 48, 48) and out.dtype == np.float32
    assert np.allclose(out[0], -2.0) and np.allclose(out[1], 2.0)
