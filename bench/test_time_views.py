"""What averaging a model over more views of each face buys, beyond mirroring.

Multi-crop test-time augmentation is a common lever on FER2013. This classifies every FER2013
validation face as it is, mirrored, shifted 2 pixels each way and re-framed 10% tighter and looser
(`crop_scale.reframe`), each view mirrored too, averages the logits of each set of views and prints
accuracy, macro-F1 and the forward passes per face, so a view set's gain is read against its cost.

    python bench/test_time_views.py [--model CKPT ...] [--validation ../shared/data/fer2013/validation]
"""

import argparse
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from crop_scale import png, reframe
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from emotion.folders import list_labelled_images, read_many
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
SHIFT = 2
VIEW_SETS = {
    "as it is": ["centre"],
    "mirrored": ["centre"],
    "2 scales more": ["centre", "scale 0.9", "scale 1.1"],
    "4 shifts more": ["centre", "left", "right", "up", "down"],
    "all": ["centre", "scale 0.9", "scale 1.1", "left", "right", "up", "down"],
}


def shifted(face: Image.Image, dx: int, dy: int) -> Image.Image:
    """`face` moved by whole pixels, the edge pixels filling in behind it as in `reframe`."""
    pixels = np.pad(np.asarray(face), SHIFT, mode="edge")
    height, width = face.height, face.width
    return Image.fromarray(pixels[SHIFT - dy : SHIFT - dy + height, SHIFT - dx : SHIFT - dx + width])


def views(face: Image.Image) -> dict[str, Image.Image]:
    """Every view of `face` that `VIEW_SETS` draws on, by name."""
    return {
        "centre": face, "scale 0.9": reframe(face, 0.9), "scale 1.1": reframe(face, 1.1),
        "left": shifted(face, -SHIFT, 0), "right": shifted(face, SHIFT, 0),
        "up": shifted(face, 0, -SHIFT), "down": shifted(face, 0, SHIFT),
    }


def main() -> None:
    """Print one line per model and view set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[None], help="checkpoints (default: the embedded model)")
    parser.add_argument("--validation", default=str(ROOT.parent / "shared/data/fer2013/validation"))
    args = parser.parse_args()

    images = list_labelled_images(args.validation)
    faces = [Image.open(io.BytesIO(data)).convert("L") for data in read_many(images.paths)]
    framed = [views(face) for face in faces]
    print(f"{len(faces)} faces from {args.validation}")
    for model in args.model:
        plain = Predictor(model, precision="fp32", flip_margin=0.0)
        # Mirrored views are measured whether or not the checkpoint mirrors when it predicts.
        mirrored = Predictor(replace(plain.checkpoint, test_time_flip=True), precision="fp32", flip_margin=1.0)
        truth = np.array([plain.labels.index(label) for label in images.labels])
        logits = {}
        for predictor in (plain, mirrored):
            for view in views(faces[0]):
                decoded = [predictor.decode(png(face[view])) for face in framed]
                logits[predictor.flip_margin, view] = predictor.predict_logits(np.stack([d.pixels for d in decoded]))
        for name, chosen in VIEW_SETS.items():
            margin = 0.0 if name == "as it is" else 1.0
            predicted = torch.stack([logits[margin, view] for view in chosen]).mean(dim=0).argmax(dim=1).numpy()
            passes = len(chosen) * (1 if margin == 0 else 2)
            print(f"{plain.name} ({model or 'embedded'}), {name}: {passes} forward passes per face, "
                  f"{accuracy_score(truth, predicted):.1%} / {f1_score(truth, predicted, average='macro'):.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
