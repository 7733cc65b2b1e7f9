"""The nightly gate fails a total failure instead of passing it: a set with no evaluable image, or
a metric it cannot compute where the reference has one."""

import json

import pytest

from emotion.checkpoint import save_checkpoint
from emotion.evaluation.gate import compare, gate_failures
from tests.conftest import tiny_checkpoint
from tests.images import jpeg
from tests.services import run_job


def test_a_metric_that_cannot_be_computed_fails_against_a_reference_that_has_it():
    sets = {"fer": {"accuracy": None, "macro_f1": None, "n_images": 5, "n_evaluated": 0, "n_errors": 5,
                    "n_excluded_unknown": 0},
            "ck": {"accuracy": 0.7, "macro_f1": None, "n_images": 9, "n_evaluated": 9}}
    reference = {"fer": {"accuracy": 0.66, "macro_f1": 0.64}, "ck": {"accuracy": 0.7, "macro_f1": 0.6}}
    failures = gate_failures(sets, {"baseline": compare(sets, reference)}, tolerance=0.01)
    assert [(f["against"], f["set"], f["metric"]) for f in failures] == [
        (None, "fer", "n_evaluated"), ("baseline", "fer", "accuracy"), ("baseline", "fer", "macro_f1"),
        ("baseline", "ck", "macro_f1"),
    ]
    assert failures[0]["message"] == "set fer: no evaluable image (5 unreadable, 0 of unknown classes, of 5)"
    assert failures[1]["message"] == ("set fer: accuracy could not be computed (reference 0.6600) "
                                      "against the pinned baseline")


def test_a_new_set_or_a_metric_the_reference_lacks_does_not_fail():
    sets = {"new": {"accuracy": 0.5, "macro_f1": 0.4, "n_evaluated": 3}}
    reference = {"old": {"accuracy": 0.9, "macro_f1": 0.9}, "new": {"accuracy": None}}
    assert gate_failures(sets, {"previous": compare(sets, reference)}, tolerance=0.01) == []


@pytest.mark.slow
def test_every_image_unreadable_against_a_baseline_exits_1_with_the_reason(tmp_path, job_env):
    broken = tmp_path / "broken"
    for label in ("happy", "sad"):
        (broken / label).mkdir(parents=True)
        for i in range(3):
            (broken / label / f"{i}.jpg").write_bytes(jpeg(seed=i)[:60])
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"sets": {"broken": {"accuracy": 0.66, "macro_f1": 0.64}}}))
    model = tmp_path / "tiny.pt"
    save_checkpoint(tiny_checkpoint(), model)
    result = run_job("evaluate", "--input", f"broken={broken}", "--output", str(tmp_path / "out"),
                     "--model", str(model), "--baseline", str(baseline), env=job_env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "REGRESSION: set broken: no evaluable image (6 unreadable, 0 of unknown classes, of 6)" in result.stderr
    assert "REGRESSION: set broken: accuracy could not be computed (reference 0.6600) against the pinned baseline" \
        in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gate"]["passed"] is False and len(report["gate"]["failures"]) == 3
