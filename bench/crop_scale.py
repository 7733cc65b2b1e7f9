"""How much accuracy a crop looser or tighter than FER2013's costs a model.

A face detector frames faces close to FER2013's crops, not exactly like them. This re-frames each
FER2013 validation face: scale 1.2 is a crop 20% looser (the face padded with its edge pixels and
reduced), 0.8 one 20% tighter (the centre enlarged), then classifies every version through each
model's Predictor and prints accuracy and macro-F1 per scale, so a recipe's robustness to framing
is read side by side with another's.

    python bench/crop_scale.py [--model CKPT ...] [--validation ../shared/data/fer2013/validation]
"""

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from emotion.folders import list_labelled_images, read_many
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)


def reframe(face: Image.Image, scale: float) -> Image.Image:
    """Grayscale `face` as a crop exactly `scale` times as wide around the same centre, at its own
    size. A looser crop reaches beyond the face's edges into edge pixels rather than a flat border:
    beyond a crop lies more face and hair."""
    side = face.width
    pad = math.ceil(side * max(scale - 1, 0) / 2)
    padded = Image.fromarray(np.pad(np.asarray(face), pad, mode="edge")) if pad else face
    low, high = pad + side * (1 - scale) / 2, pad + side * (1 + scale) / 2
    return padded.transform((side, side), Image.Transform.EXTENT, (low, low, high, high), Image.Resampling.BILINEAR)


def png(image: Image.Image) -> bytes:
    """The Predictor decodes bytes, as every entry point does; PNG keeps the re-framed pixels exact."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    """Print one line per model: accuracy and macro-F1 at each scale."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[None], help="checkpoints (default: the embedded model)")
    parser.add_argument("--validation", default=str(ROOT.parent / "shared/data/fer2013/validation"))
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    images = list_labelled_images(args.validation)
    faces = [Image.open(io.BytesIO(data)).convert("L") for data in read_many(images.paths)]
    print(f"{len(faces)} faces from {args.validation}")
    for model in args.model:
        predictor = Predictor(model, precision=args.precision)
        truth = np.array([predictor.labels.index(label) for label in images.labels])
        cells = []
        for scale in SCALES:
            decoded = [predictor.decode(png(reframe(face, scale))) for face in faces]
            probs = predictor.predict_pixels(np.stack([d.pixels for d in decoded]))
            predicted = probs.argmax(axis=1)
            cells.append(f"{scale:.1f}: {accuracy_score(truth, predicted):.1%} / "
                         f"{f1_score(truth, predicted, average='macro'):.3f}")
        print(f"{predictor.name} ({model or 'embedded'}): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
