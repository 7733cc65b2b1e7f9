"""Classification metrics for one labelled set, as plain JSON-able values.

Every ratio whose denominator can be zero (a class absent from the set, a class never predicted,
a set with nothing readable) is reported as None rather than 0, so a reader can tell "undefined"
from "bad", and nothing divides by zero. Averages over classes use the classes present in the set:
a class with no images has no recall, and counting it as 0 would punish a model for a gap in the
data.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

DEFAULT_BINS = 15


def _value(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS) -> list[dict[str, Any]]:
    """Equal-width confidence bins with their count, mean confidence and accuracy (None if empty).

    A bin is (lower, upper]; the first also holds confidence 0, so every prediction has one bin.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        bins.append({
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float(correct[members].mean()) if count else None,
        })
    return bins


def expected_calibration_error(bins: list[dict[str, Any]]) -> float | None:
    """Count-weighted mean gap between accuracy and confidence over the bins; None when empty."""
    total = sum(b["count"] for b in bins)
    if not total:
        return None
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


def _row_normalised(counts: np.ndarray, no_face: np.ndarray) -> list[list[float] | None]:
    """Each row divided by its class's images (those with no face found included); a row of a
    class with no images is None, not a row of NaN."""
    return [(row / (row.sum() + missed)).tolist() if row.sum() + missed else None
            for row, missed in zip(counts, no_face, strict=True)]


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Accuracy, F1 averages, per-class scores, confusion matrix, top-2 accuracy and calibration.

    `y_true` and `y_pred` are class ids into `labels` (the model's classes, which also order the
    confusion matrix); `probs` is N x len(labels). Micro-F1 counts every prediction, including
    those of absent classes, so it equals accuracy; macro- and weighted-F1 average over the classes
    present. With no rows every score is None.

    A `y_pred` of -1 (with a row of NaN in `probs`) is an image with no answer, a photo in which
    no face was found: it is a miss for its true class in every score (accuracy, recall, F1,
    top-2), is counted per true class in the confusion matrix's `no_face` column (normalised rows
    then sum to 1 with it), and, having no confidence, stays out of calibration.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    probs = np.asarray(probs, dtype=float).reshape(len(y_true), len(labels))
    ids = list(range(len(labels)))
    present = sorted(set(y_true.tolist()))
    counts = confusion_matrix(y_true, y_pred, labels=ids) if len(y_true) else np.zeros((len(ids), len(ids)), int)
    answered = y_pred >= 0
    no_face = np.bincount(y_true[~answered], minlength=len(ids))[: len(ids)]
    metrics: dict[str, Any] = {
        "labels": list(labels),
        "labels_present": [labels[i] for i in present],
        "absent_classes": [labels[i] for i in ids if i not in present],
        "n_evaluated": len(y_true),
        "confusion_matrix": {"counts": counts.tolist(), "no_face": no_face.tolist(),
                             "normalized": _row_normalised(counts, no_face)},
    }
    if not len(y_true):
        metrics |= dict.fromkeys(("accuracy", "macro_f1", "micro_f1", "weighted_f1", "top2_accuracy", "ece"))
        metrics["per_class"] = {
            label: {"precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0} for label in labels
        }
        metrics["reliability"] = reliability_bins(np.zeros(0), np.zeros(0), n_bins)
        return metrics
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=np.nan
    )
    predicted = counts.sum(axis=0)
    metrics["per_class"] = {
        label: {
            "precision": _value(precision[i]),
            "recall": _value(recall[i]),
            "f1": _value(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i, label in enumerate(labels)
    }
    confidence = probs[answered].max(axis=1)
    bins = reliability_bins(confidence, (y_true == y_pred)[answered], n_bins)
    # -1 among the labels makes an unanswered image a false positive of "no answer", so micro-F1
    # stays equal to accuracy.
    micro_labels = ids if answered.all() else [*ids, -1]
    top2 = None
    if len(ids) > 2:
        top2 = float(top_k_accuracy_score(y_true[answered], probs[answered], k=2, labels=ids, normalize=False)
                     / len(y_true)) if answered.any() else 0.0
    metrics |= {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y_true, y_pred, labels=micro_labels, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted", zero_division=0)),
        "top2_accuracy": top2,
        "ece": expected_calibration_error(bins),
        "reliability": bins,
    }
    return metrics
