"""A scoring job outlives the loss of a worker node, with the default flags.

Two nodes of one CPU each on this machine (a head and a `ray start --address` worker); the worker
is killed, every process at once, while the job runs. Its actors are restarted on the head and
its lost blocks recomputed; the pool was fitted at start so that it still fits there.
"""

import json

import pandas as pd
import pytest

from emotion.checkpoint import save_checkpoint
from tests.conftest import tiny_checkpoint
from tests.images import jpeg
from tests.services import ray_head, ray_worker, wait_for_rows

pytestmark = pytest.mark.slow


def test_job_finishes_exactly_once_after_a_worker_node_is_killed(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6000):
        (folder / f"f{i:05d}.jpg").write_bytes(jpeg(seed=i % 40))
    model = tmp_path / "tiny.pt"
    save_checkpoint(tiny_checkpoint(name="tiny"), model)
    out = tmp_path / "out"
    # The head declares a silent node dead after 3 missed checks a second apart (Ray's default:
    # 5 every 3 s), so the test waits on recovery rather than on noticing the loss.
    with ray_head(num_cpus=1, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3") as head, \
            ray_worker(head, num_cpus=1) as worker:
        args = ["python", "-m", "jobs.score", "--input", str(folder), "--output", str(out), "--model", str(model),
                "--batch-size", "100", "--files-per-block", "200", "--rows-per-file", "200"]
        job_id = head.start_job(*args)
        written = wait_for_rows(out, timeout=600)
        worker.kill()
        assert 0 < written < 6000, "the node was killed mid-job"
        result = head.wait_for_job(job_id, timeout=900)
        assert result == "SUCCEEDED", head.job_command("logs", job_id)[-5000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"total": 6000, "ok": 6000, "error": 0}
    assert manifest["pipeline"]["min_actors"] == 2, "one actor per CPU of the cluster at start"
    df = pd.read_parquet(out)
    assert len(df) == 6000 and df["path"].is_unique

