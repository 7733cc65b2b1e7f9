"""Metrics on hand-checked cases: absent classes, unpredicted classes, empty sets, calibration."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from emotion.evaluation.metrics import classification_metrics, expected_calibration_error, reliability_bins

LABELS = ("a", "b", "c", "d")


def one_hot_probs(pred: list[int], confidence: list[float], n: int = 4) -> np.ndarray:
    """Probabilities whose argmax is `pred` with the given top probability, rest spread evenly."""
    probs = np.zeros((len(pred), n))
    for i, (p, c) in enumerate(zip(pred, confidence, strict=True)):
        probs[i] = (1 - c) / (n - 1)
        probs[i, p] = c
    return probs


@pytest.fixture
def absent_class_case():
    # Class d has no images but is predicted twice; class c has images but is never predicted.
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 3, 1, 0, 1, 3, 1])
    probs = one_hot_probs(y_pred.tolist(), [0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4])
    return y_true, y_pred, probs


def test_absent_and_unpredicted_classes_are_undefined_not_zero(absent_class_case):
    y_true, y_pred, probs = absent_class_case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y_true, y_pred, probs, LABELS)
    assert m["absent_classes"] == ["d"] and m["labels_present"] == ["a", "b", "c"]
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0, "predicted": 2}
    assert m["per_class"]["c"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 3, "predicted": 0}
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    # Macro-F1 averages the three present classes only: (2/3 + 0.4 + 0) / 3.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.4 + 3 * 0) / 8)
    assert m["micro_f1"] == pytest.approx(m["accuracy"]) == pytest.approx(3 / 8)
    assert m["confusion_matrix"]["counts"][3] == [0, 0, 0, 0]
    assert m["confusion_matrix"]["normalized"][3] is None
    assert m["confusion_matrix"]["normalized"][2] == pytest.approx([0, 2 / 3, 0, 1 / 3])


def test_top2_counts_the_second_guess(absent_class_case):
    y_true = absent_class_case[0]
    probs = np.array([[0.5, 0.3, 0.1, 0.1]] * len(y_true))
    m = classification_metrics(y_true, np.zeros(len(y_true), int), probs, LABELS)
    # The top two are a and b for every image: the images of class c are the only top-2 misses.
    assert m["top2_accuracy"] == pytest.approx(5 / 8)


def test_expected_calibration_error_by_hand():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.35, 0.35])
    correct = np.array([1, 1, 1, 0, 1, 0], bool)
    bins = reliability_bins(confidence, correct, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 2, 0, 0, 0, 0, 0, 4]
    assert bins[9]["accuracy"] == pytest.approx(0.75) and bins[3]["accuracy"] == pytest.approx(0.5)
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    # |0.75 - 0.95| * 4/6 + |0.5 - 0.35| * 2/6
    assert expected_calibration_error(bins) == pytest.approx(0.2 * 4 / 6 + 0.15 * 2 / 6)


def test_bin_edges_are_upper_inclusive_and_zero_has_a_bin():
    bins = reliability_bins(np.array([0.0, 0.5, 0.5000001, 1.0]), np.ones(4, bool), n_bins=2)
    assert [b["count"] for b in bins] == [2, 2]


def test_an_empty_set_is_all_undefined():
    m = classification_metrics(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 4)), LABELS)
    for key in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "top2_accuracy", "ece"):
        assert m[key] is None
    assert m["n_evaluated"] == 0 and m["absent_classes"] == list(LABELS)
    assert all(row is None for row in m["confusion_matrix"]["normalized"])
    assert m["per_class"]["a"]["support"] == 0


def test_random_predictions_agree_with_sklearn():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(4), size=300)
    y_pred = probs.argmax(axis=1)
    y_true = np.where(rng.random(300) < 0.4, np.minimum(y_pred, 2), rng.integers(0, 3, 300))  # d never true
    m = classification_metrics(y_true, y_pred, probs, LABELS)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    for i, label in enumerate("abc"):
        got = m["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    top2 = np.argsort(-probs, axis=1)[:, :2]
    assert m["top2_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(y_true, top2, strict=True)]))
