"""The scoring job end to end, driven as users drive it: `ray job submit` to a local head."""

import json

import pandas as pd
import pytest
import s3fs

from emotion.checkpoint import save_checkpoint
from emotion.labels import LABELS
from tests.conftest import file_sha256, tiny_checkpoint
from tests.images import bad_input_corpus, jpeg

pytestmark = pytest.mark.slow
PROB_COLUMNS = [f"prob_{label}" for label in LABELS]
SCHEMA = ["path", "status", "error", "predicted_label", "predicted_class", "confidence",
          *PROB_COLUMNS, "width", "height", "model",
          "face_index", "box_x", "box_y", "box_w", "box_h", "face_score", "faces_in_image"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(tiny_checkpoint(name="tiny"), path)
    return path


def check_accounted(df: pd.DataFrame, expected: dict[str, str | None], root: str) -> None:
    """Each expected file exactly once (each is one face: a tight crop, or any image under
    `--faces whole`), errors where expected, probabilities where not."""
    assert list(df.columns) == SCHEMA
    assert df["path"].is_unique
    assert (df["face_index"] == 0).all() and df["box_x"].isna().all()
    assert sorted(df["path"]) == sorted(f"{root}/{rel}" for rel in expected)
    for _, row in df.iterrows():
        error = expected[row["path"][len(root) + 1:]]
        if error is None:
            assert row["status"] == "ok", row["path"]
            assert pd.isna(row["error"])
            probs = row[PROB_COLUMNS].to_numpy(dtype=float)
            assert abs(probs.sum() - 1) < 1e-4
            assert row["predicted_label"] == LABELS[probs.argmax()]
            assert row["predicted_class"] == probs.argmax()
            assert row["confidence"] == pytest.approx(probs.max())
            assert row["faces_in_image"] == 1
        else:
            assert (row["status"], row["error"]) == ("error", error), row["path"]
            assert pd.isna(row["confidence"]) and row["predicted_class"] == -1


def test_bad_input_corpus_through_job_submit(ray_cluster, tmp_path, model_path):
    expected = bad_input_corpus(tmp_path / "in")
    out = tmp_path / "out"
    # Whole: every kind of image decoded as the face it is taken to be, as before face detection.
    result = ray_cluster.submit("python", "-m", "jobs.score", "--input", str(tmp_path / "in"),
                                "--output", str(out), "--model", str(model_path), "--faces", "whole")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "wrote 16 rows for 16 files (11 faces, 0 files without a face, 5 error)" in result.stdout
    df = pd.read_parquet(out)
    check_accounted(df, expected, str(tmp_path / "in"))
    assert df.set_index("path").loc[str(tmp_path / "in/modes/photo 4000x3000.jpg"), "width"] == 4000
    assert df.set_index("path").loc[str(tmp_path / "in/modes/rotated.jpg"), ["width", "height"]].tolist() == [30, 60]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"total": 16, "ok": 11, "error": 5}
    assert manifest["files"] == {"total": 16, "with_faces": 11, "no_face": 0, "error": 5}
    assert manifest["faces"]["mode"] == "whole"
    assert manifest["model"]["name"] == "tiny"
    assert manifest["model"]["sha256"] == file_sha256(model_path)
    record = json.loads((out / "_run.json").read_text())
    assert record["precision"] in ("bf16", "fp32", "int8"), "auto is settled once, for every actor"
    assert not (out / "_checkpoint").exists()


def test_s3_input_and_output(ray_cluster, s3, tmp_path, model_path):
    client = s3.client()
    client.create_bucket(Bucket="faces")
    for i in range(12):
        client.put_object(Bucket="faces", Key=f"in/batch {i % 3}/face{i}.JPG", Body=jpeg(seed=i))
    client.put_object(Bucket="faces", Key="in/broken.jpg", Body=b"<html>")
    client.create_bucket(Bucket="models")
    client.upload_file(str(model_path), "models", "tiny.pt")
    result = ray_cluster.submit("python", "-m", "jobs.score", "--input", "s3://faces/in/",
                                "--output", "s3://faces/preds", "--model", "s3://models/tiny.pt",
                                env_vars=s3.env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, key="testing", secret="testing")
    manifest = json.loads(fs.cat("faces/preds/_manifest.json"))
    assert manifest["faces"]["mode"] == "auto", "the default; 48x48 crops are taken whole"
    assert manifest["rows"] == {"total": 13, "ok": 12, "error": 1}
    assert manifest["model"]["uri"] == "s3://models/tiny.pt"
    files = [f for f in fs.find("faces/preds") if f.endswith(".parquet")]
    df = pd.concat(pd.read_parquet(fs.open(f)) for f in files)
    expected = {f"batch {i % 3}/face{i}.JPG": None for i in range(12)} | {"broken.jpg": "not an image"}
    check_accounted(df, expected, "faces/in")
