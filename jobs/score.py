"""`python -m jobs.score --input PATH_OR_S3 --output PATH_OR_S3`: Parquet predictions for every image.

Runs standalone (starting a local Ray) or under `ray job submit`. Every input file appears in the
output exactly once, as a prediction or as an error row; `_manifest.json`, written last, marks
the output complete. A run that stops early resumes where it left off when started again.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow.dataset
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data.checkpoint import CheckpointConfig

from emotion.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint
from emotion.folders import absolute_uri, arrow_filesystem, filesystem, list_images
from jobs.conf import apply_defaults
from jobs.pipeline import PROGRESS_ACTOR, PipelineConfig, ProgressCounter, score_files

log = logging.getLogger("jobs.score")
MANIFEST = "_manifest.json"
CHECKPOINT_DIR = "_checkpoint"


class UsageError(Exception):
    """A problem with the command line or its inputs, reported in one line before any work."""


@dataclass(frozen=True)
class ScoreJob:
    """A validated scoring run: what to read, what to write, which model, how to lay it out."""

    input: str
    output: str
    paths: list[str]
    checkpoint: Checkpoint
    model_uri: str
    pipeline: PipelineConfig
    overwrite: bool
    progress_interval: float
    endpoint_url: str | None
    rows_per_file: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__)
    parser.add_argument("--input", required=True, help="image folder or s3:// prefix, read recursively")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for Parquet and manifest")
    parser.add_argument("--model", help="checkpoint path or s3:// URI (default: the embedded model)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--files-per-block", type=int, help="files per read-and-decode task")
    parser.add_argument("--rows-per-file", type=int, help="rows gathered into each Parquet file, at least")
    parser.add_argument("--actors", type=int, help="fixed number of inference actors")
    parser.add_argument("--min-actors", type=int, help="autoscaling pool: smallest size")
    parser.add_argument("--max-actors", type=int, help="autoscaling pool: largest size")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per inference actor (fractions allowed)")
    parser.add_argument("--cpus-per-actor", type=float)
    parser.add_argument("--threads-per-actor", type=int, help="torch threads per actor (CPU inference)")
    parser.add_argument("--preprocess-cpus", type=float, help="CPUs per decoding task")
    parser.add_argument("--preprocess-tasks", type=int, help="cap on concurrent decoding tasks")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--device", help="torch device for inference (default: cuda when given GPUs)")
    parser.add_argument("--limit", type=int, help="score only the first N files (dry runs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete output")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--progress-interval", type=float, help="seconds between progress log lines")
    apply_defaults(parser, "score")
    return parser


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} must be {'zero or more' if allow_zero else 'positive'}, not {value}")


def plan_job(args: argparse.Namespace) -> ScoreJob:
    """Check every input before any cluster work: a bad flag costs seconds, not a job."""
    for flag in ("batch_size", "files_per_block", "rows_per_file", "actors", "min_actors", "max_actors", "limit",
                 "preprocess_tasks", "threads_per_actor"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _positive(args.gpus_per_actor, "--gpus-per-actor", allow_zero=True)
    _positive(args.cpus_per_actor, "--cpus-per-actor", allow_zero=True)
    _positive(args.preprocess_cpus, "--preprocess-cpus", allow_zero=True)
    if (args.min_actors is None) != (args.max_actors is None):
        raise UsageError("--min-actors and --max-actors go together")
    min_actors = args.min_actors if args.min_actors is not None else args.actors
    max_actors = args.max_actors if args.max_actors is not None else args.actors
    if min_actors > max_actors:
        raise UsageError(f"--min-actors {min_actors} is larger than --max-actors {max_actors}")
    try:
        paths = list_images(absolute_uri(args.input))
    except FileNotFoundError:
        raise UsageError(f"--input {args.input}: no such folder or prefix") from None
    except PermissionError as exc:
        raise UsageError(f"--input {args.input}: not readable ({exc})") from None
    if not paths:
        raise UsageError(f"--input {args.input}: no image files found (looked for .jpg, .png, ...)")
    model_uri = absolute_uri(args.model) if args.model else str(DEFAULT_CHECKPOINT)
    try:
        checkpoint = load_checkpoint(model_uri)
    except CheckpointError as exc:
        raise UsageError(f"--model {exc}") from None
    if args.limit:
        paths = paths[: args.limit]
    output = absolute_uri(args.output).rstrip("/")
    fs, root = filesystem(output)
    if fs.exists(f"{root}/{MANIFEST}") and not args.overwrite:
        raise UsageError(
            f"--output {args.output} already holds a complete run ({MANIFEST}); "
            "pass --overwrite to replace it"
        )
    return ScoreJob(
        input=absolute_uri(args.input),
        output=output,
        paths=paths,
        checkpoint=checkpoint,
        model_uri=model_uri,
        pipeline=PipelineConfig(
            batch_size=args.batch_size,
            files_per_block=args.files_per_block,
            min_actors=min_actors,
            max_actors=max_actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            threads_per_actor=args.threads_per_actor,
            preprocess_cpus=args.preprocess_cpus,
            preprocess_concurrency=args.preprocess_tasks,
            device=args.device,
            precision=args.precision,
        ),
        overwrite=args.overwrite,
        progress_interval=args.progress_interval,
        endpoint_url=args.endpoint_url,
        rows_per_file=args.rows_per_file,
    )


def sha256_of(uri: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _report_progress(total: int, interval: float, stop: threading.Event) -> Callable[[], None]:
    """A loop that logs rows done, images/s and ETA until `stop` is set."""
    counter = ray.get_actor(PROGRESS_ACTOR)
    started = time.monotonic()

    def loop() -> None:
        while not stop.wait(interval):
            done = ray.get(counter.total.remote())
            elapsed = time.monotonic() - started
            rate = done / elapsed if elapsed else 0.0
            eta = f"{(total - done) / rate:.0f} s" if rate else "unknown"
            log.info("scored %d/%d rows (%.1f%%), %.0f images/s, ETA %s",
                     done, total, 100 * done / total, rate, eta)

    return loop


def _output_rows(job: ScoreJob) -> pyarrow.Table:
    """The path and status of every row written under the output so far."""
    fs, root = filesystem(job.output)
    if not fs.exists(root):
        return pyarrow.table({"path": [], "status": []})
    files = [p for p in fs.find(root) if p.endswith(".parquet") and "/_" not in p[len(root):]]
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["path", "status"])
        tables.append(table.append_column("file", pyarrow.array([path] * len(table))))
    if not tables:
        return pyarrow.table({"path": [], "status": [], "file": []})
    return pyarrow.concat_tables(tables)


def _drop_duplicates(job: ScoreJob, rows: pyarrow.Table) -> pyarrow.Table:
    """Remove second copies of a path, which a run killed between writing a file and recording
    it in Ray Data's checkpoint leaves behind; whole-file rewrites keep each file consistent."""
    seen: set[str] = set()
    fs, _ = filesystem(job.output)
    paths, files = rows.column("path").to_pylist(), rows.column("file").to_pylist()
    redundant: dict[str, set[str]] = {}
    for path, file in zip(paths, files, strict=True):
        if path in seen:
            redundant.setdefault(file, set()).add(path)
        seen.add(path)
    for file, drop in redundant.items():
        with fs.open(file, "rb") as f:
            table = pq.read_table(f)
        keep = pyarrow.compute.invert(pyarrow.compute.is_in(table.column("path"), pyarrow.array(drop)))
        with fs.open(file, "wb") as f:
            pq.write_table(table.filter(keep), f)
        log.warning("removed %d duplicate rows left by an interrupted run from %s", len(drop), file)
    return _output_rows(job) if redundant else rows


def run(job: ScoreJob) -> dict[str, Any]:
    """Score every file, check the accounting, and write the manifest; returns the manifest."""
    fs, root = filesystem(job.output)
    if job.overwrite and fs.exists(root):
        fs.rm(root, recursive=True)
    previous = len(_output_rows(job))
    if previous:
        log.info("resuming: %d rows already written under %s", previous, job.output)
    started_at, started = datetime.now(UTC), time.monotonic()
    arrow_fs = arrow_filesystem(job.output, job.endpoint_url)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.checkpoint_config = CheckpointConfig(
        id_column="path",
        checkpoint_path=f"{job.output}/{CHECKPOINT_DIR}",
        override_filesystem=arrow_fs,
    )
    counter = ProgressCounter.options(name=PROGRESS_ACTOR, get_if_exists=True).remote()
    ray.get(counter.total.remote())
    stop = threading.Event()
    reporter = threading.Thread(
        target=_report_progress(len(job.paths) - previous, job.progress_interval, stop), daemon=True
    )
    reporter.start()
    try:
        ds = score_files(job.paths, job.checkpoint, job.pipeline, filesystem(job.input, job.endpoint_url)[0])
        ds.write_parquet(job.output.split("://", 1)[-1] if arrow_fs else job.output, filesystem=arrow_fs,
                         min_rows_per_file=job.rows_per_file)
    finally:
        stop.set()
        reporter.join()
        ray.kill(counter)
    seconds = time.monotonic() - started
    rows = _drop_duplicates(job, _output_rows(job))
    written = rows.column("path").to_pylist()
    expected = {p.split("://", 1)[-1] for p in job.paths}
    missing, extra = expected - set(written), set(written) - expected
    if missing or extra or len(written) != len(expected):
        raise RuntimeError(
            f"output does not account for the input: {len(missing)} missing, {len(extra)} unexpected "
            f"(e.g. {sorted(missing or extra)[:3]})"
        )
    statuses = rows.column("status").to_pylist()
    scored_now = len(written) - previous
    manifest = {
        "input": job.input,
        "output": job.output,
        "model": {
            "name": job.checkpoint.name,
            "arch": job.checkpoint.arch,
            "uri": job.model_uri,
            "sha256": sha256_of(job.model_uri),
        },
        "rows": {"total": len(written), "ok": statuses.count("ok"), "error": statuses.count("error")},
        "resumed_rows": previous,
        "started": started_at.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images_per_s": round(scored_now / seconds, 1) if seconds else None,
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "pipeline": asdict(job.pipeline),
    }
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    args.endpoint_url = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    try:
        job = plan_job(args)
    except UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    log.info("scoring %d files from %s with %s into %s", len(job.paths), job.input,
             job.checkpoint.name, job.output)
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    manifest = run(job)
    rows = manifest["rows"]
    print(f"wrote {rows['total']} rows ({rows['ok']} ok, {rows['error']} error) to {job.output} "
          f"at {manifest['images_per_s']} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
