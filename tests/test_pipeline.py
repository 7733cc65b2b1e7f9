"""The Ray Data plan: stages, resources and the GPU layout, checked without running it."""

import argparse
import subprocess
import sys

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image
from ray import cloudpickle
from ray.data import ActorPoolStrategy
from ray.data.block import BlockAccessor

from emotion.faces import FaceFinder, load_face_config
from emotion.labels import LABELS
from emotion.preprocess import decode_image
from jobs.common import UsageError
from jobs.decoding import ImageFiles, find_faces
from jobs.pipeline import ProgressCounter, ScoreBatch, output_schema, score_files, settled_precision
from tests.conftest import pipeline, tiny_checkpoint, with_int8_graph
from tests.images import encode, jpeg
from tests.services import ROOT
from tests.test_faces import CONF, PLACED, SIDE, three_faces

FACE_CONFIG = load_face_config(CONF)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_gpu_plan_reserves_gpus_per_actor_without_a_gpu(local_ray, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    config = pipeline(gpus_per_actor=0.5, min_actors=2, max_actors=8, cpus_per_actor=1.0, batch_size=64)
    ds = score_files([str(tmp_path / "a.jpg")], tiny_checkpoint(), config, fsspec.filesystem("file"))
    actor_op = ds._logical_plan.dag
    decode_op = actor_op.input_dependencies[0]
    assert actor_op.ray_remote_args["num_gpus"] == 0.5
    assert isinstance(actor_op.compute, ActorPoolStrategy)
    assert (actor_op.compute.min_size, actor_op.compute.max_size) == (2, 8)
    assert actor_op.fn_constructor_kwargs["device"] == "cuda"
    assert "num_gpus" not in decode_op.ray_remote_args or not decode_op.ray_remote_args["num_gpus"]
    assert not isinstance(decode_op.compute, ActorPoolStrategy)


def test_cpu_plan_uses_the_default_device(local_ray, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    config = pipeline(min_actors=1, max_actors=1, cpus_per_actor=1.0)
    ds = score_files([str(tmp_path / "a.jpg")], tiny_checkpoint(), config, fsspec.filesystem("file"))
    assert ds._logical_plan.dag.fn_constructor_kwargs["device"] is None
    assert ds._logical_plan.dag.ray_remote_args.get("num_gpus", 0) == 0


def test_decode_then_score_a_batch_by_hand():
    contents = [jpeg(seed=1), b"junk", PermissionError(13, "Permission denied"), jpeg(seed=2)]
    finder = FaceFinder(FACE_CONFIG, 48, 1, 10_000)
    decoded = find_faces(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], range(4), contents, finder, "whole")
    assert decoded["pixels"].shape == (4, 48, 48, 1)
    assert list(decoded["status"]) == ["ok", "error", "error", "ok"]
    assert np.array_equal(decoded["pixels"][0], decode_image(jpeg(seed=1), 48, 1).pixels)
    table = ScoreBatch(tiny_checkpoint(), "cpu", "fp32", "torch", None)(decoded)
    assert table.schema == output_schema(LABELS)
    scored = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    assert list(scored["error"]) == [
        None, "not an image", "unreadable: PermissionError: [Errno 13] Permission denied", None
    ]
    assert np.isnan(scored["confidence"][1]) and scored["predicted_class"][1] == -1
    assert list(scored["face_index"]) == [0, 0, 0, 0] and list(scored["faces_in_image"]) == [1, 0, 0, 1]
    assert table.column("box_x").null_count == 4 and table.column("face_score").null_count == 4
    probs = np.stack([scored[k] for k in scored if k.startswith("prob_")], axis=1)
    assert np.allclose(probs[[0, 3]].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probs[[0, 3]].max(axis=1), scored["confidence"][[0, 3]])


def test_a_photo_gives_a_row_per_face_and_a_blank_one_a_no_face_row():
    """Rows of one photo carry its file index, so progress counts files; boxes are in its pixels."""
    canvas = encode(Image.fromarray(three_faces()), "JPEG", quality=95)
    grey = encode(Image.new("L", (640, 480), 128), "JPEG")
    finder = FaceFinder(FACE_CONFIG, 48, 1, 10_000_000)
    found = find_faces(["three.jpg", "grey.jpg", "crop.jpg"], range(7, 10), [canvas, grey, jpeg()], finder, "auto")
    assert list(found["path"]) == ["three.jpg"] * 3 + ["grey.jpg", "crop.jpg"]
    assert list(found["row"]) == [7, 7, 7, 8, 9]
    assert list(found["status"]) == ["ok", "ok", "ok", "no_face", "ok"]
    assert list(found["face_index"]) == [0, 1, 2, 0, 0] and list(found["faces_in_image"]) == [3, 3, 3, 0, 1]
    assert found["box_w"][3:].tolist() == [0, 0], "no box: nothing found, and a 48x48 crop taken whole"
    centres = sorted((x + w / 2, y + h / 2) for x, y, w, h in zip(
        found["box_x"][:3], found["box_y"][:3], found["box_w"][:3], found["box_h"][:3], strict=True))
    for (cx, cy), (x, y) in zip(centres, sorted(PLACED.values()), strict=True):
        assert abs(cx - (x + SIDE / 2)) < SIDE / 4 and abs(cy - (y + SIDE / 2)) < SIDE / 4
    assert not found["pixels"][3].any() and found["pixels"][0].any()
    table = ScoreBatch(tiny_checkpoint(), "cpu", "fp32", "torch", None)(found)
    assert table.column("status").to_pylist()[3] == "no_face"
    assert table.column("predicted_label").to_pylist()[3] is None
    assert table.column("box_x").to_pylist()[3:] == [None, None]


def test_read_tasks_hold_a_bounded_number_of_files(tmp_path):
    """Tasks bound the rows in flight, so their size is fixed by files_per_block, not by Ray."""
    paths = []
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(seed=i))
        paths.append(str(tmp_path / f"{i}.jpg"))
    paths.append(str(tmp_path / "deleted after listing.jpg"))
    files = ImageFiles(paths, fsspec.filesystem("file"), 48, 1, 10_000, files_per_block=3, batch_size=2,
                       faces="whole", face_config=FACE_CONFIG)
    tasks = files.get_read_tasks(parallelism=100)
    assert [t.metadata.num_rows for t in tasks] == [3, 3, 2]
    blocks = [BlockAccessor.for_block(b) for b in tasks[0]()]
    assert [b.num_rows() for b in blocks] == [2, 1]
    assert blocks[0].to_numpy("path").tolist() == paths[:2]
    assert blocks[0].to_numpy("pixels").shape == (2, 48, 48, 1)
    assert blocks[0].to_arrow().schema.field("error").type == pa.string(), "typed even with no error in the block"
    assert [BlockAccessor.for_block(b).to_numpy("row").tolist() for b in tasks[2]()] == [[6, 7]]
    many = ImageFiles([f"/faces/{i:06d}.jpg" for i in range(100_000)], fsspec.filesystem("file"), 48, 1,
                      10_000, files_per_block=3, batch_size=2, faces="detect", face_config=FACE_CONFIG)
    assert len(cloudpickle.dumps(many.get_read_tasks(1)[0])) < 5_000, "a task must not carry every path"
    assert many.get_read_tasks(1)[0].metadata.num_rows is None, "rows per file are unknown before detection"
    last = BlockAccessor.for_block(next(iter(tasks[2]()))).to_pandas()
    assert last["status"].tolist() == ["ok", "error"]
    assert last["error"][1].startswith("unreadable: FileNotFoundError")


def test_decoding_workers_do_not_import_torch():
    """Ray Data imports jobs.decoding in every decode worker; torch there costs seconds each."""
    probe = "import sys, jobs.decoding; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_progress_counts_a_retried_batch_once(local_ray):
    counter = ProgressCounter.remote(5)
    counter.add.remote(np.array([0, 1, 2]))
    counter.add.remote(np.array([1, 2]))
    assert ray.get(counter.total.remote()) == 3


def test_auto_precision_is_settled_once_in_the_driver_for_cpu_actors():
    def args(**given):
        return argparse.Namespace(**({"precision": "auto", "backend": "torch", "gpus_per_actor": 0, "device": None}
                                     | given))

    checkpoint = tiny_checkpoint()
    assert settled_precision(args(), checkpoint) in ("bf16", "fp32")
    assert settled_precision(args(precision="bf16"), checkpoint) == "bf16"
    assert settled_precision(args(), checkpoint, {"precision": "bf16"}) == "bf16", "a resumed run keeps its arithmetic"
    assert settled_precision(args(), checkpoint, {"precision": "auto"}) in ("bf16", "fp32")
    assert settled_precision(args(gpus_per_actor=1), checkpoint) == "auto", "GPU actors agree by device"
    assert settled_precision(args(gpus_per_actor=1, device="cpu"), checkpoint) in ("bf16", "fp32"), "CPU actors"
    assert settled_precision(args(backend="onnxruntime"), checkpoint) == "fp32", "the tiny model has no int8 graph"
    with pytest.raises(UsageError, match="--precision int8: the model carries no int8 graph"):
        settled_precision(args(precision="int8"), checkpoint)
    quantized = with_int8_graph(checkpoint)
    assert settled_precision(args(precision="int8"), quantized) == "int8"
    assert settled_precision(args(), quantized) in ("bf16", "fp32", "int8")
    assert settled_precision(args(), quantized, {"precision": "int8"}) == "int8", "a resumed run keeps its arithmetic"
