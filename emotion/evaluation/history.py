"""Evaluation history: one JSON line per run, and the pinned baseline a person chose.

The history lives under a stable prefix, apart from each run's output, so that tonight's run finds
last night's. Lines are only ever added: a bad run stays on record, and the pinned baseline (a
report.json or history line chosen by a person) still catches a slow slide that every night-to-
night comparison would let through.
"""

import json
from typing import Any

from emotion.uris import filesystem

HISTORY_FILE = "history.jsonl"


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
            "n_images", "n_evaluated", "n_errors", "n_excluded_unknown", "n_no_face", "faces_found")
    return {
        "run": report["run"]["id"],
        "finished": report["run"]["finished"],
        "report": report_uri,
        "model": {k: report["model"][k] for k in ("name", "uri", "sha256")},
        "sets": {name: {k: result[k] for k in keys} for name, result in report["sets"].items()},
        "gate": {"passed": report["gate"]["passed"], "failures": len(report["gate"]["failures"])},
    }
