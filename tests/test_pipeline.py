"""The Ray Data plan: stages, resources and the GPU layout, checked without running it."""

import subprocess
import sys

import numpy as np
import pytest
import ray
from ray.data import ActorPoolStrategy

from emotion.preprocess import decode_image
from jobs.decoding import decode_batch
from jobs.pipeline import PipelineConfig, ScoreBatch, score_files
from tests.conftest import tiny_checkpoint
from tests.images import jpeg
from tests.services import ROOT


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_gpu_plan_reserves_gpus_per_actor_without_a_gpu(local_ray, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    config = PipelineConfig(gpus_per_actor=0.5, min_actors=2, max_actors=8, batch_size=64)
    ds = score_files([str(tmp_path / "a.jpg")], tiny_checkpoint(), config)
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
    ds = score_files([str(tmp_path / "a.jpg")], tiny_checkpoint(), PipelineConfig())
    assert ds._logical_plan.dag.fn_constructor_kwargs["device"] is None
    assert ds._logical_plan.dag.ray_remote_args.get("num_gpus", 0) == 0


def test_decode_then_score_a_batch_by_hand():
    batch = {
        "path": np.asarray(["a.jpg", "b.jpg", "c.jpg"], dtype=object),
        "bytes": np.asarray([jpeg(seed=1), b"junk", jpeg(seed=2)], dtype=object),
    }
    decoded = decode_batch(batch, 48, 1, 10_000)
    assert decoded["pixels"].shape == (3, 48, 48, 1)
    assert list(decoded["status"]) == ["ok", "error", "ok"]
    assert np.array_equal(decoded["pixels"][0], decode_image(jpeg(seed=1), 48, 1).pixels)
    scored = ScoreBatch(tiny_checkpoint(), "cpu", "fp32", None)(decoded)
    assert list(scored["error"]) == [None, "not an image", None]
    assert np.isnan(scored["confidence"][1]) and scored["predicted_class"][1] == -1
    probs = np.stack([scored[k] for k in scored if k.startswith("prob_")], axis=1)
    assert np.allclose(probs[[0, 2]].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probs[[0, 2]].max(axis=1), scored["confidence"][[0, 2]])


def test_decoding_workers_do_not_import_torch():
    """Ray Data imports jobs.decoding in every decode worker; torch there costs seconds each."""
    probe = "import sys, jobs.decoding; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
