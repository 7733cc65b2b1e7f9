"""The decoding step of the scoring pipeline, in a module of its own.

Ray Data runs it in plain CPU workers, which import this module by name: keeping torch out of
its imports saves each of them seconds of start-up.
"""

import numpy as np

from emotion.preprocess import decode_image


def decode_batch(
    batch: dict[str, np.ndarray], size: int, channels: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """Bytes and paths to model-sized pixels plus per-row status, width, height and error."""
    rows = [decode_image(bytes(data), size, channels, max_pixels) for data in batch["bytes"]]
    pixels = np.zeros((len(rows), size, size, channels), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row.pixels is not None:
            pixels[i] = row.pixels
    return {
        "path": batch["path"],
        "pixels": pixels,
        "status": np.asarray(["ok" if r.error is None else "error" for r in rows], dtype=object),
        "error": np.asarray([r.error for r in rows], dtype=object),
        "width": np.asarray([r.width for r in rows], dtype=np.int32),
        "height": np.asarray([r.height for r in rows], dtype=np.int32),
    }
