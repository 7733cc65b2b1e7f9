"""Faces in the batch job and the evaluation, on real files through a real Ray: composed photos
with faces at known places, a photo with no face, a corrupt file and 48x48 crops, spread over
several blocks and Parquet files; resume after a partial output; photos in a labelled set."""

import base64
import dataclasses
import io
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from emotion.checkpoint import Checkpoint, save_checkpoint
from emotion.faces import FaceFinder, load_face_config
from emotion.labels import LABELS
from jobs import evaluate
from jobs import score as score_job
from jobs.pipeline import output_schema
from jobs.score import _output_rows, _reconcile
from tests.conftest import SHARED_DATA, tiny_checkpoint
from tests.images import encode
from tests.services import run_job
from tests.test_faces import CONF, FACES, PLACED, SIDE, three_faces

# Two more bundled faces for a second photo, and where they are pasted on a 800x500 colour canvas.
PLACED_TWO = {"surprise/PublicTest_10709121.jpg": (80, 120), "sad/PublicTest_10404299.jpg": (480, 150)}
TWO_SIDE = 180
CROPS = sorted(FACES.glob("*/*.jpg"))[::4]
PROB_COLUMNS = [f"prob_{label}" for label in LABELS]


def two_faces() -> bytes:
    canvas = Image.new("RGB", (800, 500), (90, 120, 150))
    for name, (x, y) in PLACED_TWO.items():
        face = Image.open(FACES / name).convert("RGB").resize((TWO_SIDE, TWO_SIDE), Image.Resampling.BICUBIC)
        canvas.paste(face, (x, y))
    return encode(canvas, "PNG")


def photo_folder(root: Path) -> dict[str, int]:
    """The mixed input; relative path -> the faces it holds (-1: not an image)."""
    files = {
        "photos/three.jpg": (encode(Image.fromarray(three_faces()), "JPEG", quality=95), 3),
        "photos/two.png": (two_faces(), 2),
        "photos/grey.jpg": (encode(Image.new("L", (640, 480), 128), "JPEG"), 0),
        "bad/corrupt.jpg": (b"\xff\xd8\xff\xe0 not really a JPEG", -1),
    }
    files |= {f"crops/{p.parent.name}-{p.name}": (p.read_bytes(), 1) for p in CROPS}
    for relative, (data, _) in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return {relative: faces for relative, (_, faces) in files.items()}


def score(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_job("score", *args, env=env)


# Small batches and blocks, so a few files span several blocks and Parquet files, and a photo's
# faces can straddle two inference batches.
# Precision "auto" times both precisions at load and, on a loaded host, two runs can choose apart;
# runs here are compared probability for probability, so every one runs float32.
SMALL = ("--batch-size", "2", "--files-per-block", "3", "--rows-per-file", "2", "--actors", "1",
         "--precision", "fp32")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(tiny_checkpoint(name="tiny"), path)
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_path, job_env) -> SimpleNamespace:
    """The folder scored once in auto mode (the default) and once in whole mode."""
    root = tmp_path_factory.mktemp("faces")
    expected = photo_folder(root / "in")
    runs = {}
    for mode in ("auto", "whole"):
        out = root / f"out-{mode}"
        result = score("--input", str(root / "in"), "--output", str(out), "--model", str(model_path),
                       "--faces", mode, *SMALL, env=job_env)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[mode] = SimpleNamespace(out=out, stdout=result.stdout, df=pd.read_parquet(out),
                                     manifest=json.loads((out / "_manifest.json").read_text()))
    return SimpleNamespace(root=root, input=root / "in", expected=expected, **runs)


def by_file(df: pd.DataFrame, root: Path) -> dict[str, pd.DataFrame]:
    return {str(Path(path).relative_to(root)): rows.sort_values("face_index")
            for path, rows in df.groupby("path")}


def near(box: pd.Series, corner: tuple[int, int], side: int) -> bool:
    centre = (box["box_x"] + box["box_w"] / 2, box["box_y"] + box["box_h"] / 2)
    return (abs(centre[0] - (corner[0] + side / 2)) < side / 4 and abs(centre[1] - (corner[1] + side / 2)) < side / 4
            and 0.6 * side < box["box_w"] < 1.4 * side)


def check_rows(df: pd.DataFrame, root: Path, expected: dict[str, int]) -> None:
    """Each file's rows exactly once: face indices 0..n-1 for n faces, else one row."""
    files = by_file(df, root)
    assert sorted(files) == sorted(expected)
    for relative, rows in files.items():
        faces = expected[relative]
        assert rows["face_index"].tolist() == list(range(max(faces, 1))), relative
        assert (rows["faces_in_image"] == max(faces, 0)).all(), relative


@pytest.mark.slow
def test_auto_mode_rows_per_face_boxes_no_face_and_errors(scored):
    run = scored.auto
    check_rows(run.df, scored.input, scored.expected)
    files = by_file(run.df, scored.input)
    three, two = files["photos/three.jpg"], files["photos/two.png"]
    assert (three["status"] == "ok").all() and (two["status"] == "ok").all()
    for rows, placed, side in ((three, PLACED, SIDE), (two, PLACED_TWO, TWO_SIDE)):
        for corner in placed.values():
            assert sum(near(box, corner, side) for _, box in rows.iterrows()) == 1, (corner, rows)
        areas = (rows["box_w"] * rows["box_h"]).tolist()
        assert areas == sorted(areas, reverse=True), "largest face first"
        assert rows["face_score"].notna().all()
        assert (rows[["width", "height"]].iloc[0].tolist()) in ([640, 480], [800, 500])
    grey = files["photos/grey.jpg"].iloc[0]
    assert (grey["status"], grey["faces_in_image"], grey["predicted_class"]) == ("no_face", 0, -1)
    assert pd.isna(grey["error"]) and pd.isna(grey["predicted_label"]) and pd.isna(grey["confidence"])
    assert pd.isna(grey["box_x"]) and (grey["width"], grey["height"]) == (640, 480)
    corrupt = files["bad/corrupt.jpg"].iloc[0]
    assert corrupt["status"] == "error" and corrupt["faces_in_image"] == 0 and pd.isna(corrupt["box_w"])
    # auto takes the 48x48 crops whole: one row, no box.
    for relative, rows in files.items():
        if relative.startswith("crops/"):
            assert rows["status"].tolist() == ["ok"] and rows["box_x"].isna().all(), relative
    ok = run.df[run.df["status"] == "ok"]
    assert np.allclose(ok[PROB_COLUMNS].sum(axis=1), 1, atol=1e-4)
    crops = len(CROPS)
    assert run.manifest["files"] == {"total": crops + 4, "with_faces": crops + 2, "no_face": 1, "error": 1}
    assert run.manifest["rows"] == {"total": crops + 7, "ok": crops + 5, "error": 1}
    assert run.manifest["faces"]["mode"] == "auto" and run.manifest["faces"]["total"] == crops + 5
    assert (f"wrote {crops + 7} rows for {crops + 4} files ({crops + 5} faces, 1 files without a face, 1 error)"
            in run.stdout)
    parquet = sorted(run.out.glob("*.parquet"))
    assert len(parquet) >= 3, "several Parquet files"
    # The summary a person reads: counted again here from the rows themselves.
    labels = ok["predicted_label"].value_counts()
    assert run.manifest["labels"] == {label: int(labels.get(label, 0)) for label in LABELS}
    assert run.manifest["faces_per_image"] == {"0": 1, "1": crops, "2": 1, "3": 1}
    predicted = ", ".join(f"{label} {n}" for label, n in sorted(labels.items(), key=lambda x: (-x[1], x[0])))
    for line in (f"  files:            {crops + 4}: {crops + 2} with faces, 1 without a face, 1 error",
                 f"  faces classified: {crops + 5} (auto mode)",
                 f"  predicted:        {predicted}",
                 f"  files by faces:   0 faces: 1, 1 face: {crops}, 2 faces: 1, 3 faces: 1",
                 f"  Parquet:          {run.out}/ ({len(parquet)} files)",
                 f"  manifest:         {run.out}/_manifest.json"):
        assert line in run.stdout.splitlines(), (line, run.stdout)
    for file in parquet:
        assert pq.read_schema(file).remove_metadata() == output_schema(LABELS).remove_metadata(), file


@pytest.mark.slow
def test_whole_mode_is_one_row_per_file_as_before(scored):
    run = scored.whole
    whole = dict.fromkeys(scored.expected, 1) | {"bad/corrupt.jpg": -1}
    check_rows(run.df, scored.input, whole)
    assert run.df["path"].is_unique and run.df["box_x"].isna().all() and run.df["face_score"].isna().all()
    assert set(run.df["status"]) == {"ok", "error"}
    assert run.manifest["files"]["no_face"] == 0 and run.manifest["rows"] == {
        "total": len(whole), "ok": len(whole) - 1, "error": 1}
    # The crops are taken whole in both modes: the same pixels, the same probabilities.
    crops = [str(scored.input / "crops" / f"{p.parent.name}-{p.name}") for p in CROPS]
    auto = scored.auto.df.set_index("path").loc[crops, PROB_COLUMNS]
    assert np.array_equal(auto.to_numpy(), run.df.set_index("path").loc[crops, PROB_COLUMNS].to_numpy())


@pytest.mark.slow
def test_resume_after_a_partial_output_gives_each_file_once(scored, model_path, job_env):
    """Files lost, cut short and written twice: the rerun redoes exactly what is missing."""
    out = scored.root / "out-resume"
    shutil.copytree(scored.auto.out, out)
    (out / "_manifest.json").unlink()
    parquet = sorted(out.glob("*.parquet"))
    holding = {file: set(pq.read_table(file, columns=["path"]).column("path").to_pylist()) for file in parquet}
    three = str(scored.input / "photos/three.jpg")
    # Lose a file holding some of the three-face photo's rows (all of them, or part if it straddles files).
    lost = next(file for file in parquet if three in holding[file])
    lost.unlink()
    # Cut another short, as a killed write leaves it, and duplicate a third, as a retried write can.
    rest = [file for file in parquet if file != lost]
    rest[0].write_bytes(rest[0].read_bytes()[:40])
    shutil.copy(rest[1], out / f"copy-{rest[1].name}")
    result = score("--input", str(scored.input), "--output", str(out), "--model", str(model_path), *SMALL,
                   env=job_env)
    assert result.returncode == 0, result.stderr[-4000:]
    df = pd.read_parquet(out)
    check_rows(df, scored.input, scored.expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert 0 < manifest["resumed_files"] < manifest["files"]["total"]
    assert manifest["files"] == scored.auto.manifest["files"]


def write_rows(path: Path, rows: list[tuple[str, int, int]]) -> None:
    """A Parquet file of (path, face_index, faces_in_image) rows, with the job's other columns empty."""
    table = pd.DataFrame(rows, columns=["path", "face_index", "faces_in_image"]).assign(status="ok",
                                                                                        predicted_label="happy")
    table.to_parquet(path, index=False)


def test_reconcile_keeps_complete_files_once_and_drops_half_written_ones(tmp_path):
    write_rows(tmp_path / "a.parquet", [("one", 0, 2), ("one", 1, 2), ("split", 0, 3), ("half", 0, 2)])
    write_rows(tmp_path / "b.parquet", [("split", 1, 3), ("split", 2, 3), ("twice", 0, 1), ("solo", 0, 0)])
    # A retried write's copy: "one" again (complete), "twice" again.
    write_rows(tmp_path / "c.parquet", [("one", 0, 2), ("one", 1, 2), ("twice", 0, 1), ("doubled", 0, 1),
                                        ("doubled", 0, 1)])
    job = SimpleNamespace(output=str(tmp_path))
    rows = _reconcile(job, _output_rows(job))
    kept = rows.groupby("path")["file"].agg(lambda files: sorted({Path(f).name for f in files})).to_dict()
    assert kept == {"one": ["a.parquet"], "split": ["a.parquet", "b.parquet"], "twice": ["b.parquet"],
                    "solo": ["b.parquet"]}, "half and doubled are removed, to be scored again"
    assert sorted(rows.loc[rows["path"] == "split", "face_index"]) == [0, 1, 2]
    assert not (tmp_path / "c.parquet").exists(), "a file left without rows is removed"
    assert _reconcile(job, _output_rows(job)).equals(rows), "a second pass changes nothing"


def test_a_cut_short_file_is_removed_and_a_foreign_one_refused_and_kept(tmp_path):
    write_rows(tmp_path / "a.parquet", [("one", 0, 1)])
    (tmp_path / "b.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:40])
    job = SimpleNamespace(output=str(tmp_path))
    assert list(_output_rows(job)["path"]) == ["one"]
    assert not (tmp_path / "b.parquet").exists(), "a killed write's remains are the job's own"
    pd.DataFrame({"path": ["theirs"], "score": [1.0]}).to_parquet(tmp_path / "c.parquet", index=False)
    with pytest.raises(RuntimeError, match=r"c.parquet is not this job's output \(no column face_index, "):
        _output_rows(job)
    assert (tmp_path / "c.parquet").exists()
    (tmp_path / "c.parquet").write_text("path,score\ntheirs,1.0\n")
    with pytest.raises(RuntimeError, match=r"c.parquet is not a Parquet file this job wrote"):
        _output_rows(job)
    assert (tmp_path / "c.parquet").exists(), "a file of another format is the user's"
    (tmp_path / "c.parquet").write_bytes(b"")
    assert list(_output_rows(job)["path"]) == ["one"] and not (tmp_path / "c.parquet").exists()


def test_bad_face_settings_are_one_line_before_any_work(tmp_path, refuse):
    """The jobs' `main` in this process: each refuses before Ray starts."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes((FACES / "happy/PublicTest_10130075.jpg").read_bytes())
    (tmp_path / "faces.yaml").write_text("detector: dlib_hog\nframing: {scale: 1.0, offset: 0.0}\n"
                                         "auto: {max_scale: 2.0, max_aspect: 1.5}\nparams: {wings: 2}\n")
    cases = {
        ("--face-config", str(tmp_path / "nope.yaml")): f"error: --face-config {tmp_path / 'nope.yaml'}: no such file",
        ("--face-config", str(tmp_path / "faces.yaml")): f"error: --face-config {tmp_path / 'faces.yaml'}: detector "
                                                         "dlib_hog: ",
    }
    for flags, message in cases.items():
        line = refuse(score_job.main, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *flags)
        assert line.startswith(message), line
        assert not (tmp_path / "out").exists()
    assert refuse(evaluate.main, "--input", f"s:sideways={tmp_path}", "--output", str(tmp_path / "out")) == (
        f"error: --input s:sideways={tmp_path}: faces mode sideways: expected one of whole, detect, auto")


# ---------------------------------------------------------------- evaluation


def always(label: str) -> Checkpoint:
    """A tiny model that answers `label` whatever it sees, so which answers are right is known."""
    checkpoint = tiny_checkpoint(name=f"always-{label}")
    state = dict(checkpoint.state_dict)
    bias = [key for key in state if key.startswith("head.")][-1]
    state[bias] = state[bias] + 100 * torch.eye(len(LABELS))[LABELS.index(label)]
    return dataclasses.replace(checkpoint, state_dict=state)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def thumbnail_pixels(html: str) -> list[np.ndarray]:
    images = [part.split('"', 1)[0] for part in html.split('src="data:image/jpeg;base64,')[1:]]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"), dtype=float) for data in images]


@pytest.mark.slow
def test_evaluation_counts_no_face_as_a_miss_and_shows_the_crop(local_ray, tmp_path):
    labelled = tmp_path / "set"
    for relative, data in {
        "happy/three.jpg": encode(Image.fromarray(three_faces()), "JPEG", quality=95),
        "happy/grey.jpg": encode(Image.new("L", (640, 480), 128), "JPEG"),
        "fear/crop.jpg": (FACES / "fear/PublicTest_10150476.jpg").read_bytes(),
    }.items():
        (labelled / relative).parent.mkdir(parents=True, exist_ok=True)
        (labelled / relative).write_bytes(data)
    save_checkpoint(always("happy"), tmp_path / "happy.pt")
    out = tmp_path / "eval"
    code = evaluate.main(["--input", f"photos={labelled}", "--input", f"flat:whole={labelled}",
                          "--output", str(out), "--model", str(tmp_path / "happy.pt"), "--batch-size", "2"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    photos, flat = report["sets"]["photos"], report["sets"]["flat"]
    assert (photos["faces"], photos["n_images"], photos["n_no_face"], photos["n_detected"]) == ("auto", 3, 1, 2)
    assert photos["faces_found"] == pytest.approx(2 / 3)
    # three.jpg answered happy (right), grey.jpg a miss, crop.jpg answered happy (wrong).
    assert photos["n_evaluated"] == 3 and photos["accuracy"] == pytest.approx(1 / 3)
    assert photos["per_class"]["happy"]["recall"] == pytest.approx(1 / 2)
    assert photos["confusion_matrix"]["no_face"][LABELS.index("happy")] == 1
    # Whole, the grey photo is an answer (happy, right): the same files, another count.
    assert (flat["faces"], flat["n_no_face"], flat["faces_found"]) == ("whole", 0, 1.0)
    assert flat["accuracy"] == pytest.approx(2 / 3)
    df = pd.read_parquet(out / "predictions" / "photos")
    assert len(df) == 3 and (df["face_index"] == 0).all()
    three = df.set_index("folder").loc["happy"].set_index("path").loc[str(labelled / "happy/three.jpg")]
    assert three["faces_in_image"] == 3 and three["box_w"] > 0
    # The gallery shows the crop classified: for the one mistake, the 48x48 face taken whole.
    [mistake] = photos["most_confident_mistakes"]
    assert mistake["path"] == str(labelled / "fear/crop.jpg") and mistake["box"] is None
    html = (out / "report.html").read_text()
    assert "faces found (auto)" in html and "66.7%" in html and "No face found in 1 images" in html
    finder = FaceFinder(load_face_config(CONF), 48, 1)
    shown = thumbnail_pixels(html)
    assert len(shown) == 1 + len(flat["most_confident_mistakes"])
    crop = finder.find((labelled / "fear/crop.jpg").read_bytes(), "auto").crops[0].pixels[:, :, 0]
    expected = np.asarray(Image.fromarray(crop).resize((96, 96), Image.Resampling.NEAREST), dtype=float)
    assert np.abs(shown[0] - expected).mean() < 4


TAIWANESE = SHARED_DATA / "taiwanese"


@pytest.mark.slow
def test_taiwanese_photos_in_auto_mode_beat_the_whole_image(local_ray, tmp_path):
    """About 60 head-and-shoulders photos, ten per class where a class has them, scored whole and
    in auto mode (which detects on 256x256 photos) by the embedded model in one run.

    The margin is what detection must add for a model trained with wide scale jitter, which
    already reads some whole photos: the default measures 53% auto against 44% whole on this
    sample (docs/model-card.md, "Other face sets", for the whole shared half)."""
    if not TAIWANESE.is_dir():
        pytest.skip(f"shared Taiwanese photos not found at {TAIWANESE}")
    sample = tmp_path / "taiwanese"
    for folder in sorted(p for p in TAIWANESE.iterdir() if p.is_dir()):
        (sample / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[::7][:10]:
            shutil.copy(image, sample / folder.name / image.name)
    out = tmp_path / "eval"
    assert evaluate.main(["--input", f"auto={sample}", "--input", f"whole:whole={sample}",
                          "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    auto, whole = report["sets"]["auto"], report["sets"]["whole"]
    print(f"taiwanese sample of {auto['n_images']}: auto {auto['accuracy']:.3f} / {auto['macro_f1']:.3f}, "
          f"whole {whole['accuracy']:.3f} / {whole['macro_f1']:.3f}, faces found {auto['faces_found']:.3f}")
    assert 50 <= auto["n_images"] <= 70
    assert auto["faces_found"] >= 0.95
    assert auto["accuracy"] >= 0.45 and auto["accuracy"] >= whole["accuracy"] + 0.05
