"""`python -m jobs.ensemble`: several trained checkpoints joined into one ensemble checkpoint.

An ensemble is a model like any other: one file, architecture `ensemble`, loaded by the same
`load_checkpoint`, scored, served and exported like a single network. Its members must agree on
everything around the network (labels, input size, channels, normalisation), since one decoding
feeds them all. With `--validation`, the ensemble's temperature is fitted there (its averaged
log-probabilities are calibrated anew, not inherited from any member) and its accuracy printed.
"""

import argparse
import sys

import numpy as np
from sklearn.metrics import f1_score

from emotion.calibration import calibrate
from emotion.checkpoint import Checkpoint, CheckpointError, load_checkpoint, new_checkpoint, save_checkpoint
from emotion.models import ENSEMBLE_ARCHITECTURE, Ensemble
from emotion.predictor import Predictor
from emotion.training.data import load_arrays
from emotion.uris import absolute_uri
from jobs.common import UsageError, start
from jobs.conf import apply_defaults

SHARED = ("labels", "input_size", "channels", "mean", "std")


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/ensemble.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.ensemble", description=__doc__)
    parser.add_argument("--models", nargs="+", required=True, help="member checkpoints, local or s3://")
    parser.add_argument("--output", required=True, help="ensemble checkpoint to write, local or s3://")
    parser.add_argument("--name", help="the ensemble's model name")
    parser.add_argument("--validation", help="labelled folder to fit the temperature on and report accuracy")
    parser.add_argument("--cascade-margin", type=float,
                        help="the first member answers alone for faces whose top two probabilities it puts at least "
                             "this far apart (0-1); the others go through every member")
    apply_defaults(parser, "ensemble")
    return parser


def join(members: list[Checkpoint], name: str | None = None, cascade_margin: float | None = None) -> Checkpoint:
    """One checkpoint holding every member's network and a record of each member; with
    `cascade_margin`, a cascade that asks the other members only where the first is unsure."""
    for field in SHARED:
        values = {str(getattr(m, field)) for m in members}
        if len(values) > 1:
            raise UsageError(f"members differ in {field}: {' vs '.join(sorted(values))}")
    first = members[0]
    cascade = f"-cascade{cascade_margin}" if cascade_margin is not None else ""
    network = Ensemble([m.build() for m in members], cascade_margin).eval()
    return new_checkpoint(
        network,
        arch=ENSEMBLE_ARCHITECTURE,
        arch_kwargs={
            "members": [{"arch": m.arch, "arch_kwargs": m.arch_kwargs} for m in members],
            **({"cascade_margin": cascade_margin} if cascade_margin is not None else {}),
        },
        labels=first.labels,
        input_size=first.input_size,
        channels=first.channels,
        mean=first.mean,
        std=first.std,
        name=name or "+".join(m.name or m.arch for m in members) + cascade,
        trained_on="; ".join(f"{m.name or m.arch}: {m.trained_on}" for m in members),
        recipe={"members": [m.recipe for m in members]},
        metrics={"members": [m.metrics.get("validation", {}) for m in members]},
        test_time_flip=all(m.test_time_flip for m in members),
    )


def main(argv: list[str] | None = None) -> int:
    """Join the members into one checkpoint; exit 2 before any work when a flag or member is unusable."""
    args = start(build_parser(), argv)
    try:
        if absolute_uri(args.output) in {absolute_uri(m) for m in args.models}:
            raise UsageError("--output must differ from every --models file: members are never overwritten")
        if args.cascade_margin is not None and not 0 < args.cascade_margin <= 1:
            raise UsageError(f"--cascade-margin must be in (0, 1], not {args.cascade_margin}")
        members = [load_checkpoint(uri) for uri in args.models]
        ensemble = join(members, args.name, args.cascade_margin)
        faces = None
        if args.validation:
            faces = load_arrays(args.validation, ensemble.input_size, ensemble.channels)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = ""
    if faces is not None:
        predictor = Predictor(ensemble)
        ensemble = calibrate(predictor, faces.pixels, faces.targets)
        # The temperature changes no prediction, so the uncalibrated predictor's answers stand.
        predicted = predictor.predict_pixels(faces.pixels).argmax(axis=1)
        fit = ensemble.metrics["calibration"]
        macro_f1 = f1_score(faces.targets, predicted, average="macro")
        summary = (f"; on {args.validation}: accuracy {np.mean(predicted == faces.targets):.4f}, macro-F1 "
                   f"{macro_f1:.4f}, temperature {fit['temperature']:.3f} (calibration error {fit['ece']:.4f})")
    save_checkpoint(ensemble, args.output)
    print(f"wrote {args.output}: ensemble of {len(members)} ({ensemble.name}), "
          f"{ensemble.num_params} parameters{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
