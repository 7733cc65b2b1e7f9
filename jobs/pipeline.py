"""The scoring pipeline on Ray Data, shared by `jobs.score` and `jobs.evaluate`.

Files are read, decoded and searched for faces by stateless CPU read tasks
(`jobs.decoding.ImageFiles`) and scored by an actor pool that holds one `emotion.Predictor` per
actor, so accelerators never wait on JPEG decoding or face detection. An unreadable or
undecodable file becomes a row with status "error", a photo without a face one with status
"no_face"; neither fails a task. Read tasks reserve a different CPU share from the actors on
purpose: Ray Data fuses adjacent operators with identical resources, which would put decoding back
inside the inference actors.
"""

import argparse
import resource
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
import yaml
from fsspec import AbstractFileSystem
from ray.data import ActorPoolStrategy

from emotion.checkpoint import Checkpoint
from emotion.faces import FACE_MODES, FaceConfig, detector_names, load_face_config
from emotion.predictor import BACKENDS, PRECISIONS, Predictor, prediction_columns
from emotion.uris import strip_scheme
from jobs.common import UsageError
from jobs.conf import CONF_DIR
from jobs.decoding import ImageFiles

PROGRESS_ACTOR = "emotion-ray-progress"
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")


@dataclass(frozen=True)
class PipelineConfig:
    """How the pipeline is laid out on the cluster; the model itself comes from the checkpoint.

    Fields are named as the flags that set them and have no defaults: those live in conf/*.yaml.
    """

    batch_size: int
    files_per_block: int
    # None: sized to the cluster at start (jobs.layout).
    min_actors: int | None
    max_actors: int | None
    gpus_per_actor: float
    cpus_per_actor: float | None
    threads_per_actor: int | None
    preprocess_cpus: float
    preprocess_tasks: int | None
    device: str | None
    precision: str
    # torch | onnxruntime (emotion.predictor.BACKENDS); onnxruntime: float32 or int8 on CPU only.
    backend: str
    max_pixels: int
    # whole | detect | auto (emotion.faces.FACE_MODES); a set in jobs.evaluate may choose its own.
    faces: str
    # A face config file; None: the project's conf/faces.yaml.
    face_config: str | None


# What "auto" settles to; a resumed run keeps the one it started with.
SETTLED_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The layout a job's flags ask for: `--actors N` is a fixed pool, `--min-actors/--max-actors`
    an autoscaling one (jobs that offer them), neither a pool fitted to the cluster."""
    min_actors, max_actors = getattr(args, "min_actors", None), getattr(args, "max_actors", None)
    if min_actors is None:
        min_actors = max_actors = args.actors
    return PipelineConfig(
        batch_size=args.batch_size,
        files_per_block=args.files_per_block,
        min_actors=min_actors,
        max_actors=max_actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        preprocess_cpus=args.preprocess_cpus,
        preprocess_tasks=args.preprocess_tasks,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        max_pixels=args.max_pixels,
        faces=args.faces,
        face_config=args.face_config,
    )


def check_faces(mode: str, flag: str = "--faces") -> None:
    """Refuse a `faces` mode other than whole, detect or auto, in one line."""
    if mode not in FACE_MODES:
        raise UsageError(f"{flag} {mode}: expected one of {', '.join(FACE_MODES)}")


def settled_precision(args: argparse.Namespace, checkpoint: Checkpoint, resumed: dict[str, Any] | None = None
                      ) -> str:
    """The precision every actor of the run computes in: `--precision`, except that "auto" on CPU
    actors is settled here, once, in the driver.

    Left to each actor, "auto" would be timed by each one under the others' load, and actors near
    a margin could choose differently and mix bf16, float32 and int8 rows in one output. A partial
    run being resumed (`resumed`: its run record) keeps the precision it started with. GPU actors
    keep "auto": there it follows the device's bf16 support, the same on every actor.
    """
    if args.precision == "int8" and not checkpoint.int8_graph:
        raise UsageError("--precision int8: the model carries no int8 graph (python -m jobs.quantize makes one)")
    on_gpu = args.device not in (None, "cpu") or (args.device is None and args.gpus_per_actor > 0)
    if args.precision != "auto" or on_gpu:
        return args.precision
    if resumed is not None and resumed.get("precision") in SETTLED_PRECISIONS:
        return resumed["precision"]
    return Predictor(checkpoint, device="cpu", precision="auto", backend=args.backend).precision


def settled_config(args: argparse.Namespace, checkpoint: Checkpoint, resumed: dict[str, Any] | None = None
                   ) -> PipelineConfig:
    """`pipeline_config(args)` with its precision settled for every actor (`settled_precision`)."""
    return replace(pipeline_config(args), precision=settled_precision(args, checkpoint, resumed))


def check_backend(backend: str, precision: str, gpus_per_actor: float, device: str | None) -> None:
    """Refuse, in one line before any work, a backend and precision the actors' Predictor would
    refuse in every actor: ONNX Runtime and int8 run on the CPU only, and onnxruntime has no bf16."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and precision == "bf16":
        raise UsageError("--backend onnxruntime runs float32 or int8: --precision bf16 is not possible "
                         "(use auto, fp32 or int8)")
    if (backend == "onnxruntime" or precision == "int8") and (gpus_per_actor > 0 or (device not in (None, "cpu"))):
        what = "--backend onnxruntime" if backend == "onnxruntime" else "--precision int8"
        raise UsageError(f"{what} runs on the CPU only: drop --gpus-per-actor and --device "
                         f"(got {gpus_per_actor:g} GPUs per actor, device {device or 'default'})")


def face_settings(path: str | None) -> FaceConfig:
    """The face config in `path` (None: the project's conf/faces.yaml), checked before any work: a
    missing file, an unknown key or detector, or parameters the detector refuses are one line
    naming the file, not a failure in every read task. Building the detector is what checks its
    parameters (and that its library is installed); it costs a fraction of a second."""
    where = path or str(CONF_DIR / "faces.yaml")
    try:
        config = load_face_config(where)
    except FileNotFoundError:
        raise UsageError(f"--face-config {where}: no such file") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"--face-config {where}: {' '.join(str(exc).split())}") from None
    if config.detector not in detector_names():
        raise UsageError(f"--face-config {where}: unknown detector {config.detector!r}; "
                         f"known: {', '.join(detector_names())}")
    try:
        config.build()
    except (ImportError, TypeError, ValueError) as exc:
        raise UsageError(f"--face-config {where}: detector {config.detector}: {exc}") from None
    return config


def output_schema(labels: tuple[str, ...] | list[str], timing: bool = False) -> pa.Schema:
    """The one schema of every output block, whatever mix of good and bad files it holds: a
    column inferred per block (`error` is null-typed where a block has no error) would make blocks
    disagree, and Parquet files written from them unreadable together."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("predicted_label", pa.string()),
        pa.field("predicted_class", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32()),
        *(pa.field(f"prob_{label}", pa.float32()) for label in labels),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),
        *(pa.field(name, pa.int32()) for name in BOX_COLUMNS),
        pa.field("face_score", pa.float32()),
        pa.field("faces_in_image", pa.int32(), nullable=False),
    ]
    if timing:
        fields += [pa.field("inference_seconds", pa.float64()), pa.field("peak_rss_bytes", pa.int64()),
                   pa.field("peak_gpu_bytes", pa.int64())]
    return pa.schema(fields)


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Files scored so far, for the driver's progress line and stall detector.

    Rows are marked by their file's index in the job's file list, so a photo's several faces, and
    a batch retried after an actor died, count once.
    """

    def __init__(self, files: int) -> None:
        self.done = np.zeros(files, dtype=bool)

    def add(self, rows: np.ndarray) -> None:
        self.done[rows] = True

    def total(self) -> int:
        return int(self.done.sum())


class ScoreBatch:
    """Actor-pool callable: one Predictor per actor, probabilities and labels per row.

    With `timing`, each row also carries its share of the batch's forward-pass time and the
    actor's peak memory so far, which evaluation reports as measured efficiency; scoring leaves it
    off to keep its output schema.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str | None,
        precision: str,
        backend: str,
        threads: int | None,
        timing: bool = False,
    ) -> None:
        # Ray pins OMP_NUM_THREADS to the actor's CPU count (1 by default); on a CPU-only node
        # the forward pass is the bottleneck and may use more cores than the actor reserves.
        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(checkpoint, device=device, precision=precision, backend=backend)
        self.model_name = self.predictor.name
        self.timing = timing
        self.schema = output_schema(self.predictor.labels, timing)
        try:
            self.progress = ray.get_actor(PROGRESS_ACTOR)
        except ValueError:
            self.progress = None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        labels = self.predictor.labels
        n = len(batch["path"])
        ok = batch["status"] == "ok"
        probs = np.full((n, len(labels)), np.nan, dtype=np.float32)
        started = time.perf_counter()
        if ok.any():
            probs[ok] = self.predictor.predict_pixels(batch["pixels"][ok])
        forward_seconds = time.perf_counter() - started
        out: dict[str, Any] = {
            "path": batch["path"],
            "status": batch["status"],
            "error": batch["error"],
            **prediction_columns(probs, labels),
        }
        out["width"], out["height"] = batch["width"], batch["height"]
        out["model"] = np.full(n, self.model_name, dtype=object)
        out.update(_face_columns(batch))
        if self.timing:
            out.update(self._timing_columns(ok, forward_seconds))
        if self.progress is not None:
            self.progress.add.remote(batch["row"])
        return pa.table(out, schema=self.schema)

    def _timing_columns(self, ok: np.ndarray, forward_seconds: float) -> dict[str, np.ndarray]:
        """Forward-pass seconds shared among the batch's decoded rows, and peak memory in bytes."""
        share = forward_seconds / max(int(ok.sum()), 1)
        # ru_maxrss is in kilobytes on Linux: the resident-set high-water mark of this actor.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        device = self.predictor.device
        gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return {
            "inference_seconds": np.where(ok, share, 0.0),
            "peak_rss_bytes": np.full(len(ok), rss, dtype=np.int64),
            "peak_gpu_bytes": np.full(len(ok), gpu, dtype=np.int64),
        }


def _face_columns(batch: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """The face columns of the output: boxes and score null where the read stage found no box
    (it marks those with a box width of 0: the image taken whole, no face, an error)."""
    no_box = batch["box_w"] == 0
    columns = {name: pa.array(batch[name], pa.int32(), mask=no_box) for name in BOX_COLUMNS}
    return {
        "face_index": batch["face_index"],
        **columns,
        "face_score": pa.array(batch["face_score"], pa.float32(), mask=no_box),
        "faces_in_image": batch["faces_in_image"],
    }


def score_files(
    paths: list[str],
    checkpoint: Checkpoint,
    config: PipelineConfig,
    filesystem: AbstractFileSystem,
    timing: bool = False,
) -> ray.data.Dataset:
    """A lazy Dataset of prediction rows for the files in `paths`, read through `filesystem`
    (nothing runs until consumed), in the schema of `output_schema`: under `config.faces`, one
    row per face, or one for a file without any (error, no face). Paths in the output have no
    scheme (bucket/key for S3). The pool's size and CPUs must be set (see `jobs.layout`).

    `timing` adds the efficiency columns of `ScoreBatch` (inference_seconds, peak_rss_bytes,
    peak_gpu_bytes).
    """
    # Read tasks hold a bounded number of files, so the rows in flight between reading and a
    # written Parquet file (what a stopped run redoes) stay bounded too.
    files = ImageFiles(
        [strip_scheme(p) for p in paths],
        filesystem,
        size=checkpoint.input_size,
        channels=checkpoint.channels,
        max_pixels=config.max_pixels,
        files_per_block=config.files_per_block,
        batch_size=config.batch_size,
        faces=config.faces,
        face_config=load_face_config(config.face_config or CONF_DIR / "faces.yaml"),
    )
    ds = ray.data.read_datasource(
        files,
        num_cpus=config.preprocess_cpus,
        compute=ray.data.TaskPoolStrategy(size=config.preprocess_tasks),
    )
    return ds.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "device": config.device or ("cuda" if config.gpus_per_actor > 0 else None),
            "precision": config.precision,
            "backend": config.backend,
            "threads": config.threads_per_actor,
            "timing": timing,
        },
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
