"""`python -m jobs.quantize`: a checkpoint that carries its network quantized to int8.

The int8 graph is the one `python -m jobs.export --int8` writes (ONNX Runtime's static
quantization, its activations' ranges calibrated on the face crops under `--calibration`, refused
when it changes too many of float32's answers there), stored inside a copy of the checkpoint. A
Predictor loading that copy runs it with `precision: int8`, and `auto` takes it on CPUs where a
timed batch shows it clearly faster than float32 (emotion.predictor). The checkpoint read is never
overwritten.
"""

import argparse
import sys

from emotion.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, save_checkpoint
from emotion.uris import absolute_uri
from jobs.common import UsageError, start
from jobs.conf import apply_defaults
from jobs.export import ExportRefused, checked_export, refusal


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/quantize.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.quantize", description=__doc__)
    parser.add_argument("--model", help="checkpoint, local or s3://; default: the embedded model")
    parser.add_argument("--calibration", required=True,
                        help="folder of face crops, local or s3://, framed as the faces the model will see")
    parser.add_argument("--calibration-images", type=int, help="at most this many of them, spread over the folder")
    parser.add_argument("--output", required=True, help="checkpoint to write, local or s3://")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, help="replace an existing --output")
    parser.add_argument("--opset", type=int, help="ONNX opset of the graph")
    apply_defaults(parser, "quantize")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the copy with its int8 graph; exit 2 before any work on a bad flag, model or folder, and
    1, writing nothing, when the graph is refused."""
    args = start(build_parser(), argv)
    try:
        if absolute_uri(args.output) == absolute_uri(args.model or str(DEFAULT_CHECKPOINT)):
            raise UsageError("--output must differ from --model: the checkpoint read is never overwritten")
        checkpoint, graph, check = checked_export(args, int8=True)
    except (UsageError, CheckpointError, ExportRefused) as exc:
        return refusal(exc)
    save_checkpoint(checkpoint.with_int8_graph(graph), args.output)
    print(f"wrote {args.output}: {checkpoint.name or checkpoint.arch} with its graph in {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
