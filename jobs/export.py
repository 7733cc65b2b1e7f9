"""`python -m jobs.export`: a checkpoint as an ONNX model, checked against PyTorch on export.

The graph (float32, dynamic batch axis) takes normalised pixels and returns logits; the
checkpoint's labels, input size, channels, mean/std, temperature, mirroring flag and precision ride
along in its metadata props, so ONNX Runtime in any language can reproduce the Predictor's probabilities
(`emotion.portable`).

With `--int8` the graph is quantized (int8 weights, uint8 activations whose ranges are calibrated
on the face crops under `--calibration`) and checked by how often it gives float32's top class.
"""

import argparse
import sys

import fsspec
import numpy as np

from emotion.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from emotion.folders import list_images, read_many
from emotion.portable import agreement, export_bytes, max_difference, quantized_bytes
from emotion.preprocess import decode_image, normalize
from emotion.uris import filesystem
from jobs.common import UsageError, start
from jobs.conf import apply_defaults

# Float32 logits of the same network through two runtimes agree far closer than this; a larger
# difference means the graph computes something else (an operator exported wrongly).
TOLERANCE = 1e-3
# An int8 graph moves logits by far more than that, so it is judged by answers on its calibration
# faces: a sound one changes only faces near a boundary between two classes, a few in a hundred,
# where weights overflowing the int8 kernels' 16-bit sums change more than one in ten
# (docs/benchmarks.md, "int8"). It checks the arithmetic, not the faces: calibrated on images
# unlike the ones it will see, a graph agrees with itself there and errs elsewhere.
MIN_AGREEMENT = 0.9


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/export.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__)
    parser.add_argument("--model", help="checkpoint, local or s3://; default: the embedded model")
    parser.add_argument("--output", required=True, help="ONNX file to write, local or s3://")
    parser.add_argument("--opset", type=int, help="ONNX opset of the graph")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, help="replace an existing --output")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction,
                        help="quantize weights and activations to int8 (needs --calibration)")
    parser.add_argument("--calibration", help="folder of face crops, local or s3://, to calibrate --int8 on")
    parser.add_argument("--calibration-images", type=int, help="at most this many of them, spread over the folder")
    apply_defaults(parser, "export")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the checkpoint; exit 1, writing nothing, when ONNX Runtime disagrees with PyTorch or
    the int8 graph with the float32 one."""
    args = start(build_parser(), argv)
    try:
        if args.calibration and not args.int8:
            raise UsageError("--calibration is for --int8 only")
        if args.int8 and not args.calibration:
            raise UsageError("--int8 needs --calibration: a folder of face crops to fit the activations' ranges on")
        checkpoint, graph, check = checked_export(args, args.int8)
    except (UsageError, CheckpointError, ExportRefused) as exc:
        return refusal(exc)
    with fsspec.open(args.output, "wb") as f:
        f.write(graph)
    print(f"wrote {args.output}: {checkpoint.name or checkpoint.arch}, opset {args.opset}, dynamic batch axis; {check}")
    return 0


class ExportRefused(Exception):
    """A graph that does not compute what the checkpoint's network computes, closely enough."""


def checked_export(args: argparse.Namespace, int8: bool) -> tuple[Checkpoint, bytes, str]:
    """The checkpoint `--model` names and its graph from `checked_graph`, quantized on faces from
    `--calibration` when `int8`; UsageError or CheckpointError before any work when `--output`,
    `--calibration-images`, the model or the folder cannot serve, ExportRefused after it."""
    fs, path = filesystem(args.output)
    if fs.exists(path) and not args.overwrite:
        raise UsageError(f"--output {args.output} exists: pass --overwrite to replace it")
    if args.calibration_images < 1:
        raise UsageError(f"--calibration-images must be at least 1, not {args.calibration_images}")
    checkpoint = load_checkpoint(args.model)
    faces = calibration_faces(checkpoint, args.calibration, args.calibration_images) if int8 else None
    return (checkpoint, *checked_graph(checkpoint, args.opset, faces))


def refusal(exc: Exception) -> int:
    """Say in one line why nothing was written; the exit code: 1 for a graph that failed its check,
    2 for flags, a model or a folder refused before any work."""
    if isinstance(exc, ExportRefused):
        print(f"error: {exc}; nothing written", file=sys.stderr)
        return 1
    print(f"error: {exc}", file=sys.stderr)
    return 2


def checked_graph(checkpoint: Checkpoint, opset: int, faces: np.ndarray | None = None) -> tuple[bytes, str]:
    """The checkpoint's network as an ONNX graph, quantized to int8 on `faces` when given, and a
    line saying how it was checked; ExportRefused when ONNX Runtime's float32 logits differ from
    PyTorch's or the int8 graph changes too many of float32's answers on its calibration faces."""
    graph = export_bytes(checkpoint, opset)
    difference = max_difference(checkpoint, graph)
    if difference > TOLERANCE:
        raise ExportRefused(f"ONNX Runtime's logits differ from PyTorch's by up to {difference:.2e} "
                            f"(tolerance {TOLERANCE:.0e})")
    if faces is None:
        return graph, f"max |logit difference| against PyTorch float32 {difference:.2e}"
    quantized = quantized_bytes(graph, faces)
    agreed = agreement(graph, quantized, faces)
    if agreed < MIN_AGREEMENT:
        raise ExportRefused(f"the int8 graph keeps float32's top class for {agreed:.1%} of the {len(faces)} "
                            f"calibration faces (at least {MIN_AGREEMENT:.0%} needed)")
    return quantized, f"int8, calibrated on {len(faces)} faces; float32's top class kept for {agreed:.1%} of them"


def calibration_faces(checkpoint: Checkpoint, uri: str, limit: int) -> np.ndarray:
    """Up to `limit` images under `uri`, evenly spaced through its sorted listing (so every class
    folder of a labelled set is drawn on), decoded and normalised as the Predictor does."""
    try:
        listed = list_images(uri).paths
    except FileNotFoundError:
        raise UsageError(f"--calibration {uri}: not found") from None
    if not listed:
        raise UsageError(f"--calibration {uri}: no image files under it")
    count = min(limit, len(listed))
    paths = [listed[i * len(listed) // count] for i in range(count)]
    decoded = [decode_image(data, checkpoint.input_size, checkpoint.channels) for data in read_many(paths)]
    pixels = [d.pixels for d in decoded if d.error is None]
    if not pixels:
        raise UsageError(f"--calibration {uri}: none of the {len(paths)} images read decodes")
    return normalize(np.stack(pixels), checkpoint.mean, checkpoint.std)


if __name__ == "__main__":
    sys.exit(main())
