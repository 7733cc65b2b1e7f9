"""The regression gate a scheduler acts on: this run against the previous one and a pinned baseline.

A failure is a value with a message naming the set, the metric and the reference, so the job can
print it, store it in report.json and the history, and exit 1.
"""

from typing import Any

GATED_METRICS = ("accuracy", "macro_f1")
_NAMES = {"previous": "previous run", "baseline": "pinned baseline"}


def compare(current: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]] | None
            ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per set and gated metric: the reference value, the current one and the drop (positive = worse).

    Sets or metrics the reference lacks are left out: a new set must not fail its first night. A
    metric the reference has but this run could not compute (None) is kept with a drop of None,
    so the gate fails it rather than letting a total failure drop out of the comparison.
    """
    if not reference:
        return {}
    deltas: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, result in current.items():
        before = reference.get(name)
        if not before:
            continue
        for metric in GATED_METRICS:
            now, then = result.get(metric), before.get(metric)
            if then is None:
                continue
            drop = None if now is None else then - now
            deltas.setdefault(name, {})[metric] = {"reference": then, "current": now, "drop": drop}
    return deltas


def gate_failures(sets: dict[str, dict[str, Any]],
                  comparisons: dict[str, dict[str, dict[str, dict[str, float | None]]]], tolerance: float
                  ) -> list[dict[str, Any]]:
    """Each set with no evaluable image, and each (reference, set, metric) that dropped by more than
    `tolerance` or could not be computed, with a message naming what failed and why."""
    failures = [
        {"against": None, "set": name, "metric": "n_evaluated", "drop": None, "reference": None, "current": 0,
         "message": (f"set {name}: no evaluable image ({result.get('n_errors', 0)} unreadable, "
                     f"{result.get('n_excluded_unknown', 0)} of unknown classes, of {result.get('n_images', 0)})")}
        for name, result in sets.items()
        if not result.get("n_evaluated")
    ]
    for against, compared in comparisons.items():
        for name, metrics in compared.items():
            for metric, d in metrics.items():
                versus = f"against the {_NAMES.get(against, against)}"
                if d["drop"] is None:
                    message = (f"set {name}: {metric} could not be computed (reference {d['reference']:.4f}) "
                               f"{versus}")
                elif d["drop"] > tolerance:
                    message = (f"set {name}: {metric} dropped by {d['drop']:.4f} "
                               f"({d['reference']:.4f} -> {d['current']:.4f}) {versus}, tolerance {tolerance:.4f}")
                else:
                    continue
                failures.append({"against": against, "set": name, "metric": metric, "drop": d["drop"],
                                 "reference": d["reference"], "current": d["current"], "message": message})
    return failures


def verdict(sets: dict[str, dict[str, Any]], previous: dict[str, Any] | None, baseline: dict[str, Any] | None,
            baseline_uri: str | None, tolerance: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The comparison block and the verdict of report.json, against the previous run's history
    line and the pinned baseline (either may be absent)."""
    comparisons = {
        "previous": compare(sets, previous["sets"] if previous else None),
        "baseline": compare(sets, baseline["sets"] if baseline else None),
    }
    comparison = comparisons | {"previous_run": previous["run"] if previous else None, "baseline_uri": baseline_uri}
    failures = gate_failures(sets, comparisons, tolerance)
    return comparison, {"tolerance": tolerance, "passed": not failures, "failures": failures}
