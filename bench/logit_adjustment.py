"""Whether a model's macro-F1 is held back by how rarely it names the rare classes.

FER2013's training set has 16 times as many happy faces as disgusted ones, and a network trained
on it names disgust and fear less often than validation holds them. Post-hoc logit adjustment
(Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) subtracts tau times the log
of each class's training share from the logits before the argmax: tau 0 is the model as it is,
tau 1 the prediction a balanced training set would give (for a model trained on that set
without class weights). If macro-F1 rises for some tau, the
rare classes need more weight (in training or after it); if it falls, the faces a model misses in
those classes are not near its decision boundary and re-weighting cannot reach them.

Prints, per model and tau, PublicTest accuracy, macro-F1, per-class F1 and how many faces each
class is given, beside how many it holds.

    python bench/logit_adjustment.py [--model CKPT ...] [--train ../shared/data/fer2013/train]
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from emotion.folders import list_labelled_images, read_many
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/data/fer2013"
TAUS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def main() -> None:
    """Print one block per model: a line per tau."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[None], help="checkpoints (default: the embedded model)")
    parser.add_argument("--train", default=str(DATA / "train"), help="labelled folder the priors are counted in")
    parser.add_argument("--validation", default=str(DATA / "validation"))
    args = parser.parse_args()

    images = list_labelled_images(args.validation)
    data = read_many(images.paths)
    train_labels = list_labelled_images(args.train).labels
    for model in args.model:
        predictor = Predictor(model, precision="fp32")
        labels = list(predictor.labels)
        truth = np.array([labels.index(label) for label in images.labels])
        counts = np.array([train_labels.count(label) for label in labels], dtype=np.float64)
        if not counts.all():
            raise SystemExit(f"{args.train} has no images of {', '.join(np.array(labels)[counts == 0])}: no prior")
        log_prior = np.log(counts / counts.sum())
        logits = predictor.predict_logits(np.stack([predictor.decode(d).pixels for d in data])).numpy()
        print(f"{predictor.name} ({model or 'embedded'}); classes {' '.join(labels)}")
        print(f"  faces held:  {np.bincount(truth, minlength=len(labels))}")
        for tau in TAUS:
            predicted = (logits - tau * log_prior).argmax(axis=1)
            per_class = f1_score(truth, predicted, average=None, labels=range(len(labels)))
            print(f"  tau {tau:.2f}: {accuracy_score(truth, predicted):.1%} / "
                  f"{per_class.mean():.3f}  per class {np.round(per_class, 3)}  "
                  f"given {np.bincount(predicted, minlength=len(labels))}", flush=True)


if __name__ == "__main__":
    main()
