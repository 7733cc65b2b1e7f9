"""`python -m jobs.calibrate`: fit a checkpoint's temperature on labelled validation faces.

Training already stores a temperature fitted on its validation set; this calibrates any other
checkpoint (one trained before temperatures existed, or one headed for a different population of
faces) and writes a new file, never the one it read.
"""

import argparse
import sys

from emotion.calibration import calibrate
from emotion.checkpoint import CheckpointError, save_checkpoint
from emotion.predictor import Predictor
from emotion.training.data import load_arrays
from emotion.uris import absolute_uri
from jobs.common import UsageError, start
from jobs.conf import apply_defaults


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/calibrate.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint to calibrate, local or s3://")
    parser.add_argument("--validation", required=True,
                        help="labelled folder (class sub-folders) of faces the model never trained on")
    parser.add_argument("--output", required=True, help="calibrated checkpoint to write, local or s3://")
    apply_defaults(parser, "calibrate")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the calibrated copy; exit 2 before any work when a flag, model or folder is unusable."""
    args = start(build_parser(), argv)
    try:
        if absolute_uri(args.output) == absolute_uri(args.model):
            raise UsageError("--output must differ from --model: the checkpoint read is never overwritten")
        # Float32 logits: the temperature serves every precision the checkpoint may run in.
        predictor = Predictor(args.model, precision="fp32")
        checkpoint = predictor.checkpoint
        faces = load_arrays(args.validation, checkpoint.input_size, checkpoint.channels)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    calibrated = calibrate(predictor, faces.pixels, faces.targets)
    save_checkpoint(calibrated, args.output)
    fit = calibrated.metrics["calibration"]
    print(f"wrote {args.output}: temperature {fit['temperature']:.3f} fitted on {fit['faces']} faces; "
          f"expected calibration error {fit['ece_uncalibrated']:.4f} -> {fit['ece']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
