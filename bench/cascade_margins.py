"""What a cascade's margin trades: accuracy against images/s, beside its first member alone.

A cascade (`jobs.ensemble --cascade-margin`) runs its first member on every face and the others
only where the first is unsure. This joins the checkpoints given as one cascade per margin and
as a plain ensemble, and prints for each, through the Predictor as shipped (precision "auto",
mirroring where unsure), accuracy and macro-F1 on FER2013 validation, the share of faces that
went through every member, and batched images/s with its ratio to the first member's, all timed
in one run so the ratios hold on whatever host runs it.

    python bench/cascade_margins.py --models FIRST OTHER ... [--margins 0.05 0.1 0.2 0.4] [--seconds 3]
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from inference import decoded_faces, images_per_second
from sklearn.metrics import f1_score

from emotion.checkpoint import load_checkpoint
from emotion.folders import list_labelled_images
from emotion.predictor import Predictor
from jobs.ensemble import join

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    """Print one line per configuration: the first member, each margin, every member."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints, the first one first")
    parser.add_argument("--margins", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--validation", default=str(ROOT.parent / "shared/data/fer2013/validation"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args()

    members = [load_checkpoint(path) for path in args.models]
    first = Predictor(members[0], device="cpu")
    faces = decoded_faces(first, args.validation)
    truth = np.array([first.labels.index(label) for label in list_labelled_images(args.validation).labels])
    with torch.inference_mode():
        first_pass = torch.softmax(Predictor(members[0], device="cpu", flip_margin=0).predict_logits(faces), dim=1)
    top2 = first_pass.topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1]).numpy()
    configurations = [(f"{first.name} alone", first, 0.0)]
    configurations += [(f"cascade, margin {margin}", Predictor(join(members, cascade_margin=margin), device="cpu"),
                        float(np.mean(gaps < margin))) for margin in args.margins]
    configurations.append(("every member", Predictor(join(members), device="cpu"), 1.0))
    print(f"{len(faces)} faces from {args.validation}; members {', '.join(m.name or m.arch for m in members)}")
    print(f"{'configuration':<28}{'accuracy':>9}{'macro-F1':>9}{'escalated':>10}{'batched/s':>10}{'vs first':>9}")
    baseline = None
    for name, predictor, escalated in configurations:
        predicted = predictor.predict_pixels(faces).argmax(axis=1)
        rate = images_per_second(predictor.predict_pixels, faces, min(args.batch_size, len(faces)), args.seconds)
        baseline = baseline or rate
        print(f"{name:<28}{np.mean(predicted == truth):>9.1%}{f1_score(truth, predicted, average='macro'):>9.3f}"
              f"{escalated:>10.0%}{rate:>10.0f}{rate / baseline:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
