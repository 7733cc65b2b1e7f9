"""`python -m jobs.export`: a checkpoint as an ONNX model, checked against PyTorch on export.

The graph (float32, dynamic batch axis) takes normalised pixels and returns logits; the
checkpoint's labels, input size, channels, mean/std, temperature and mirroring flag ride along in
its metadata props, so ONNX Runtime in any language can reproduce the Predictor's probabilities
(`emotion.portable`).
"""

import argparse
import sys

import fsspec

from emotion.checkpoint import CheckpointError, load_checkpoint
from emotion.portable import export_bytes, max_difference
from emotion.uris import filesystem
from jobs.common import UsageError, start
from jobs.conf import apply_defaults

# Float32 logits of the same network through two runtimes agree far closer than this; a larger
# difference means the graph computes something else (an operator exported wrongly).
TOLERANCE = 1e-3


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/export.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__)
    parser.add_argument("--model", help="checkpoint, local or s3://; default: the embedded model")
    parser.add_argument("--output", required=True, help="ONNX file to write, local or s3://")
    parser.add_argument("--opset", type=int, help="ONNX opset of the graph")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, help="replace an existing --output")
    apply_defaults(parser, "export")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the checkpoint; exit 1, writing nothing, when ONNX Runtime disagrees with PyTorch."""
    args = start(build_parser(), argv)
    try:
        fs, path = filesystem(args.output)
        if fs.exists(path) and not args.overwrite:
            raise UsageError(f"--output {args.output} exists: pass --overwrite to replace it")
        checkpoint = load_checkpoint(args.model)
    except (UsageError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    graph = export_bytes(checkpoint, args.opset)
    difference = max_difference(checkpoint, graph)
    if difference > TOLERANCE:
        print(f"error: ONNX Runtime's logits differ from PyTorch's by up to {difference:.2e} "
              f"(tolerance {TOLERANCE:.0e}); nothing written", file=sys.stderr)
        return 1
    with fsspec.open(args.output, "wb") as f:
        f.write(graph)
    print(f"wrote {args.output}: {checkpoint.name or checkpoint.arch}, opset {args.opset}, dynamic batch axis; "
          f"max |logit difference| against PyTorch float32 {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
