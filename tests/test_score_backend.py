"""The ONNX Runtime backend through the scoring job end to end: the same folder scored by a real
local Ray with `--backend onnxruntime` and with `--backend torch --precision fp32`, over several
blocks and inference batches, gives the same labels and probabilities, and each manifest records
the backend that produced its rows."""

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


def test_onnxruntime_scores_a_folder_as_torch_fp32_does(tmp_path):
    pytest.importorskip("onnxruntime")
    faces = tmp_path / "faces"
    crops = sorted(FACES.glob("*/*.jpg"))
    for path in crops:
        (faces / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, faces / path.parent.name / path.name)
    runs = {}
    for backend, extra in (("onnxruntime", ()), ("torch", ("--precision", "fp32"))):
        out = tmp_path / backend
        result = score("--input", str(faces), "--output", str(out), "--backend", backend, *extra, *SMALL)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["model"]["backend"] == backend
        assert manifest["pipeline"]["backend"] == backend
        assert manifest["files"]["total"] == len(crops)
        assert len(list(out.glob("*.parquet"))) > 1, "several Parquet files, from several batches"
        runs[backend] = pd.read_parquet(out).set_index("path").sort_index()
    onnx, torch_ = runs["onnxruntime"], runs["torch"]
    assert len(onnx) == len(crops) and (onnx["status"] == "ok").all()
    assert list(onnx.index) == list(torch_.index)
    assert (onnx["predicted_label"] == torch_["predicted_label"]).all()
    assert (onnx[PROB_COLUMNS] - torch_[PROB_COLUMNS]).abs().to_numpy().max() < 1e-4
    assert (onnx["confidence"] - torch_["confidence"]).abs().max() < 1e-4
