"""Evaluation history (one JSON line per run) and the regression gate a scheduler acts on.

The history lives under a stable prefix, apart from each run's output, so that tonight's run finds
last night's. Lines are only ever added: a bad run stays on record, and the pinned baseline (a
report.json or history line chosen by a person) still catches a slow slide that every night-to-
night comparison would let through.
"""

import json
from typing import Any

from emotion.folders import filesystem

HISTORY_FILE = "history.jsonl"
GATED_METRICS = ("accuracy", "macro_f1")
_NAMES = {"previous": "previous run", "baseline": "pinned baseline"}


def history_uri(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/{HISTORY_FILE}"


def read_history(prefix: str) -> list[dict[str, Any]]:
    """Every entry under `prefix`, oldest first; none when the history does not exist yet."""
    fs, path = filesystem(history_uri(prefix))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_history(prefix: str, entry: dict[str, Any]) -> None:
    """Add `entry` as the last line. Object stores cannot append, so the file is rewritten with its
    previous bytes unchanged in front; a nightly job has one writer, so no lock is needed."""
    fs, path = filesystem(history_uri(prefix))
    previous = fs.cat_file(path) if fs.exists(path) else b""
    if previous and not previous.endswith(b"\n"):
        previous += b"\n"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(previous + (json.dumps(entry, sort_keys=True) + "\n").encode())


def read_reference(uri: str) -> dict[str, Any]:
    """A pinned baseline: a report.json or one history line, both holding `sets.<name>.<metric>`."""
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        reference = json.load(f)
    if not isinstance(reference, dict) or not isinstance(reference.get("sets"), dict):
        raise ValueError(f"{uri}: not an evaluation report or history entry (no 'sets')")
    return reference


def history_entry(report: dict[str, Any], report_uri: str) -> dict[str, Any]:
    """The line a run adds to the history: headline metrics per set, the model, and the verdict."""
    keys = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "top2_accuracy", "ece",
            "n_images", "n_evaluated", "n_errors", "n_excluded_unknown")
    return {
        "run": report["run"]["id"],
        "finished": report["run"]["finished"],
        "report": report_uri,
        "model": {k: report["model"][k] for k in ("name", "uri", "sha256")},
        "sets": {name: {k: result[k] for k in keys} for name, result in report["sets"].items()},
        "gate": {"passed": report["gate"]["passed"], "failures": len(report["gate"]["failures"])},
    }


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
