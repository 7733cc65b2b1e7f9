"""Where FER2013's crop lies relative to a detector's box, and which framing classifies best.

Part one enlarges FER2013 training faces (48x48) to between 160 and 224 pixels (a spread of sizes,
so the detectors' fixed pyramid steps do not round every box the same way), sets them in a flat
frame of half their side so the detector sees a whole head, runs the configured detector and reports the median
ratio of the FER2013 crop's side to the box's longer side and the vertical offset of the crop's
centre from the box's centre in box heights: the framing that reproduces the training crops.

Part two classifies the shared photo sets with the embedded model, the whole image (today's
behaviour) beside the largest face framed several ways, and prints accuracy and macro-F1 per
framing. An image with no face counts as a miss; the last columns give it the whole-image
prediction instead, for comparison.

    python bench/framing.py [--conf conf/faces.yaml] [--fer-sample 1500] [--data ../shared/data]
"""

import argparse
import importlib.util
import random
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from emotion.faces import FaceDetector, Framing, frame_face, load_face_config
from emotion.folders import list_labelled_images, read_many
from emotion.labels import LABELS
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
SETS = ("taiwanese", "lfw_expressions")
FER_SIDES = (160, 224)


def fer_framing(det: FaceDetector, folder: Path, sample: int) -> tuple[Framing, float]:
    """The median framing of FER2013 crops around `det`'s boxes, and the share of faces found."""
    paths = sorted(str(p) for p in folder.glob("*/*.jpg"))
    draw = random.Random(0)
    paths = draw.sample(paths, min(sample, len(paths)))
    scales, offsets = [], []
    for path in paths:
        side = draw.randint(*FER_SIDES)
        border = side // 2
        face = np.asarray(Image.open(path).convert("L").resize((side, side), Image.Resampling.BICUBIC))
        framed = np.pad(face, border, mode="constant", constant_values=int(face.mean()))
        found = det.detect(framed)
        if not found:
            continue
        box = found[0]
        scales.append(side / max(box.w, box.h))
        offsets.append((border + side / 2 - (box.y + box.h / 2)) / box.h)
    framing = Framing(round(float(np.median(scales)), 2), round(float(np.median(offsets)), 2))
    print(f"FER2013 train, {len(paths)} faces: detector found {len(scales) / len(paths):.1%}; crop side / box side "
          f"median {np.median(scales):.3f} "
          f"(quartiles {np.quantile(scales, 0.25):.3f}-{np.quantile(scales, 0.75):.3f}), "
          f"vertical offset median {np.median(offsets):+.3f} box heights (quartiles "
          f"{np.quantile(offsets, 0.25):+.3f} to {np.quantile(offsets, 0.75):+.3f})")
    return framing, len(scales) / len(paths)


def scores(truth: list[int], predicted: np.ndarray) -> str:
    """Accuracy and macro-F1 over the model's classes; a miss (-1) is wrong but no class of its own."""
    f1 = f1_score(truth, predicted, labels=list(range(len(LABELS))), average="macro", zero_division=0)
    return f"{accuracy_score(truth, predicted):.1%} / {f1:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--conf", default=str(ROOT / "conf" / "faces.yaml"), help="detector and framing")
    parser.add_argument("--fer-sample", type=int, default=1500, help="FER2013 training faces to measure on")
    args = parser.parse_args()
    if importlib.util.find_spec("cv2"):
        import cv2

        cv2.setNumThreads(1)
    conf = load_face_config(args.conf)
    det = conf.build()
    print(f"detector: {conf.detector} {conf.params}; configured framing: {conf.framing}")
    measured, _ = fer_framing(det, Path(args.data) / "fer2013" / "train", args.fer_sample)
    framings = {
        "configured": conf.framing,
        "measured on FER2013": measured,
        "tight box": Framing(1.0, 0.0),
        "scale 1.1": Framing(1.1, 0.0),
        "scale 1.25": Framing(1.25, 0.0),
        "scale 1.4": Framing(1.4, 0.0),
        "measured scale, offset 0": Framing(measured.scale, 0.0),
        "measured scale, offset -0.1": Framing(measured.scale, -0.1),
        "measured scale, offset +0.1": Framing(measured.scale, 0.1),
    }
    predictor = Predictor(device="cpu")
    size = predictor.checkpoint.input_size
    results: dict[str, dict[str, str]] = {name: {} for name in ["whole image", *framings]}
    for set_name in SETS:
        listing = list_labelled_images(str(Path(args.data) / set_name))
        truth = [LABELS.index(label) for label in listing.labels]
        data = read_many(listing.paths)
        whole = predictor.predict_pixels(np.stack([predictor.decode(b).pixels for b in data])).argmax(1)
        gray = [np.asarray(Image.open(path).convert("L")) for path in listing.paths]
        faces = [det.detect(image) for image in gray]
        found = [i for i, f in enumerate(faces) if f]
        results["whole image"][set_name] = f"{scores(truth, whole)} | {scores(truth, whole)}"
        print(f"{set_name}: {len(truth)} labelled images, a face found in {len(found) / len(truth):.1%}")
        for name, framing in framings.items():
            crops = np.stack([frame_face(gray[i], faces[i][0], framing, size) for i in found])[..., None]
            framed = predictor.predict_pixels(crops).argmax(1)
            as_miss = np.full(len(truth), -1)
            as_miss[found] = framed
            fallback = whole.copy()
            fallback[found] = framed
            results[name][set_name] = f"{scores(truth, as_miss)} | {scores(truth, fallback)}"
    print("\naccuracy / macro-F1: no face counted as a miss | no face given the whole image")
    print("| framing | scale | offset | " + " | ".join(f"{s} (miss) | {s} (whole)" for s in SETS) + " |")
    print("|---|---|---|" + "---|---|" * len(SETS))
    for name, cells in results.items():
        framing = framings.get(name)
        shape = (f"{framing.scale:.2f} | {framing.offset:+.2f}") if framing else "- | -"
        print(f"| {name} | {shape} | " + " | ".join(cells[s] for s in SETS) + " |")


if __name__ == "__main__":
    main()
