"""Bytes to model input.

Decoding is the one place where untrusted bytes become pixels, so it is also the one place that
turns bad input into an error value: a batch of a million files must not die on one of them.
Normalisation is kept apart and vectorised, so workers ship small uint8 arrays between them.
"""

import io
import re
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

# Larger than any photo a phone takes (a 200 MP sensor), far smaller than a decompression bomb.
DEFAULT_MAX_PIXELS = 200_000_000

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


class Decoded(NamedTuple):
    """One decoded image: `pixels` (HxWxC uint8) or `error`, never both."""

    pixels: np.ndarray | None
    width: int
    height: int
    error: str | None


def _failure(reason: str, width: int = 0, height: int = 0) -> Decoded:
    return Decoded(None, width, height, reason)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring high-bit-depth and float images to 8 bits by scaling, not clipping."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent images on white, the background a viewer would show."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _orientation(image: Image.Image, header_only: bool) -> int | None:
    """The EXIF orientation tag; with `header_only`, None where finding it would decode pixels."""
    if header_only and isinstance(image, PngImagePlugin.PngImageFile) and "exif" not in image.info:
        return None
    return image.getexif().get(0x0112)


def decode_image(
    data: bytes, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Decode `data` to a `size`x`size`x`channels` uint8 array, or to a short reason it cannot be.

    `width` and `height` are the upright image's own dimensions, reported even for images too
    large to decode so that a user can see why they were refused (as stored, for a PNG whose
    EXIF follows its pixels). Images over `max_pixels` are refused from their header alone.
    """
    decoded = decode_upright(data, channels, max_pixels, (size, size))
    if decoded.pixels is None or decoded.pixels.shape[:2] == (size, size):
        return decoded
    image = Image.fromarray(decoded.pixels[:, :, 0] if channels == 1 else decoded.pixels)
    image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return decoded._replace(pixels=np.asarray(image, dtype=np.uint8).reshape(size, size, channels))


def decode_upright(
    data: bytes, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None
) -> Decoded:
    """Decode `data` to the upright image (HxWx`channels` uint8, EXIF orientation applied), or to
    a short reason it cannot be; `width` and `height` are as in `decode_image`.

    With `draft`, a JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or full scale that still
    covers `draft` (width, height of the stored image): large photos cost a fraction to read.
    The pixels may then be smaller than `width` x `height`; their ratio scales boxes back.
    """
    if not data:
        return _failure("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        # The cap is checked on the header's size before anything else: a PNG's EXIF may follow
        # its pixel data, and Pillow decodes the whole image to look for it.
        if width * height > max_pixels:
            if _orientation(image, header_only=True) in _ROTATING_ORIENTATIONS:
                width, height = height, width
            return _failure(f"too many pixels: {width * height}", width, height)
        orientation = _orientation(image, header_only=False)
        if orientation in _ROTATING_ORIENTATIONS:
            width, height = height, width
        mode = "L" if channels == 1 else "RGB"
        if draft:
            image.draft(mode, draft)
        image.load()
        if orientation not in (None, 1):
            image = ImageOps.exif_transpose(image)
        image = _flatten_alpha(_to_8bit(image))
        if image.mode != mode:
            image = image.convert(mode)
        pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, channels)
        return Decoded(pixels, width, height, None)
    except UnidentifiedImageError:
        return _failure("not an image")
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return _failure(f"too many pixels: {found.group(1) if found else exc}")
    except OSError as exc:
        message = str(exc)
        if "truncated" in message or "broken data stream" in message:
            return _failure("truncated")
        return _failure(f"corrupt image: {message}")
    except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
        return _failure(f"corrupt image: {exc}")


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """NxHxWxC uint8 to NxCxHxW float32, scaled to [0, 1] then standardised per channel."""
    scale = np.asarray(std, dtype=np.float32) * 255.0
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    out = (pixels.astype(np.float32) - shift) / scale
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
