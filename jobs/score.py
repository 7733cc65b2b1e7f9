"""`python -m jobs.score --input PATH_OR_S3 --output PATH_OR_S3`: Parquet predictions for every image.

Runs standalone (starting a local Ray) or under `ray job submit`. Every input file appears in the
output exactly once: as one prediction row per face (`--faces`), as a `no_face` row, or as an error
row; `_manifest.json`, written last, marks the output complete. A run that stops early resumes
where it left off when started again.
"""

import _thread
import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow
import pyarrow.compute
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from emotion.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint_file
from emotion.folders import list_images
from emotion.predictor import PRECISIONS
from emotion.uris import absolute_uri, arrow_filesystem, filesystem, join, strip_scheme
from jobs.common import UsageError, start
from jobs.conf import apply_defaults
from jobs.layout import WRITE_CPUS, LayoutError, alive_nodes, fit_layout
from jobs.output import (
    MANIFEST,
    OutputError,
    OutputState,
    check_output,
    check_separate,
    clear_output,
    inspect_output,
    run_record,
    write_record,
)
from jobs.pipeline import (
    PROGRESS_ACTOR,
    PipelineConfig,
    ProgressCounter,
    check_backend,
    check_faces,
    face_settings,
    score_files,
    settled_config,
)

log = logging.getLogger("jobs.score")


class StallError(Exception):
    """No row was scored for the stall timeout while work remained; the message says what Ray
    reported as waiting."""


@dataclass(frozen=True)
class ScoreJob:
    """A validated scoring run: what to read, what to write, which model, how to lay it out."""

    input: str
    output: str
    paths: list[str]
    checkpoint: Checkpoint
    model_uri: str
    model_sha256: str
    pipeline: PipelineConfig
    overwrite: bool
    progress_interval: float
    stall_timeout: float
    endpoint_url: str | None
    rows_per_file: int
    skipped: dict[str, str]
    previous: OutputState
    record: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    """The command line, its defaults read from conf/score.yaml (the only place they are set)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__)
    parser.add_argument("--input", required=True, help="image folder or s3:// prefix, read recursively")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for Parquet and manifest")
    parser.add_argument("--model", help="checkpoint path or s3:// URI (default: the embedded model)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--files-per-block", type=int, help="files per read-and-decode task")
    parser.add_argument("--rows-per-file", type=int, help="rows gathered into each Parquet file, at least")
    parser.add_argument("--actors", type=int, help="fixed number of inference actors (default: fitted to the cluster)")
    parser.add_argument("--min-actors", type=int, help="autoscaling pool: smallest size")
    parser.add_argument("--max-actors", type=int, help="autoscaling pool: largest size")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per inference actor (fractions allowed)")
    parser.add_argument("--cpus-per-actor", type=float, help="CPUs Ray reserves per actor (default: fitted)")
    parser.add_argument("--threads-per-actor", type=int, help="torch threads per actor (CPU inference)")
    parser.add_argument("--preprocess-cpus", type=float, help="CPUs per decoding task")
    parser.add_argument("--preprocess-tasks", type=int, help="cap on concurrent decoding tasks")
    parser.add_argument("--max-pixels", type=int, help="larger images are error rows, refused before decoding")
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--backend", help="torch, or onnxruntime (the checkpoint's ONNX graph, on the CPU only)")
    parser.add_argument("--device", help="torch device for inference (default: cuda when given GPUs)")
    parser.add_argument("--limit", type=int, help="score only the first N files (dry runs)")
    parser.add_argument("--faces", help="whole: each image is one face; detect: every face found; "
                        "auto: whole for images about the model's input size, detect otherwise")
    parser.add_argument("--face-config", help="face detector and framing YAML (default: conf/faces.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete output")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    parser.add_argument("--progress-interval", type=float, help="seconds between progress log lines")
    parser.add_argument("--stall-timeout", type=float,
                        help="seconds without a scored row, while work remains, before the job fails")
    apply_defaults(parser, "score")
    return parser


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{flag} must be {'zero or more' if allow_zero else 'positive'}, not {value}")


def plan_job(args: argparse.Namespace) -> ScoreJob:
    """Check every input before any cluster work: a bad flag costs seconds, not a job."""
    for flag in ("batch_size", "files_per_block", "rows_per_file", "actors", "min_actors", "max_actors", "limit",
                 "preprocess_tasks", "threads_per_actor", "max_pixels"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _positive(args.gpus_per_actor, "--gpus-per-actor", allow_zero=True)
    _positive(args.cpus_per_actor, "--cpus-per-actor", allow_zero=True)
    _positive(args.preprocess_cpus, "--preprocess-cpus", allow_zero=True)
    _positive(args.stall_timeout, "--stall-timeout")
    _positive(args.progress_interval, "--progress-interval")
    check_faces(args.faces)
    check_backend(args.backend, args.precision, args.gpus_per_actor, args.device)
    faces = face_settings(args.face_config)
    if args.actors is not None and args.min_actors is not None:
        raise UsageError("--actors and --min-actors/--max-actors are alternatives; pass one")
    if (args.min_actors is None) != (args.max_actors is None):
        raise UsageError("--min-actors and --max-actors go together")
    if args.min_actors is not None and args.min_actors > args.max_actors:
        raise UsageError(f"--min-actors {args.min_actors} is larger than --max-actors {args.max_actors}")
    try:
        listing = list_images(absolute_uri(args.input))
    except FileNotFoundError:
        raise UsageError(f"--input {args.input}: no such folder or prefix") from None
    except PermissionError as exc:
        raise UsageError(f"--input {args.input}: not readable ({exc})") from None
    paths = listing.paths
    if not paths:
        raise UsageError(f"--input {args.input}: no image files found (looked for .jpg, .png, ...)")
    model_uri = absolute_uri(args.model) if args.model else str(DEFAULT_CHECKPOINT)
    try:
        # The digest recorded is of the bytes scored, not of a later read of a file that may change.
        checkpoint, model_sha256, _ = load_checkpoint_file(model_uri)
    except CheckpointError as exc:
        raise UsageError(f"--model {exc}") from None
    if args.limit:
        paths = paths[: args.limit]
    input_uri = absolute_uri(args.input).rstrip("/")
    output = absolute_uri(args.output).rstrip("/")
    # Rows cut under other face settings must not share an output: they could differ in number;
    # rows of two backends differ in the last digits of their probabilities.
    fs, root = filesystem(output)
    try:
        check_separate(input_uri, output)
        previous = inspect_output(fs, root)
        # First, since the backend decides which precisions "auto" can settle to.
        if previous.record is not None and not (args.overwrite or previous.complete) \
                and previous.record.get("backend", "torch") != args.backend:
            raise UsageError(f"--output {args.output} holds a partial run made with --backend "
                             f"{previous.record.get('backend', 'torch')} (now {args.backend}); rerun with the same "
                             "backend to resume, or pass --overwrite to start again")
        pipeline = settled_config(args, checkpoint, None if args.overwrite or previous.complete else previous.record)
        record = run_record(input_uri, model_uri, model_sha256, args.limit, pipeline.precision) | {
            "faces": {"mode": args.faces, "config": asdict(faces)}, "backend": args.backend,
        }
        check_output(previous, args.output, record, args.overwrite)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    if previous.record is not None and not (args.overwrite or previous.complete) \
            and previous.record.get("faces") != record["faces"]:
        before = previous.record.get("faces") or {}
        raise UsageError(f"--output {args.output} holds a partial run made with other face settings: "
                         f"--faces {before.get('mode')} (now {args.faces})"
                         f"{'' if before.get('config') == record['faces']['config'] else ' and another face config'}; "
                         "rerun with the same settings to resume, or pass --overwrite to start again")
    return ScoreJob(
        input=input_uri,
        output=output,
        paths=paths,
        checkpoint=checkpoint,
        model_uri=model_uri,
        model_sha256=model_sha256,
        pipeline=pipeline,
        overwrite=args.overwrite,
        progress_interval=args.progress_interval,
        stall_timeout=args.stall_timeout,
        endpoint_url=args.endpoint_url,
        rows_per_file=args.rows_per_file,
        skipped=listing.skipped,
        previous=previous,
        record=record,
    )


def _waiting_work() -> str:
    """What the cluster cannot place right now (as `ray status` lists pending demands) and what
    it has free: the usual reason a stalled job is stalled."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        demands = [f"{request.count} x {request.bundle}"
                   for demand in status.resource_demands.ray_task_actor_demand
                   for request in demand.bundles_by_count]
        waiting = "waiting for resources: " + (", ".join(demands) or "nothing")
    except Exception as exc:  # a diagnostic only: its failure must not hide the stall itself
        waiting = f"pending demands unavailable ({type(exc).__name__})"
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = ray.cluster_resources()
    return f"{waiting}; free {free} of {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"


# Seconds a stalled driver has to stop once interrupted before it is ended outright. The
# interrupt reaches the main thread only when it next runs Python code: held in native code, or in
# Ray's shutdown as it exits, the driver would hang past the stall it has just reported.
STOP_GRACE = 60.0


class Progress:
    """The driver's watch over a run: a log line every `interval` seconds (files done, images/s,
    ETA) and, when no row is scored for `stall_timeout` seconds while work remains, a failure
    naming what Ray reports as waiting, instead of a job that hangs unnoticed. A driver still
    alive `grace` seconds after that failure exits with it regardless."""

    def __init__(self, counter: Any, total: int, interval: float, stall_timeout: float,
                 grace: float = STOP_GRACE) -> None:
        self.counter, self.total = counter, total
        self.interval, self.stall_timeout, self.grace = interval, stall_timeout, grace
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        started = last_change = time.monotonic()
        done = last_done = 0
        tick = min(self.interval, self.stall_timeout / 4)
        last_log = started
        while not self._stop.wait(tick):
            now = time.monotonic()
            try:
                done = ray.get(self.counter.total.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("progress counter unavailable (%s); still watching for a stall", type(exc).__name__)
            if done != last_done:
                last_done, last_change = done, now
            elif done < self.total and now - last_change > self.stall_timeout:
                left = self.total - done
                self.stalled = f"no row scored for {now - last_change:.0f} s with {left} of {self.total} left"
                # Armed before asking Ray what waits, which could hang as well.
                ender = threading.Timer(self.grace, self._end_outright)
                ender.daemon = True
                ender.start()
                self.stalled += f"; {_waiting_work()}"
                log.error("stalled: %s", self.stalled)
                _thread.interrupt_main()
                return
            if now - last_log >= self.interval:
                last_log = now
                rate = done / (now - started)
                eta = f"{(self.total - done) / rate:.0f} s" if rate else "unknown"
                log.info("scored %d/%d files (%.1f%%), %.0f images/s, ETA %s",
                         done, self.total, 100 * done / self.total, rate, eta)

    def _end_outright(self) -> None:
        """Exit 1 with the stall's line, skipping the clean-up that holds the driver; the
        cluster reclaims a dead driver's workers, and the Parquet already written resumes."""
        sys.stderr.write(f"error: stalled: {self.stalled} (the driver did not stop within {self.grace:g} s "
                         "of its interrupt)\n")
        sys.stderr.flush()
        os._exit(1)


def _parquet_files(job: ScoreJob) -> list[str]:
    fs, root = filesystem(job.output)
    # s3fs keeps listings it has seen; the Parquet files were written since, by Arrow's own client.
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))


_ROW_COLUMNS = ["path", "status", "face_index", "faces_in_image", "predicted_label"]


def _output_rows(job: ScoreJob) -> pd.DataFrame:
    """The path, status, face index, face count and label of every row written under the output
    so far, with the file holding it.

    A file cut short by a killed write (empty, or Parquet's leading magic bytes without a readable
    footer) is the job's own and holds rows that were never recorded as done: it is removed, and
    its rows are scored again. Any other file the job cannot read as its own (not Parquet, or
    without the job's columns) is refused by name and never removed; so is a read error, which
    on an object store is a failed request rather than a cut-short write.
    """
    fs, _ = filesystem(job.output)
    tables = []
    for path in _parquet_files(job):
        with fs.open(path, "rb") as f:
            head = f.read(4)
            if head and head != b"PAR1":
                raise RuntimeError(f"{path} is not a Parquet file this job wrote; move it out of the output "
                                   "folder and rerun")
            f.seek(0)
            try:
                parquet = pq.ParquetFile(f)
            except pyarrow.ArrowInvalid as exc:
                cut_short = exc
            else:
                cut_short = None
                missing = sorted(set(_ROW_COLUMNS) - set(parquet.schema_arrow.names))
                if missing:
                    raise RuntimeError(f"{path} is not this job's output (no column {', '.join(missing)}); "
                                       "move it out of the output folder and rerun")
                table = parquet.read(columns=_ROW_COLUMNS)
        if cut_short is not None:
            log.warning("removing %s, cut short by an interrupted write (%s); its rows are scored again",
                        path, cut_short)
            fs.rm_file(path)
            continue
        tables.append(table.to_pandas().assign(file=path))
    if not tables:
        return pd.DataFrame(columns=[*_ROW_COLUMNS, "file"])
    return pd.concat(tables, ignore_index=True)


def _complete(rows: pd.DataFrame, by: list[str]) -> pd.Series:
    """Per group of `rows`: whether it holds face indices 0..n-1 once each, n being the rows'
    `faces_in_image` (one row for a file with no face)."""
    groups = rows.assign(expected=rows["faces_in_image"].clip(lower=1)).groupby(by, sort=True)
    stats = groups.agg(n=("face_index", "size"), distinct=("face_index", "nunique"), low=("face_index", "min"),
                       top=("face_index", "max"), expected=("expected", "max"), fewest=("expected", "min"))
    return ((stats["n"] == stats["expected"]) & (stats["distinct"] == stats["expected"]) & (stats["low"] == 0)
            & (stats["top"] == stats["expected"] - 1) & (stats["fewest"] == stats["expected"]))


def _reconcile(job: ScoreJob, rows: pd.DataFrame) -> pd.DataFrame:
    """Leave each path's rows in the output exactly once and complete, or not at all.

    The read stage yields a file's rows together, but the inference stage re-batches rows by
    `--batch-size`, so one photo's faces can reach two Parquet files, and a run stopped between
    those writes leaves the photo half-written; a write retried after its worker died can leave a
    second copy. So a path complete within one file keeps that file's copy (the first such file)
    and loses any other; a path whose rows across files form one complete set stays; any other
    path is removed everywhere and scored again. Files are rewritten whole, so each stays
    consistent.
    """
    if rows.empty:
        return rows
    in_file = _complete(rows, ["path", "file"]).rename("complete").reset_index()
    copies = in_file.groupby("path")["file"].transform("size")
    doubtful = in_file[(copies > 1) | ~in_file["complete"]]
    if doubtful.empty:
        return rows
    across_files = _complete(rows[rows["path"].isin(doubtful["path"])], ["path"])
    drop: dict[str, set[str]] = {}
    for path, held in doubtful.groupby("path"):
        whole = held[held["complete"]]
        if not whole.empty:
            drop_from = held["file"][held["file"] != whole["file"].iloc[0]]
        elif across_files[path]:
            continue
        else:
            drop_from = held["file"]
        for file in drop_from:
            drop.setdefault(file, set()).add(path)
    fs, _ = filesystem(job.output)
    for file, paths in drop.items():
        with fs.open(file, "rb") as f:
            table = pq.read_table(f)
        keep = table.filter(pyarrow.compute.invert(pyarrow.compute.is_in(table.column("path"),
                                                                         pyarrow.array(sorted(paths)))))
        if keep.num_rows:
            with fs.open(file, "wb") as f:
                pq.write_table(keep, f)
        else:
            fs.rm_file(file)
        log.warning("removed the rows of %d files left duplicated or incomplete by an interrupted run from %s",
                    len(paths), file)
    return _output_rows(job) if drop else rows


def _score_remaining(job: ScoreJob, paths: list[str]) -> None:
    """Run the pipeline over `paths`, writing Parquet under the output as it goes."""
    arrow_fs = arrow_filesystem(job.output, job.endpoint_url)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    # On the driver's node: a counter on a worker node would die with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = ProgressCounter.options(name=PROGRESS_ACTOR, scheduling_strategy=here).remote(len(paths))
    ray.get(counter.total.remote())
    progress = Progress(counter, len(paths), job.progress_interval, job.stall_timeout)
    try:
        with progress:
            ds = score_files(paths, job.checkpoint, job.pipeline, filesystem(job.input, job.endpoint_url)[0])
            ds.write_parquet(strip_scheme(job.output) if arrow_fs else job.output, filesystem=arrow_fs,
                             min_rows_per_file=job.rows_per_file, ray_remote_args={"num_cpus": WRITE_CPUS})
    except KeyboardInterrupt:
        if progress.stalled:
            raise StallError(progress.stalled) from None
        raise
    finally:
        ray.kill(counter)


def run(job: ScoreJob) -> dict[str, Any]:
    """Score every file not yet in the output, check the accounting, and write the manifest;
    returns the manifest."""
    fs, root = filesystem(job.output)
    if job.overwrite:
        clear_output(fs, job.previous)
    write_record(fs, root, job.record)
    kept = _reconcile(job, _output_rows(job))
    done = set(kept["path"])
    remaining = [p for p in job.paths if strip_scheme(p) not in done]
    previous = len(job.paths) - len(remaining)
    if previous:
        log.info("resuming: %d of %d files already written under %s", previous, len(job.paths), job.output)
    started_at, started = datetime.now(UTC), time.monotonic()
    if remaining:
        _score_remaining(job, remaining)
    seconds = time.monotonic() - started
    # After reconciling, each path left has its complete rows once.
    rows = _reconcile(job, _output_rows(job))
    written = set(rows["path"])
    expected = {strip_scheme(p) for p in job.paths}
    missing, extra = expected - written, written - expected
    if missing or extra:
        raise RuntimeError(
            f"output does not account for the input: {len(missing)} missing, {len(extra)} unexpected "
            f"(e.g. {sorted(missing or extra)[:3]})"
        )
    statuses = rows["status"].value_counts()
    files = rows.drop_duplicates("path")["status"].value_counts()
    scored_now = len(remaining)
    manifest = {
        "input": job.input,
        "output": job.output,
        "model": {
            "name": job.checkpoint.name,
            "arch": job.checkpoint.arch,
            "uri": job.model_uri,
            "sha256": job.model_sha256,
            "backend": job.pipeline.backend,
        },
        "faces": {"total": int(statuses.get("ok", 0)), "mode": job.pipeline.faces,
                  "config": job.record["faces"]["config"]},
        # ok rows are faces classified; rows of files without a face are counted under files.
        "rows": {"total": len(rows), "ok": int(statuses.get("ok", 0)), "error": int(statuses.get("error", 0))},
        "files": {"total": len(written), "with_faces": int(files.get("ok", 0)),
                  "no_face": int(files.get("no_face", 0)), "error": int(files.get("error", 0))},
        "labels": {label: int(count) for label, count in
                   rows["predicted_label"].value_counts().reindex(job.checkpoint.labels, fill_value=0).items()},
        # Readable files by the faces classified in each (0: no face found); errors are left out.
        "faces_per_image": {str(faces): int(count) for faces, count in sorted(
            rows[rows["status"] != "error"].drop_duplicates("path")["faces_in_image"].value_counts().items())},
        "parquet_files": len(set(rows["file"])),
        "resumed_files": previous,
        "resumed_rows": len(kept),
        "skipped": job.skipped,
        "started": started_at.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images_per_s": round(scored_now / seconds, 1) if seconds else None,
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "pipeline": asdict(job.pipeline),
    }
    with fs.open(join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(manifest: dict[str, Any], widest: int = 5) -> str:
    """What a run found, for the person who started it: file and face counts, the labels
    predicted, how many faces the images held, and where the output is, so that nobody has to
    open the Parquet to learn whether the run did what they meant. Images with `widest` faces or
    more share one entry."""
    rows, files = manifest["rows"], manifest["files"]
    labels = sorted(((n, label) for label, n in manifest["labels"].items() if n), key=lambda x: (-x[0], x[1]))
    spread: dict[str, int] = {}
    for faces, count in manifest["faces_per_image"].items():
        key = str(faces) if int(faces) < widest else f"{widest}+"
        spread[key] = spread.get(key, 0) + count
    per_image = ", ".join(f"{k} {'face' if k == '1' else 'faces'}: {n}" for k, n in spread.items())
    output = manifest["output"]
    lines = [
        f"wrote {rows['total']} rows for {files['total']} files ({rows['ok']} faces, {files['no_face']} files "
        f"without a face, {files['error']} error) to {output} at {manifest['images_per_s']} images/s",
        f"  files:            {files['total']}: {files['with_faces']} with faces, {files['no_face']} without a "
        f"face, {_plural(files['error'], 'error')}",
        f"  faces classified: {manifest['faces']['total']} ({manifest['faces']['mode']} mode)",
        f"  predicted:        {', '.join(f'{label} {n}' for n, label in labels) or 'nothing'}",
        f"  files by faces:   {per_image or 'no readable file'}",
        f"  Parquet:          {output}/ ({_plural(manifest['parquet_files'], 'file')})",
        f"  manifest:         {output}/{MANIFEST}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Score every input file; exit 2 with one line on stderr when the flags or the output cannot work."""
    parser = build_parser()
    args = start(parser, argv)
    try:
        job = plan_job(args)
    except UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    log.info("scoring %d files from %s with %s into %s", len(job.paths), job.input,
             job.checkpoint.name, job.output)
    for path, reason in sorted(job.skipped.items()):
        log.warning("skipped %s: %s", path, reason)
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    try:
        job = replace(job, pipeline=fit_layout(job.pipeline, alive_nodes(ray.nodes())))
    except LayoutError as exc:
        parser.exit(2, f"error: {exc}\n")
    pipeline = job.pipeline
    log.info("pool of %s-%s actors of %g CPU and %g GPU; read tasks %g CPU, writes %g CPU",
             pipeline.min_actors, pipeline.max_actors, pipeline.cpus_per_actor, pipeline.gpus_per_actor,
             pipeline.preprocess_cpus, WRITE_CPUS)
    try:
        manifest = run(job)
    except StallError as exc:
        parser.exit(1, f"error: stalled: {exc}\n")
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
