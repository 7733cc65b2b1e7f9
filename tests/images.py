"""Image bytes of every kind the decoder must handle, built with Pillow so tests need no fixtures."""

import io

import numpy as np
from PIL import Image


def labelled_faces(root, folders, per_class: int) -> None:
    """A labelled folder: one sub-folder per name in `folders`, each class its own brightness, so a
    model can learn them apart in a few epochs."""
    rng = np.random.default_rng(0)
    for k, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(20 + 30 * k, 8, (48, 48)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / folder / f"{i}.png")


def face_like(size: int = 48, seed: int = 0) -> np.ndarray:
    """A deterministic grayscale pattern with structure (not constant), size x size uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return np.clip(base + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(size: int = 48, seed: int = 0) -> bytes:
    return encode(Image.fromarray(face_like(size, seed), "L"), "JPEG", quality=95)


def image_in_mode(mode: str) -> bytes:
    """A 64x40 image in Pillow `mode`, saved in a format that keeps that mode."""
    gray = Image.fromarray(face_like(64)[:40], "L")
    if mode == "1":
        return encode(gray.convert("1"), "PNG")
    if mode == "L":
        return encode(gray, "PNG")
    if mode == "LA":
        return encode(Image.merge("LA", [gray, gray.point(lambda v: 255 - v)]), "PNG")
    if mode == "P":
        return encode(gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    if mode == "RGB":
        return encode(gray.convert("RGB"), "JPEG")
    if mode == "RGBA":
        rgba = gray.convert("RGBA")
        rgba.putalpha(128)
        return encode(rgba, "PNG")
    if mode == "CMYK":
        return encode(gray.convert("RGB").convert("CMYK"), "JPEG")
    if mode == "I;16":
        wide = (np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16)
        return encode(Image.fromarray(wide), "PNG")
    if mode == "animated":
        frames = [gray.convert("P"), Image.new("P", gray.size, 0)]
        return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    raise ValueError(mode)


def exif_rotated(orientation: int = 6) -> bytes:
    """A 60x30 JPEG, dark left half, whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    pixels = np.full((30, 60), 230, np.uint8)
    pixels[:, :30] = 20
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels, "L"), "JPEG", exif=exif.tobytes(), quality=95)


def decompression_bomb(side: int = 60_000) -> bytes:
    """A tiny PNG that claims side x side pixels: a 1-bit image compresses to almost nothing."""
    return encode(Image.new("1", (side, side)), "PNG")


def large_photo(width: int = 4000, height: int = 3000) -> bytes:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (height // 100, width // 100, 3), dtype=np.uint8)
    return encode(Image.fromarray(small).resize((width, height)), "JPEG", quality=80)


def bad_input_corpus(root) -> dict[str, str | None]:
    """Write the mixed folder the scoring job must survive; returns relative path -> expected error.

    None means the file must be scored. Names include spaces, non-ASCII characters, upper-case
    extensions and nested folders, because real buckets have all of them.
    """
    files: dict[str, tuple[bytes, str | None]] = {
        "faces/face 1.jpg": (jpeg(seed=1), None),
        "faces/visage-été.JPG": (jpeg(seed=2), None),
        "faces/deep/nested/face3.jpeg": (jpeg(seed=3), None),
        "modes/cmyk.jpg": (image_in_mode("CMYK"), None),
        "modes/sixteen.png": (image_in_mode("I;16"), None),
        "modes/rgba.PNG": (image_in_mode("RGBA"), None),
        "modes/palette.png": (image_in_mode("P"), None),
        "modes/animated.gif": (image_in_mode("animated"), None),
        "modes/rotated.jpg": (exif_rotated(6), None),
        "modes/tiny.png": (encode(Image.new("L", (2, 2), 100), "PNG"), None),
        "modes/photo 4000x3000.jpg": (large_photo(), None),
        "bad/truncated.jpg": (jpeg(256)[:700], "truncated"),
        "bad/zero.jpg": (b"", "empty file"),
        "bad/notes.jpg": (b"these are my notes, not a picture\n", "not an image"),
        "bad/page.png": (b"<!DOCTYPE html><html><head></head><body>Not found</body></html>", "not an image"),
        "bad/bomb.png": (decompression_bomb(), "too many pixels: 3600000000"),
    }
    for relative, (data, _) in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "bad" / "readme.txt").write_text("not an image extension: must be ignored")
    return {relative: error for relative, (_, error) in files.items()}
