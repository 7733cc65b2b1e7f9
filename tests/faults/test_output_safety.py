"""The scoring job never deletes, rescans or mixes what it did not write.

The probe that found these: `--output` equal to the input plus `--overwrite` deleted the user's
images; a rerun with another model or input appended to, or broke, an unfinished output.
Refusals run the command's `main` in this process (they end before Ray starts, and a Python
start for each would cost more than the check); runs that score go through `python -m`.
"""

import hashlib
import json
from pathlib import Path

import pytest
import s3fs

from emotion.checkpoint import save_checkpoint
from jobs import score as score_job
from tests.conftest import tiny_checkpoint
from tests.images import jpeg
from tests.services import run_job


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    for i in range(6):
        (folder / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"set{i % 2}" / f"face{i}.jpg").write_bytes(jpeg(seed=i))
    return folder


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    paths = {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"}
    save_checkpoint(tiny_checkpoint(seed=0, name="a"), paths["a"])
    save_checkpoint(tiny_checkpoint(seed=1, name="b"), paths["b"])
    return paths


@pytest.mark.parametrize("where", ["input itself", "parent of the input", "inside the input", "input via symlink"])
def test_output_overlapping_the_input_is_refused_and_nothing_is_touched(tmp_path, photos, models, refuse, where):
    (tmp_path / "link").symlink_to(photos)
    output = {"input itself": photos, "parent of the input": tmp_path, "inside the input": photos / "set0" / "out",
              "input via symlink": tmp_path / "link"}[where]
    before = snapshot(tmp_path)
    stderr = refuse(score_job.main, "--input", str(photos), "--output", str(output), "--model", str(models["a"]),
                    "--overwrite")
    relation = {"input itself": "is the input", "parent of the input": "contains --input",
                "inside the input": "lies inside --input", "input via symlink": "is the input"}[where]
    assert stderr.startswith(f"error: --output {output} {relation}")
    assert snapshot(tmp_path) == before


def test_overwrite_of_a_folder_with_foreign_files_is_refused(tmp_path, photos, models, refuse):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    (target / "old.parquet").write_bytes(b"a user's own table")
    before = snapshot(target)
    for extra in ([], ["--overwrite"]):
        stderr = refuse(score_job.main, "--input", str(photos), "--output", str(target), "--model", str(models["a"]),
                        *extra)
        assert f"error: --output {target} holds files this job did not write" in stderr
        assert "notes.txt" in stderr and "old.parquet" in stderr
    assert snapshot(target) == before


@pytest.mark.slow
def test_overwrite_removes_only_the_previous_runs_files_and_resume_must_match(tmp_path, photos, models, refuse,
                                                                           job_env):
    out = tmp_path / "out"
    first = run_job("score", "--input", str(photos), "--output", str(out), "--model", str(models["a"]),
                    "--rows-per-file", "2", "--batch-size", "2", env=job_env)
    assert first.returncode == 0, first.stderr[-3000:]
    written = snapshot(out)
    assert "_run.json" in written and "_manifest.json" in written
    assert sum(name.endswith(".parquet") for name in written) >= 2

    # An unfinished run (no manifest) resumes only as the same run.
    (out / "_manifest.json").unlink()
    other_model = refuse(score_job.main, "--input", str(photos), "--output", str(out), "--model", str(models["b"]))
    assert f"error: --output {out} holds a partial run made with other settings: model {models['a']}" in other_model
    other_input = refuse(score_job.main, "--input", str(photos / "set0"), "--output", str(out),
                         "--model", str(models["a"]))
    assert f"input {photos} (now {photos / 'set0'})" in other_input
    assert snapshot(out) == {k: v for k, v in written.items() if k != "_manifest.json"}

    resumed = run_job("score", "--input", str(photos), "--output", str(out), "--model", str(models["a"]), env=job_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "_manifest.json").read_text())["resumed_rows"] == 6

    # A file the job did not write makes the folder no longer the job's alone.
    (out / "README.txt").write_text("added by hand")
    refused = refuse(score_job.main, "--input", str(photos), "--output", str(out), "--model", str(models["b"]),
                     "--overwrite")
    assert "holds files this job did not write" in refused
    (out / "README.txt").unlink()

    replaced = run_job("score", "--input", str(photos), "--output", str(out), "--model", str(models["b"]),
                       "--overwrite", env=job_env)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    old_parquet = {name for name in written if name.endswith(".parquet")}
    assert not old_parquet & set(snapshot(out)), "the previous run's Parquet files are gone"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"]["name"] == "b" and manifest["rows"]["total"] == 6 and manifest["resumed_rows"] == 0
    assert len(snapshot(photos)) == 6


def test_s3_output_overlapping_the_input_is_refused(s3, models, refuse, monkeypatch, request):
    # The refusals list S3 in this process: drop the filesystems (and listings) they cache.
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    client = s3.client()
    client.create_bucket(Bucket="overlap")
    for i in range(3):
        client.put_object(Bucket="overlap", Key=f"in/face{i}.jpg", Body=jpeg(seed=i))
    client.put_object(Bucket="overlap", Key="elsewhere/notes.txt", Body=b"keep me")
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    cases = {"s3://overlap/in/": "is the input", "s3://overlap/in/preds": "lies inside --input",
             "s3://overlap": "contains --input"}
    for output, relation in cases.items():
        stderr = refuse(score_job.main, "--input", "s3://overlap/in/", "--output", output, "--model", str(models["a"]),
                        "--overwrite")
        assert stderr.startswith(f"error: --output {output.rstrip('/')} {relation}"), stderr
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="overlap")["Contents"])
    assert keys == ["elsewhere/notes.txt", "in/face0.jpg", "in/face1.jpg", "in/face2.jpg"]
