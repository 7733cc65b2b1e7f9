"""The ONNX Runtime backend and int8 through the scoring job end to end: the same folder scored on
the session's Ray head with `--backend onnxruntime`, with `--precision int8` (the embedded model's
int8 graph) and with `--backend torch --precision fp32`, over several blocks and inference batches: the
float32 backends give the same labels and probabilities, int8 nearly the same labels, and each
manifest records the backend and precision that produced its rows."""

import json
import shutil

import pandas as pd
import pytest

from emotion.labels import LABELS
from tests.test_faces import FACES
from tests.test_score_faces import score

pytestmark = pytest.mark.slow
PROB_COLUMNS = [f"prob_{label}" for label in LABELS]
SMALL = ("--batch-size", "4", "--files-per-block", "5", "--rows-per-file", "4", "--actors", "1")
RUNS = {
    "onnxruntime": ("--backend", "onnxruntime", "--precision", "fp32"),
    "torch": ("--precision", "fp32"),
    "int8": ("--precision", "int8"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, job_env):
    """Each run's predictions by path, after checking what its manifest and run record say."""
    tmp_path = tmp_path_factory.mktemp("backends")
    faces = tmp_path / "faces"
    crops = sorted(FACES.glob("*/*.jpg"))
    for path in crops:
        (faces / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, faces / path.parent.name / path.name)
    predictions = {}
    for name, flags in RUNS.items():
        out = tmp_path / name
        result = score("--input", str(faces), "--output", str(out), *flags, *SMALL, env=job_env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        manifest = json.loads((out / "_manifest.json").read_text())
        backend = "onnxruntime" if name == "onnxruntime" else "torch"
        assert manifest["model"]["backend"] == manifest["pipeline"]["backend"] == backend
        assert manifest["pipeline"]["precision"] == json.loads((out / "_run.json").read_text())["precision"]
        assert manifest["pipeline"]["precision"] == ("int8" if name == "int8" else "fp32")
        assert manifest["files"]["total"] == len(crops)
        assert len(list(out.glob("*.parquet"))) > 1, "several Parquet files, from several batches"
        predictions[name] = pd.read_parquet(out).set_index("path").sort_index()
        assert len(predictions[name]) == len(crops) and (predictions[name]["status"] == "ok").all()
    return predictions


def test_onnxruntime_scores_a_folder_as_torch_fp32_does(runs):
    onnx, torch_ = runs["onnxruntime"], runs["torch"]
    assert list(onnx.index) == list(torch_.index)
    assert (onnx["predicted_label"] == torch_["predicted_label"]).all()
    assert (onnx[PROB_COLUMNS] - torch_[PROB_COLUMNS]).abs().to_numpy().max() < 1e-4
    assert (onnx["confidence"] - torch_["confidence"]).abs().max() < 1e-4


def test_int8_scores_a_folder_with_nearly_float32s_answers(runs):
    int8, torch_ = runs["int8"], runs["torch"]
    assert list(int8.index) == list(torch_.index)
    assert (int8["predicted_label"] == torch_["predicted_label"]).mean() >= 0.9
    difference = (int8[PROB_COLUMNS] - torch_[PROB_COLUMNS]).abs().to_numpy().max()
    assert 0 < difference < 0.25, "int8 arithmetic, close to float32's"
