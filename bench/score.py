"""The scoring job against the usual alternatives, side by side on the same files in one run.

    python bench/score.py --input ../shared/data/fer2013/train [--sizes 1000 10000 0]

For each size N (0 = all files) it measures:
  job         `python -m jobs.score` end to end (its own local Ray); its steady rate and fixed
              start-up come from the wall times of the two largest N (wall = start-up + N / rate)
  per-image   open, preprocess and forward one image at a time, as single-image emotion APIs do
  dataloader  a hand-written torch DataLoader (2 workers) with batched forward, same Predictor
  ceiling     the Predictor's forward pass alone on pre-decoded pixels
and prints images/s, the ratios, the job's fixed start-up and the peak memory of each.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emotion.folders import list_images
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


def per_image(paths: list[str], predictor: Predictor) -> float:
    started = time.perf_counter()
    for path in paths:
        decoded = predictor.decode(Path(path).read_bytes())
        if decoded.pixels is not None:
            predictor.predict_pixels(decoded.pixels[None])
    return len(paths) / (time.perf_counter() - started)


class _Files(Dataset):
    def __init__(self, paths: list[str], predictor: Predictor) -> None:
        self.paths, self.predictor = paths, predictor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        decoded = self.predictor.decode(Path(self.paths[i]).read_bytes())
        size, channels = self.predictor.checkpoint.input_size, self.predictor.checkpoint.channels
        return decoded.pixels if decoded.pixels is not None else np.zeros((size, size, channels), np.uint8)


def dataloader(paths: list[str], predictor: Predictor, batch_size: int) -> float:
    loader = DataLoader(_Files(paths, predictor), batch_size=batch_size, num_workers=2,
                        collate_fn=lambda items: np.stack(items))
    started = time.perf_counter()
    for batch in loader:
        predictor.predict_pixels(batch)
    return len(paths) / (time.perf_counter() - started)


def ceiling(paths: list[str], predictor: Predictor, batch_size: int) -> float:
    pixels = np.stack([predictor.decode(Path(p).read_bytes()).pixels for p in paths])
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        predictor.predict_pixels(pixels[start:start + batch_size])
    return len(pixels) / (time.perf_counter() - started)


def job(paths: list[str], input_dir: str, limit: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "jobs.score", "--input", input_dir, "--output", out, *extra]
        if limit:
            command += ["--limit", str(limit)]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True,
                       env={"RAY_ADDRESS": "local", "PATH": str(Path(sys.executable).parent)})
        wall = time.perf_counter() - started
        manifest = json.loads((Path(out) / "_manifest.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_rate": len(paths) / wall, "steady_rate": manifest["images_per_s"],
            "startup_s": wall - manifest["seconds"], "wall_s": wall, "peak_child_mb": peak}


def marginal_rate(walls: dict[int, float]) -> tuple[float | None, float | None]:
    """Steady images/s and fixed start-up from the two largest runs: wall = start-up + N / rate.

    The job's own clock starts before its actors have loaded the model, so its manifest rate
    mixes warm-up into throughput; the slope between two sizes does not.
    """
    sizes = sorted(walls)
    if len(sizes) < 2 or walls[sizes[-1]] <= walls[sizes[-2]]:
        return None, None
    rate = (sizes[-1] - sizes[-2]) / (walls[sizes[-1]] - walls[sizes[-2]])
    return rate, walls[sizes[-1]] - sizes[-1] / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 0])
    parser.add_argument("--batch-size", type=int, default=512, help="for the baselines; the job uses conf/score.yaml")
    parser.add_argument("--baselines-at", type=int, default=0, help="size at which to run the baselines")
    parser.add_argument("--job-args", default="", help="extra flags for jobs.score (one string)")
    args = parser.parse_args()
    everything = list_images(args.input).paths
    predictor = Predictor(device="cpu")
    print(f"{len(everything)} files under {args.input}; model {predictor.name}, precision {predictor.precision}, "
          f"torch threads {torch.get_num_threads()}")
    walls: dict[int, float] = {}
    baselines: tuple[list[str], dict[str, float]] | None = None
    for size in args.sizes:
        paths = everything[:size] if size else everything
        result = job(paths, args.input, size, args.job_args.split())
        walls[len(paths)] = result["wall_s"]
        print(f"N={len(paths):>6}  job wall {result['wall_s']:.1f} s ({result['wall_rate']:.0f} images/s), "
              f"in-job {result['steady_rate']:.0f} images/s, before the job's clock {result['startup_s']:.1f} s, "
              f"peak child RSS {result['peak_child_mb']:.0f} MB")
        if size == args.baselines_at:
            baselines = (paths, {"job (in-job)": result["steady_rate"], "job (wall)": result["wall_rate"]})
    rate, startup = marginal_rate(walls)
    if rate:
        print(f"time = {startup:.1f} s + N / {rate:.0f} images/s (from the two largest N): "
              f"fixed start-up {startup:.1f} s, steady {rate:.0f} images/s")
    if baselines is None:
        return
    paths, rates = baselines
    if rate:
        rates = {"job (steady)": rate, **rates}
    rates["ceiling"] = ceiling(paths, predictor, args.batch_size)
    rates["dataloader"] = dataloader(paths, predictor, args.batch_size)
    rates["per-image"] = per_image(paths, predictor)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nN={len(paths)}: images/s and ratios (benchmark process peak RSS {own_peak:.0f} MB)")
    print(f"{'method':<14}{'images/s':>10}{'/ceiling':>10}{'/dataloader':>13}{'/per-image':>12}")
    for name, value in rates.items():
        print(f"{name:<14}{value:>10.0f}{value / rates['ceiling']:>10.2f}{value / rates['dataloader']:>13.2f}"
              f"{value / rates['per-image']:>12.2f}")


if __name__ == "__main__":
    main()
