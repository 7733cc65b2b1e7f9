"""What a scoring output holds, who wrote it, and what a run may do to it.

A user's `--output` may be mistyped as the input, a parent of it, or a folder of their own
files. The job therefore writes into a location only when it is new, empty, or holds exactly
what an earlier run of the job wrote: its Parquet files beside a run record (`_run.json`,
written before any row) or a manifest. `--overwrite` removes those files one by one and nothing
else, and a resumed run must be the same run: same input, model, file limit, precision, backend
and face settings.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from emotion.uris import join, scheme, strip_scheme

MANIFEST = "_manifest.json"
RUN_RECORD = "_run.json"
# A folder earlier versions of the job left beside their Parquet files; removed by --overwrite.
LEGACY_CHECKPOINT_DIR = "_checkpoint"
_MARKERS = (RUN_RECORD, MANIFEST, LEGACY_CHECKPOINT_DIR)


class OutputError(Exception):
    """The output location cannot be used as asked; the message says why and what to do."""


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_separate(input_uri: str, output_uri: str) -> None:
    """Refuse an output that is the input, lies inside it, or contains it: overwriting or resuming
    there would delete or rescan the user's images."""
    if scheme(input_uri) != scheme(output_uri):
        return
    if scheme(input_uri) != "file":
        source, target = strip_scheme(input_uri).rstrip("/"), strip_scheme(output_uri).rstrip("/")
    else:
        source, target = os.path.realpath(input_uri), os.path.realpath(output_uri)
    if source == target:
        raise OutputError(f"--output {output_uri} is the input; choose a location outside it")
    if _inside(target, source):
        raise OutputError(f"--output {output_uri} lies inside --input {input_uri}; choose a location outside it")
    if _inside(source, target):
        raise OutputError(f"--output {output_uri} contains --input {input_uri}; choose a location beside it")


@dataclass(frozen=True)
class OutputState:
    """The files found under an output location, split into the job's own and anyone else's."""

    ours: list[str]
    foreign: list[str]
    record: dict[str, Any] | None
    complete: bool

    @property
    def empty(self) -> bool:
        return not self.ours and not self.foreign


def _is_ours(relative: str) -> bool:
    if relative.startswith(LEGACY_CHECKPOINT_DIR + "/"):
        return True
    return "/" not in relative and (relative in (RUN_RECORD, MANIFEST) or relative.endswith(".parquet"))


def inspect_output(fs: AbstractFileSystem, root: str) -> OutputState:
    """Classify everything under `root`. Parquet files count as the job's only beside one of its
    markers: a folder of the user's own Parquet files is not a previous run."""
    if not fs.exists(root):
        return OutputState([], [], None, complete=False)
    if fs.isfile(root):
        return OutputState([], [root], None, complete=False)
    prefix = root.rstrip("/") + "/"
    files = [p for p in fs.find(root, withdirs=False) if p.startswith(prefix)]
    relative = {p: p[len(prefix):] for p in files}
    marked = any(r in _MARKERS or r.startswith(LEGACY_CHECKPOINT_DIR + "/") for r in relative.values())
    ours = [p for p, r in relative.items() if marked and _is_ours(r)]
    foreign = [p for p in files if p not in set(ours)]
    record = None
    if f"{prefix}{RUN_RECORD}" in ours:
        with fs.open(f"{prefix}{RUN_RECORD}", "r") as f:
            record = json.load(f)
    return OutputState(ours, foreign, record, complete=f"{prefix}{MANIFEST}" in ours)


def run_record(input_uri: str, model_uri: str, model_sha256: str, limit: int | None, precision: str
               ) -> dict[str, Any]:
    """What makes two runs the same run: rows from different inputs, models or precisions must
    never share one output. Layout settings (actors, batch size) may change between attempts."""
    return {"input": input_uri, "model": {"uri": model_uri, "sha256": model_sha256}, "limit": limit,
            "precision": precision}


def record_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a partial output's run record and this run's."""
    differences = []
    if previous.get("input") != current["input"]:
        differences.append(f"input {previous.get('input')} (now {current['input']})")
    if previous.get("model", {}).get("sha256") != current["model"]["sha256"]:
        before = previous.get("model", {})
        differences.append(f"model {before.get('uri')} sha256 {str(before.get('sha256'))[:12]} "
                           f"(now {current['model']['uri']} sha256 {current['model']['sha256'][:12]})")
    for key, flag in (("limit", "--limit"), ("precision", "--precision")):
        if previous.get(key) != current[key]:
            differences.append(f"{flag} {previous.get(key)} (now {current[key]})")
    return differences


def check_output(state: OutputState, output_uri: str, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse what would touch files the job did not write, replace a complete run unasked, or mix
    the rows of two different runs."""
    if state.foreign:
        shown = ", ".join(sorted(state.foreign)[:3])
        more = f" and {len(state.foreign) - 3} more" if len(state.foreign) > 3 else ""
        raise OutputError(f"--output {output_uri} holds files this job did not write ({shown}{more}); "
                          "choose a new or empty location")
    if overwrite or state.empty:
        return
    if state.complete:
        raise OutputError(f"--output {output_uri} already holds a complete run ({MANIFEST}); "
                          "pass --overwrite to replace it")
    if state.record is None:
        raise OutputError(f"--output {output_uri} holds a partial run without a run record ({RUN_RECORD}), "
                          "so it cannot be resumed safely; pass --overwrite to start again")
    differences = record_differences(state.record, record)
    if differences:
        raise OutputError(f"--output {output_uri} holds a partial run made with other settings: "
                          f"{'; '.join(differences)}; rerun with the same settings to resume, "
                          "or pass --overwrite to start again")


def clear_output(fs: AbstractFileSystem, state: OutputState) -> None:
    """Remove a previous run's files one by one, never the folder or anything else in it."""
    for path in sorted(state.ours):
        fs.rm_file(path)


def write_record(fs: AbstractFileSystem, root: str, record: dict[str, Any]) -> None:
    """The run record that marks the output as this job's, so a rerun may replace it and nothing else."""
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, RUN_RECORD), "w") as f:
        json.dump(record, f, indent=2)
