"""`python -m jobs.evaluate --input NAME=PATH_OR_S3 ... --output PATH_OR_S3`: metrics and a report per set.

Each input is a labelled set (one sub-folder per class), `NAME:MODE=...` giving it its own
`--faces` mode. Its images go through the scoring pipeline (`jobs.pipeline.score_files`), so
evaluation sees exactly what batch scoring produces; the per-image predictions (a photo's largest
face; a photo with no face found counts as a miss), joined with the folder's class, are kept as
Parquet under `<output>/predictions/<NAME>/`. `report.json` (schema in docs/evaluation.md) and a self-contained
`report.html` sit beside them. With `--history` and `--baseline` the run is compared with the
previous night and a pinned baseline, and exits 1 when accuracy or macro-F1 drops by more than
`--tolerance`. Bad flags and empty sets fail with exit 2 before Ray starts.
"""

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from emotion.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint_file
from emotion.evaluation.gate import verdict
from emotion.evaluation.history import append_history, history_entry, read_history, read_reference
from emotion.evaluation.report import render_html, with_crops
from emotion.evaluation.sets import LabelledSet, join_truth, read_labelled_set, set_result
from emotion.explain import Explainer
from emotion.faces import FaceConfig, FaceFinder
from emotion.predictor import PRECISIONS
from emotion.uris import absolute_uri, filesystem
from jobs.common import UsageError, start
from jobs.conf import CONF_DIR, apply_defaults
from jobs.pipeline import PipelineConfig, check_backend, check_faces, face_settings, score_files, settled_config

log = logging.getLogger("jobs.evaluate")
SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SET_INPUT = "NAME=PATH_OR_S3 or NAME:MODE=PATH_OR_S3, NAME of letters, digits, '_', '-', '.'"
_TIMING_COLUMNS = ("inference_seconds", "peak_rss_bytes", "peak_gpu_bytes")


@dataclass(frozen=True)
class EvaluateJob:
    """A validated evaluation run; everything here was checked before Ray starts."""

    run_id: str
    sets: list[LabelledSet]
    output: str
    checkpoint: Checkpoint
    model_uri: str
    # sha256 and size of the bytes loaded, not of a file that may be replaced while the run goes on.
    model_sha256: str
    model_bytes: int
    pipeline: PipelineConfig
    face_config: FaceConfig
    history: str | None
    previous: dict[str, Any] | None
    baseline_uri: str | None
    baseline: dict[str, Any] | None
    tolerance: float
    gallery: int
    explain: bool
    bins: int
    overwrite: bool
    endpoint_url: str | None


class _InputList(argparse.Action):
    """Repeated --input flags; given on the command line they replace the config's list rather
    than adding to it, so one set can be evaluated with the nightly config's other settings."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])


def build_parser(conf: str = "evaluate") -> argparse.ArgumentParser:
    """The command line, its defaults from conf/evaluate.yaml with conf/<conf>.yaml layered over it."""
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf", default=conf, help="conf/<CONF>.yaml layered over conf/evaluate.yaml")
    parser.add_argument("--input", action=_InputList, metavar="NAME[:MODE]=PATH_OR_S3",
                        help="a labelled set: class sub-folders under a folder or s3:// prefix (repeatable); "
                        "MODE: its own --faces")
    parser.add_argument("--output", help="folder or s3:// prefix for the report; {run_id} is replaced")
    parser.add_argument("--model", help="checkpoint path or s3:// URI (default: the embedded model)")
    parser.add_argument("--history", help="stable prefix holding history.jsonl, one line per run")
    parser.add_argument("--baseline", help="pinned report.json (or history line) to compare with")
    parser.add_argument("--tolerance", type=float, help="largest allowed drop of accuracy or macro-F1 (0.01 = 1 pt)")
    parser.add_argument("--gallery", type=int, help="most confident mistakes shown per set")
    parser.add_argument("--bins", type=int, help="confidence bins for calibration (ECE, reliability diagram)")
    parser.add_argument("--explain", action=argparse.BooleanOptionalAction,
                        help="Grad-CAM overlay of the predicted class beside each face of the mistakes gallery")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--actors", type=int, help="inference actors")
    parser.add_argument("--gpus-per-actor", type=float)
    parser.add_argument("--cpus-per-actor", type=float)
    parser.add_argument("--threads-per-actor", type=int, help="torch threads per actor (CPU inference)")
    parser.add_argument("--preprocess-cpus", type=float, help="CPUs per decoding task")
    parser.add_argument("--preprocess-tasks", type=int, help="cap on concurrent decoding tasks")
    parser.add_argument("--files-per-block", type=int, help="files per read-and-decode task")
    parser.add_argument("--max-pixels", type=int, help="larger images are error rows, refused before decoding")
    parser.add_argument("--faces", help="whole: each image is one face; detect: a photo counts as its largest face; "
                        "auto: whole for images about the model's input size, detect otherwise")
    parser.add_argument("--face-config", help="face detector and framing YAML (default: conf/faces.yaml)")
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--backend", help="torch, or onnxruntime (the checkpoint's ONNX graph, on the CPU only)")
    parser.add_argument("--device", help="torch device for inference (default: cuda when given GPUs)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    apply_defaults(parser, "evaluate")
    if conf != "evaluate":
        if not (CONF_DIR / f"{conf}.yaml").is_file():
            parser.error(f"--conf {conf}: no such file {CONF_DIR / conf}.yaml")
        apply_defaults(parser, conf)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Read --conf first, since it decides which YAML supplies the other flags' defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--conf", default="evaluate")
    conf = first.parse_known_args(argv)[0].conf
    parser = build_parser(conf)
    return parser, parser.parse_args(argv)


def _split_input(spec: str) -> tuple[str, str | None, str]:
    """NAME, its own faces mode (None: --faces) and the path of `NAME[:MODE]=PATH_OR_S3`."""
    head, sep, uri = spec.partition("=")
    name, colon, mode = head.partition(":")
    if not sep or not uri or not _SET_NAME.match(name) or (colon and not mode):
        raise UsageError(f"--input {spec}: expected {_SET_INPUT}")
    if colon:
        check_faces(mode, f"--input {spec}: faces mode")
    return name, mode or None, uri


def read_input(spec: str, labels: tuple[str, ...], faces: str) -> LabelledSet:
    """The set a `--input NAME[:MODE]=PATH` names, under its own faces mode or else `faces`; any
    reason it cannot be scored is a usage error."""
    name, mode, raw = _split_input(spec)
    uri = absolute_uri(raw).rstrip("/")
    try:
        return read_labelled_set(name, uri, labels, mode or faces)
    except FileNotFoundError:
        raise UsageError(f"--input {spec}: no such folder or prefix") from None
    except PermissionError as exc:
        raise UsageError(f"--input {spec}: not readable ({exc})") from None
    except ValueError as exc:
        raise UsageError(f"--input {spec}: {str(exc).removeprefix(uri + ': ')}") from None


def _check_counts(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "actors", "gallery", "bins", "threads_per_actor", "preprocess_tasks", "files_per_block",
                 "max_pixels"):
        value = getattr(args, flag)
        if value is not None and value <= 0 and not (flag == "gallery" and value == 0):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, not {value}")
    for flag in ("tolerance", "gpus_per_actor", "cpus_per_actor", "preprocess_cpus"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be zero or more, not {value}")


def plan_job(args: argparse.Namespace, run_id: str) -> EvaluateJob:
    """Check every input, the model, the output, the history and the baseline before any work."""
    _check_counts(args)
    if not args.input:
        raise UsageError("--input NAME=PATH_OR_S3 is required (at least one labelled set)")
    if not args.output:
        raise UsageError("--output is required")
    check_faces(args.faces)
    check_backend(args.backend, args.precision, args.gpus_per_actor, args.device)
    names = [_split_input(spec)[0] for spec in args.input]
    if len(set(names)) != len(names):
        raise UsageError(f"--input: set names must be unique, got {', '.join(names)}")
    model_uri = absolute_uri(args.model) if args.model else str(DEFAULT_CHECKPOINT)
    try:
        model_file = load_checkpoint_file(model_uri)
    except CheckpointError as exc:
        raise UsageError(f"--model {exc}") from None
    checkpoint = model_file.checkpoint
    face_config = face_settings(args.face_config)
    sets = [read_input(spec, checkpoint.labels, args.faces) for spec in args.input]
    output = absolute_uri(args.output.replace("{run_id}", run_id)).rstrip("/")
    fs, root = filesystem(output)
    if fs.exists(f"{root}/{REPORT_JSON}") and not args.overwrite:
        raise UsageError(f"--output {output} already holds a report; pass --overwrite to replace it")
    history = absolute_uri(args.history).rstrip("/") if args.history else None
    try:
        previous = read_history(history)[-1:] if history else []
    except (OSError, ValueError) as exc:
        raise UsageError(f"--history {args.history}: unreadable history ({exc})") from None
    baseline_uri = absolute_uri(args.baseline) if args.baseline else None
    try:
        baseline = read_reference(baseline_uri) if baseline_uri else None
    except FileNotFoundError:
        raise UsageError(f"--baseline {args.baseline}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--baseline {args.baseline}: {exc}") from None
    return EvaluateJob(
        run_id=run_id,
        sets=sets,
        output=output,
        checkpoint=checkpoint,
        model_uri=model_uri,
        model_sha256=model_file.sha256,
        model_bytes=model_file.size,
        pipeline=settled_config(args, checkpoint),
        face_config=face_config,
        history=history,
        previous=previous[0] if previous else None,
        baseline_uri=baseline_uri,
        baseline=baseline,
        tolerance=args.tolerance,
        gallery=args.gallery,
        explain=args.explain,
        bins=args.bins,
        overwrite=args.overwrite,
        endpoint_url=args.endpoint_url,
    )


def score_set(job: EvaluateJob, labelled: LabelledSet) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predictions for every image of the set joined with its folder and class, and the
    efficiency measured while producing them."""
    started = time.monotonic()
    ds = score_files(labelled.paths, job.checkpoint, replace(job.pipeline, faces=labelled.faces),
                     filesystem(labelled.uri, job.endpoint_url)[0], timing=True)
    df = ds.to_pandas()
    seconds = time.monotonic() - started
    df = join_truth(df, labelled, job.checkpoint.labels)
    ok = int((df["status"] == "ok").sum())
    peak_gpu = int(df["peak_gpu_bytes"].max())
    efficiency = {
        "images": len(df),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(df) / seconds, 2) if seconds else None,
        "mean_inference_ms": float(df["inference_seconds"].sum() / ok * 1000) if ok else None,
        "peak_rss_mb": round(float(df["peak_rss_bytes"].max()) / 2**20, 1),
        "peak_gpu_mb": round(peak_gpu / 2**20, 1) if peak_gpu else None,
        "model_bytes": job.model_bytes,
        "num_params": job.checkpoint.num_params,
    }
    return df.drop(columns=list(_TIMING_COLUMNS)), efficiency


def write_predictions(df: pd.DataFrame, uri: str) -> None:
    """One Parquet file of every set's predictions, for reading the errors behind the metrics."""
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/predictions.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pandas(df.drop(columns=["uri"]), preserve_index=False), f)


def run(job: EvaluateJob, started_at: datetime) -> dict[str, Any]:
    """Score and measure every set, write predictions, report.json, report.html and history."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    started = time.monotonic()
    out_fs, root = filesystem(job.output)
    if job.overwrite and out_fs.exists(f"{root}/predictions"):
        # Sets of the replaced run that this one does not evaluate must not linger beside it.
        out_fs.rm(f"{root}/predictions", recursive=True)
    sets: dict[str, dict[str, Any]] = {}
    for labelled in job.sets:
        log.info("evaluating %s: %d images from %s", labelled.name, len(labelled.paths), labelled.uri)
        df, efficiency = score_set(job, labelled)
        predictions = f"{job.output}/predictions/{labelled.name}"
        write_predictions(df, predictions)
        sets[labelled.name] = set_result(labelled, df, job.checkpoint.labels, job.bins, job.gallery, efficiency,
                                         predictions)
    comparison, gate = verdict(sets, job.previous, job.baseline, job.baseline_uri, job.tolerance)
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": {
            "id": job.run_id,
            "started": started_at.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 3),
            "output": job.output,
            "history": job.history,
            "versions": {"ray": ray.__version__, "torch": torch.__version__},
            "pipeline": asdict(job.pipeline),
        },
        "model": job.checkpoint.describe() | {
            "uri": job.model_uri, "sha256": job.model_sha256, "bytes": job.model_bytes,
            "backend": job.pipeline.backend,
        },
        "sets": sets,
        "comparison": comparison,
        "gate": gate,
    }
    out_fs.makedirs(root, exist_ok=True)
    with out_fs.open(f"{root}/{REPORT_JSON}", "w") as f:
        json.dump(report, f, indent=2)
    finder = FaceFinder(job.face_config, job.checkpoint.input_size, job.checkpoint.channels, job.pipeline.max_pixels)
    explainer = Explainer(job.checkpoint) if job.explain and job.gallery else None
    mistakes = {labelled.name: with_crops(sets[labelled.name]["most_confident_mistakes"], finder, labelled.faces,
                                          explainer)
                for labelled in job.sets}
    with out_fs.open(f"{root}/{REPORT_HTML}", "w") as f:
        f.write(render_html(report, mistakes))
    if job.history:
        append_history(job.history, history_entry(report, f"{job.output}/{REPORT_JSON}"))
    return report


def main(argv: list[str] | None = None) -> int:
    """Evaluate every set; exit 1 when the regression gate fails, so a nightly scheduler sees it."""
    parser, args = parse_args(argv)
    args = start(parser, args=args)
    started_at = datetime.now(UTC)
    try:
        job = plan_job(args, started_at.strftime("%Y%m%dT%H%M%SZ"))
    except UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    report = run(job, started_at)
    for name, r in report["sets"].items():
        accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        macro = "n/a" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}"
        print(f"{name}: accuracy {accuracy}, macro-F1 {macro} on {r['n_evaluated']} of {r['n_images']} images "
              f"({r['n_errors']} unreadable, {r['n_excluded_unknown']} of unknown classes); faces {r['faces']}: "
              f"found in {'n/a' if r['faces_found'] is None else format(r['faces_found'], '.1%')}, "
              f"{r['n_no_face']} without a face (counted as misses)")
    print(f"report: {job.output}/{REPORT_HTML}")
    for failure in report["gate"]["failures"]:
        print(f"REGRESSION: {failure['message']}", file=sys.stderr)
    return 0 if report["gate"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
