"""The cost of finding faces: `faces: whole` against `faces: detect` on the same photos, side by side.

    python bench/faces_cost.py [--input ../shared/data/taiwanese] [--repeat 2]

1. One process on one core: `FaceFinder.find` per image in each mode (decoding alone; decoding,
   detection and framing), so the per-image price of detection is plain.
2. `jobs.score` end to end on a local Ray cluster this script starts, the two modes alternating
   `--repeat` times: wall seconds and files/s, and from Ray's own task records of each run how
   the work spread: the read-and-decode tasks (where detection runs) against the inference
   actors' batches, as task count, summed seconds and the longest task.
"""

import os

# The cluster started below uses token authentication (Ray 2.60), and Ray reads the mode when it
# is imported: the client side must agree before that.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray.util.state import list_tasks

from emotion.faces import FaceFinder, load_face_config
from emotion.folders import list_images, read_many
from jobs.conf import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "taiwanese"


def per_image(paths: list[str], mode: str) -> float:
    """Images/s of FaceFinder.find on one core, after one warm-up call."""
    finder = FaceFinder(load_face_config(CONF_DIR / "faces.yaml"), 48, 1)
    contents = read_many(paths)
    finder.find(contents[0], mode)
    started = time.perf_counter()
    for data in contents:
        finder.find(data, mode)
    return len(contents) / (time.perf_counter() - started)


def spread(address: str, started_ms: float, ended_ms: float) -> dict[str, tuple[int, float, float]]:
    """Per kind of task run between the two times: count, summed seconds, longest seconds."""
    kinds: dict[str, list[float]] = {}
    for task in list_tasks(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        if not task.start_time_ms or not task.end_time_ms or task.start_time_ms < started_ms:
            continue
        if task.end_time_ms > ended_ms:
            continue
        name = f"{task.name} {task.func_or_class_name}"
        kind = "read+decode(+detect)" if "ReadImageFiles" in name else (
            "inference batches" if "ScoreBatch" in name and ".submit" in name else None)
        if kind:
            kinds.setdefault(kind, []).append((task.end_time_ms - task.start_time_ms) / 1000)
    return {kind: (len(times), sum(times), max(times)) for kind, times in kinds.items()}


def job(input_dir: str, mode: str, address: str) -> tuple[float, int, dict]:
    """Wall seconds, files scored and the task spread of one jobs.score run on the cluster."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "jobs.score", "--input", input_dir, "--output", out, "--faces", mode]
        env = dict(os.environ, RAY_ADDRESS=address)
        started_ms, started = time.time() * 1000, time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - started
        ended_ms = time.time() * 1000
        manifest = json.loads((Path(out) / "_manifest.json").read_text())
    # Task records reach the state API a moment after the tasks end.
    time.sleep(3)
    return wall, manifest["files"]["total"], spread(address, started_ms, ended_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED), help="a folder of photos (default: the shared Taiwanese half)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    paths = list_images(args.input).paths
    torch.set_num_threads(1)
    print(f"{len(paths)} images under {args.input}")
    rates = {mode: per_image(paths, mode) for mode in ("whole", "detect")}
    print(f"one core, FaceFinder.find: whole {rates['whole']:.0f} images/s, detect {rates['detect']:.1f} images/s "
          f"({rates['detect'] / rates['whole']:.2f}x; {1000 / rates['detect'] - 1000 / rates['whole']:.1f} ms more "
          "per image)")
    # The state API that lists the tasks is served by the dashboard.
    context = ray.init(include_dashboard=True, log_to_driver=False)
    walls: dict[str, list[float]] = {"whole": [], "detect": []}
    print(f"\njobs.score on a local cluster of {int(ray.cluster_resources()['CPU'])} CPUs, modes alternating:")
    print(f"{'run':<10}{'wall s':>8}{'files/s':>9}   tasks: count, summed s, longest s")
    for _ in range(args.repeat):
        for mode in ("whole", "detect"):
            wall, files, tasks = job(args.input, mode, context.address_info["gcs_address"])
            walls[mode].append(wall)
            shown = "; ".join(f"{kind} {n}, {total:.1f}, {longest:.1f}" for kind, (n, total, longest) in tasks.items())
            print(f"{mode:<10}{wall:>8.1f}{files / wall:>9.1f}   {shown}")
    whole, detect = statistics.median(walls["whole"]), statistics.median(walls["detect"])
    print(f"median wall: whole {whole:.1f} s, detect {detect:.1f} s ({detect / whole:.2f}x)")


if __name__ == "__main__":
    main()
