"""The photo with each face's box and emotion drawn on it: what `POST /annotate` answers.

Drawing is kept apart from the endpoint so that it stays a pure function of pixels and results,
testable without a server. Line width and text size follow the photo's size, so the drawing stays
readable on a phone photo and does not swamp a small crop.
"""

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# One colour per class index, far apart from each other and from skin tones' greys.
PALETTE = ((230, 25, 75), (60, 180, 75), (145, 30, 180), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128))


class LabelledFace(NamedTuple):
    """One face to draw: its box (x, y, w, h) in the photo's pixels, or None when the whole photo
    was taken as the face; its predicted class index and label; its confidence (0..1)."""

    box: tuple[int, int, int, int] | None
    predicted_class: int
    label: str
    confidence: float


def annotated_png(image: np.ndarray, faces: Sequence[LabelledFace]) -> bytes:
    """PNG bytes of `image` (HxWx3 uint8, upright) with each face boxed and labelled.

    Faces are drawn smallest first, so that where boxes overlap the largest face's label, the one
    the top-level answer describes, stays readable on top.
    """
    canvas = Image.fromarray(image, "RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(2, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(11, round(min(width, height) / 30)))
    for face in reversed(faces):
        x, y, w, h = face.box if face.box is not None else (0, 0, width, height)
        colour = PALETTE[face.predicted_class % len(PALETTE)]
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=line)
        text = f"{face.label} {100 * face.confidence:.0f}%"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left + 2 * line, bottom - top + 2 * line
        # Above the box when there is room, else just inside its top edge; never off the photo.
        tx = min(max(x, 0), max(width - text_w, 0))
        ty = y - text_h if y - text_h >= 0 else min(max(y, 0), max(height - text_h, 0))
        draw.rectangle((tx, ty, tx + text_w - 1, ty + text_h - 1), fill=colour)
        ink = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((tx + line - left, ty + line - top), text, fill=ink, font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()
