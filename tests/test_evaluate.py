"""The evaluation job: metrics recomputed from its own Parquet, label handling, the gate, the HTML.

Samples are small slices of the shared FER2013 validation set. The model is a tiny random CNN
whose head is fitted to other FER2013 images, so its predictions spread over the classes; the
"worse" model is the same one forced to answer a class the CK+-like set does not contain.
"""

import dataclasses
import io
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import s3fs
import torch
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from emotion.checkpoint import Checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.predictor import Predictor
from emotion.preprocess import normalize
from jobs import evaluate
from tests.conftest import file_sha256, require_fer2013, tiny_checkpoint
from tests.images import jpeg
from tests.services import command_refusal

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FER_COUNTS = {"angry": 8, "disgust": 3, "fear": 6, "happy": 12, "neutral": 10, "sad": 8, "surprise": 6}
# CK+-style folder names for four classes; neutral, fear and disgust are absent, contempt unknown.
CK_FOLDERS = {"anger": "angry", "happiness": "happy", "surprised": "surprise", "sadness": "sad"}
CK_PER_CLASS, CONTEMPT = 6, 4


def copy_images(source: Path, target: Path, count: int, skip: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(source.glob("*.jpg"))[skip: skip + count]:
        shutil.copy(image, target / image.name)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    validation = require_fer2013() / "validation"
    root = tmp_path_factory.mktemp("sets")
    for label, count in FER_COUNTS.items():
        copy_images(validation / label, root / "fer" / label, count)
    for folder, label in CK_FOLDERS.items():
        copy_images(validation / label, root / "ck" / folder, CK_PER_CLASS, skip=20)
    copy_images(validation / "fear", root / "ck" / "contempt", CONTEMPT, skip=20)
    (root / "ck" / "anger" / "broken.jpg").write_bytes(b"this is not a picture")
    (root / "ck" / "happiness" / "notes.txt").write_text("not an image: ignored")
    return {"fer": root / "fer", "ck": root / "ck"}


def probed_checkpoint(seed: int, per_class: int = 30) -> Checkpoint:
    """A tiny random CNN whose linear head is fitted (logistic regression) on images outside the samples."""
    validation = require_fer2013() / "validation"
    checkpoint = tiny_checkpoint(seed=seed, name=f"probe-{seed}")
    predictor = Predictor(checkpoint, device="cpu", precision="fp32")
    pixels, classes = [], []
    for i, label in enumerate(LABELS):
        for image in sorted((validation / label).glob("*.jpg"))[-per_class:]:
            pixels.append(predictor.decode(image.read_bytes()).pixels)
            classes.append(i)
    batch = torch.from_numpy(normalize(np.stack(pixels), checkpoint.mean, checkpoint.std))
    network = checkpoint.build().eval()
    with torch.inference_mode():
        features = network.head[:2](network.features(batch)).numpy()
    head = LogisticRegression(C=100, max_iter=5000).fit(features, classes)
    state = dict(checkpoint.state_dict)
    state["head.3.weight"] = torch.tensor(head.coef_, dtype=torch.float32)
    state["head.3.bias"] = torch.tensor(head.intercept_, dtype=torch.float32)
    return dataclasses.replace(checkpoint, state_dict=state)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    probe = probed_checkpoint(seed=0)
    state = dict(probe.state_dict)
    state["head.3.bias"] = state["head.3.bias"] + 100 * torch.eye(len(LABELS))[LABELS.index("neutral")]
    worse = dataclasses.replace(probe, state_dict=state, name="always-neutral")
    paths = {"probe": folder / "probe.pt", "worse": folder / "worse.pt"}
    save_checkpoint(probe, paths["probe"])
    save_checkpoint(worse, paths["worse"])
    return paths


def files_on_disk(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.jpg")}


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Expected calibration error written out with a loop over (lower, upper] bins."""
    total = 0.0
    for b in range(n_bins):
        lower, upper = b / n_bins, (b + 1) / n_bins
        members = (confidence > lower) & (confidence <= upper) if b else confidence <= upper
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return total / len(confidence)


def expected_truth(path: str) -> str | None:
    folder = Path(path).parent.name
    return CK_FOLDERS.get(folder, folder if folder in LABELS else None)


# ---------------------------------------------------------------- fail fast, before Ray starts


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "no such folder or prefix"),
        ("flat", "no class sub-folders"),
        ("empty", "the class sub-folders hold no images"),
        ("only_unknown", "naming a class the model knows (sub-folders with images: contempt)"),
        ("no_name", "expected NAME=PATH_OR_S3"),
    ],
)
def test_unusable_set_fails_at_once_with_one_line(tmp_path, tiny_checkpoint_path, refuse, layout, message):
    folder = tmp_path / "set"
    if layout == "flat":
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpeg())
    elif layout == "empty":
        (folder / "happy").mkdir(parents=True)
        (folder / "happy" / "notes.txt").write_text("no images")
    elif layout == "only_unknown":
        (folder / "contempt").mkdir(parents=True)
        (folder / "contempt" / "a.jpg").write_bytes(jpeg())
    spec = str(folder) if layout == "no_name" else f"ck={folder}"
    started = time.monotonic()
    line = refuse(evaluate.main, "--input", spec, "--output", str(tmp_path / "out"),
                  "--model", str(tiny_checkpoint_path))
    assert line.startswith(f"error: --input {'' if layout == 'no_name' else 'ck='}") and message in line
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 60


def test_onnxruntime_with_bf16_fails_before_any_work(tmp_path, tiny_checkpoint_path, refuse):
    stderr = refuse(evaluate.main, "--input", f"ck={tmp_path / 'set'}", "--output", str(tmp_path / "out"),
                    "--model", str(tiny_checkpoint_path), "--backend", "onnxruntime", "--precision", "bf16")
    assert stderr == ("error: --backend onnxruntime runs float32 or int8: --precision bf16 is not possible "
                      "(use auto, fp32 or int8)")
    assert not (tmp_path / "out").exists()


def test_duplicate_set_names_fail_before_any_listing(tmp_path, tiny_checkpoint_path):
    """As a command: nothing else its import or interpreter prints reaches the terminal."""
    assert command_refusal("evaluate", "--input", "a=/nonexistent/one", "--input", "a=/nonexistent/two",
                           "--output", str(tmp_path / "out"), "--model", str(tiny_checkpoint_path)) == (
        "error: --input: set names must be unique, got a, a")


def test_missing_baseline_fails_before_any_work(tmp_path, tiny_checkpoint_path, refuse):
    (tmp_path / "set" / "happy").mkdir(parents=True)
    (tmp_path / "set" / "happy" / "a.jpg").write_bytes(jpeg())
    stderr = refuse(evaluate.main, "--input", f"s={tmp_path / 'set'}", "--output", str(tmp_path / "out"),
                    "--model", str(tiny_checkpoint_path), "--baseline", str(tmp_path / "nope.json"))
    assert stderr == f"error: --baseline {tmp_path / 'nope.json'}: no such file"


# ---------------------------------------------------------------- in-process runs on a local Ray


@pytest.fixture(scope="class")
def local_ray():
    """Ray for the tests of one class only, so it is down before the job-submit test starts its head."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="class")
def first(local_ray, sets, models, tmp_path_factory) -> dict[str, Path]:
    """One evaluation of both sets with the probe model, which also starts the history.

    Every run in the class is float32: "auto" times both precisions and can choose differently from
    one run to the next on a loaded host, and the gate compares runs metric for metric.
    """
    root = tmp_path_factory.mktemp("eval")
    code = evaluate.main(["--input", f"fer={sets['fer']}", "--input", f"ck={sets['ck']}",
                          "--output", str(root / "run1"), "--model", str(models["probe"]),
                          "--history", str(root / "history"), "--batch-size", "16", "--precision", "fp32"])
    assert code == 0
    return {"out": root / "run1", "history": root / "history", "root": root}


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
class TestEvaluation:
    def test_counts_unknown_absent_and_unreadable(self, first, sets):
        report = read_report(first["out"])
        ck, fer = report["sets"]["ck"], report["sets"]["fer"]
        assert fer["n_images"] == sum(FER_COUNTS.values()) and fer["n_errors"] == 0
        assert fer["absent_classes"] == [] and fer["unknown_classes"] == {}
        assert ck["n_images"] == 4 * CK_PER_CLASS + CONTEMPT + 1
        assert ck["n_errors"] == 1
        assert ck["errors"] == [{"path": str(sets["ck"] / "anger" / "broken.jpg"), "error": "not an image"}]
        assert ck["n_excluded_unknown"] == CONTEMPT
        assert list(ck["unknown_classes"]) == ["contempt"]
        assert ck["unknown_classes"]["contempt"]["n_images"] == CONTEMPT
        assert sum(ck["unknown_classes"]["contempt"]["predicted"].values()) == CONTEMPT
        assert ck["absent_classes"] == ["disgust", "fear", "neutral"]
        assert ck["n_evaluated"] == 4 * CK_PER_CLASS
        assert ck["confusion_matrix"]["normalized"][LABELS.index("neutral")] is None
        assert ck["per_class"]["neutral"]["support"] == 0 and ck["per_class"]["neutral"]["recall"] is None
        assert ck["labels"] == list(LABELS)
        assert report["model"]["sha256"] == file_sha256(report["model"]["uri"])
        for result in (ck, fer):
            eff = result["efficiency"]
            assert eff["images"] == result["n_images"] and eff["seconds"] > 0
            assert eff["images_per_s"] == pytest.approx(result["n_images"] / eff["seconds"], rel=0.01)
            assert 0 < eff["mean_inference_ms"] < eff["seconds"] * 1000 / result["n_evaluated"]
            assert eff["peak_rss_mb"] > 50
            assert eff["model_bytes"] == Path(report["model"]["uri"]).stat().st_size

    def test_every_metric_matches_sklearn_on_the_parquet(self, first, sets):
        report = read_report(first["out"])
        for name in ("fer", "ck"):
            result = report["sets"][name]
            df = pd.read_parquet(first["out"] / "predictions" / name)
            assert set(df["path"]) == files_on_disk(sets[name])
            truth = df["path"].map(expected_truth)
            scored = df[(df["status"] == "ok") & truth.notna()]
            y_true = np.array([LABELS.index(t) for t in truth[scored.index]])
            probs = scored[[f"prob_{label}" for label in LABELS]].to_numpy(float)
            y_pred = probs.argmax(axis=1)
            present = sorted(set(y_true))
            ids = list(range(len(LABELS)))
            assert len(set(y_pred)) > 2, "the probe model should spread its answers"
            assert result["n_evaluated"] == len(scored)
            assert result["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
            assert result["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=ids, average="micro"))
            assert result["macro_f1"] == pytest.approx(
                f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
            assert result["weighted_f1"] == pytest.approx(
                f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0))
            p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=np.nan)
            for i, label in enumerate(LABELS):
                got = result["per_class"][label]
                assert got["support"] == s[i]
                for key, value in (("precision", p[i]), ("recall", r[i]), ("f1", f[i])):
                    assert got[key] == (None if np.isnan(value) else pytest.approx(value)), (name, label, key)
            counts = confusion_matrix(y_true, y_pred, labels=ids)
            assert result["confusion_matrix"]["counts"] == counts.tolist()
            for row, got in zip(counts, result["confusion_matrix"]["normalized"], strict=True):
                assert got == (pytest.approx(row / row.sum()) if row.sum() else None)
            top2 = np.argsort(-probs, axis=1)[:, :2]
            assert result["top2_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(y_true, top2,
                                                                                                strict=True)]))
            assert result["ece"] == pytest.approx(ece(probs.max(axis=1), y_true == y_pred, 15))
            mistakes = result["most_confident_mistakes"]
            wrong_conf = np.sort(probs.max(axis=1)[y_true != y_pred])[::-1]
            assert [m["confidence"] for m in mistakes] == pytest.approx(wrong_conf[: len(mistakes)].tolist())

    def test_gate_passes_on_the_same_model_and_trips_on_a_worse_one(self, first, models, sets, capsys):
        root, history = first["root"], first["history"]
        baseline = first["out"] / "report.json"
        args = ["--input", f"fer={sets['fer']}", "--input", f"ck={sets['ck']}", "--history", str(history),
                "--baseline", str(baseline), "--tolerance", "0.01", "--batch-size", "16", "--precision", "fp32"]
        assert evaluate.main([*args, "--output", str(root / "run2"), "--model", str(models["probe"]),
                              "--no-explain"]) == 0
        same = read_report(root / "run2")
        html = (root / "run2" / "report.html").read_text()
        shown = sum(len(r["most_confident_mistakes"]) for r in same["sets"].values())
        assert shown > 0 and html.count('src="data:image/jpeg;base64,') == shown
        assert html.count('src="data:image/png;base64,') == 2 * len(same["sets"]) and "Grad-CAM" not in html
        assert same["gate"] == {"tolerance": 0.01, "passed": True, "failures": []}
        assert same["comparison"]["previous"]["ck"]["accuracy"]["drop"] == pytest.approx(0, abs=1e-9)
        lines_before = (history / "history.jsonl").read_text()
        capsys.readouterr()

        assert evaluate.main([*args, "--output", str(root / "run3"), "--model", str(models["worse"])]) == 1
        stderr = capsys.readouterr().err
        good, bad = read_report(first["out"]), read_report(root / "run3")
        expected = set()
        for against, before in (("previous", same), ("baseline", good)):
            for name in ("fer", "ck"):
                for metric in ("accuracy", "macro_f1"):
                    drop = before["sets"][name][metric] - bad["sets"][name][metric]
                    if drop > 0.01:
                        expected.add((against, name, metric, round(drop, 6)))
        assert bad["sets"]["ck"]["accuracy"] == 0, "the worse model only answers a class absent from ck"
        assert ("baseline", "ck", "accuracy", round(good["sets"]["ck"]["accuracy"], 6)) in expected
        failures = bad["gate"]["failures"]
        assert {(f["against"], f["set"], f["metric"], round(f["drop"], 6)) for f in failures} == expected
        for f in failures:
            assert f"REGRESSION: set {f['set']}: {f['metric']} dropped by {f['drop']:.4f}" in stderr
        lines = (history / "history.jsonl").read_text()
        assert lines.startswith(lines_before) and len(lines.splitlines()) == 3
        last = json.loads(lines.splitlines()[-1])
        assert last["gate"] == {"passed": False, "failures": len(failures)}
        assert last["model"]["name"] == "always-neutral"

    def test_html_is_self_contained_and_renders(self, first, tmp_path):
        html = (first["out"] / "report.html").read_text()
        report = read_report(first["out"])
        assert "http://" not in html and "https://" not in html
        shown = sum(len(r["most_confident_mistakes"]) for r in report["sets"].values())
        assert shown > 0 and html.count('src="data:image/jpeg;base64,') == shown
        # Two plots per set, and (--explain by default) a Grad-CAM overlay beside each crop, of the
        # class the model said, in the gallery's order.
        assert html.count('src="data:image/png;base64,') == 2 * len(report["sets"]) + shown
        said = [m["predicted_label"] for r in report["sets"].values() for m in r["most_confident_mistakes"]]
        assert [part.split('"', 1)[0] for part in html.split('alt="Grad-CAM of ')[1:]] == said
        assert f"{100 * report['sets']['fer']['accuracy']:.1f}%" in html
        assert "contempt" in html and "broken.jpg" in html
        if not CHROMIUM.exists():
            if os.environ.get("CI"):
                pytest.fail("headless Chromium is required in CI (.ci/run installs the Debian package chromium)")
            pytest.skip("headless Chromium not installed (apt-get install -y chromium)")
        shot = first["out"] / "report.png"
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--window-size=1280,2400", (first["out"] / "report.html").as_uri()],
                       capture_output=True, timeout=120, check=True)
        image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"))
        assert image.shape == (2400, 1280)
        # A rendered page has text, plots and thumbnails: far from one flat colour.
        assert image.std() > 20 and (image < 100).mean() > 0.01


# ---------------------------------------------------------------- as the nightly job runs it


@pytest.mark.slow
def test_nightly_gate_through_job_submit(ray_cluster, sets, models, tmp_path):
    history = tmp_path / "history"
    common = ["python", "-m", "jobs.evaluate", "--input", f"ck={sets['ck']}", "--history", str(history)]
    good = ray_cluster.submit(*common, "--output", str(tmp_path / "good"), "--model", str(models["probe"]))
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert "ck: accuracy" in good.stdout and "on 24 of 29 images (1 unreadable, 4 of unknown classes)" in good.stdout
    bad = ray_cluster.submit(*common, "--output", str(tmp_path / "bad"), "--model", str(models["worse"]))
    accuracy = json.loads((tmp_path / "good" / "report.json").read_text())["sets"]["ck"]["accuracy"]
    assert accuracy > 0.01, "precondition: the probe model gets some of ck right"
    assert bad.returncode != 0
    assert (f"REGRESSION: set ck: accuracy dropped by {accuracy:.4f} ({accuracy:.4f} -> 0.0000) "
            "against the previous run") in bad.stdout + bad.stderr
    assert len((history / "history.jsonl").read_text().splitlines()) == 2


def test_kuberay_manifest_runs_the_nightly_config():
    manifest = yaml.safe_load((ROOT / "deploy" / "rayjob-nightly.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    assert manifest["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert manifest["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "jobs.evaluate"]
    _, args = evaluate.parse_args(command[3:])
    nightly = yaml.safe_load((ROOT / "conf" / "nightly.yaml").read_text())
    assert args.input == nightly["input"] and args.history == nightly["history"]
    assert "{run_id}" in args.output and args.baseline and args.tolerance > 0


def test_a_set_may_choose_its_own_faces_mode():
    assert evaluate._split_input("tw:detect=s3://b/k=v") == ("tw", "detect", "s3://b/k=v")
    assert evaluate._split_input("fer=/data/fer") == ("fer", None, "/data/fer")
    for spec in ("tw:=/data", ":detect=/data"):
        with pytest.raises(evaluate.UsageError, match="expected NAME=PATH_OR_S3 or NAME:MODE=PATH_OR_S3"):
            evaluate._split_input(spec)


def test_input_flags_replace_the_configs_sets():
    _, args = evaluate.parse_args(["--conf", "nightly", "--input", "one=/data/one"])
    assert args.input == ["one=/data/one"] and args.history.startswith("s3://")


@pytest.mark.slow
def test_s3_sets_output_and_history(ray_cluster, s3, sets, models):
    client = s3.client()
    for bucket in ("eval-data", "eval-out"):
        client.create_bucket(Bucket=bucket)
    for image in sets["ck"].rglob("*"):
        if image.is_file():
            client.upload_file(str(image), "eval-data", f"ck/{image.relative_to(sets['ck'])}")
    client.upload_file(str(models["probe"]), "eval-data", "models/probe.pt")
    result = ray_cluster.submit("python", "-m", "jobs.evaluate", "--input", "ck=s3://eval-data/ck",
                                "--output", "s3://eval-out/runs/{run_id}", "--history", "s3://eval-out/history",
                                "--model", "s3://eval-data/models/probe.pt", env_vars=s3.env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, key="testing", secret="testing")
    entry = json.loads(fs.cat("eval-out/history/history.jsonl"))
    report = json.loads(fs.cat(entry["report"].removeprefix("s3://")))
    ck = report["sets"]["ck"]
    assert (ck["n_images"], ck["n_errors"], ck["n_excluded_unknown"]) == (29, 1, CONTEMPT)
    assert ck["errors"] == [{"path": "s3://eval-data/ck/anger/broken.jpg", "error": "not an image"}]
    assert entry["sets"]["ck"]["accuracy"] == ck["accuracy"]
    df = pd.read_parquet(fs.open(f"{ck['predictions'].removeprefix('s3://')}/predictions.parquet"))
    assert len(df) == 29 and set(df["folder"]) == {*CK_FOLDERS, "contempt"}
    html = fs.cat(entry["report"].removeprefix("s3://").replace("report.json", "report.html")).decode()
    assert html.count('src="data:image/jpeg;base64,') == len(ck["most_confident_mistakes"]) > 0
