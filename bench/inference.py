"""Batched CPU inference throughput of a checkpoint, through `emotion.Predictor`.

Prints images/s for the Predictor as shipped (flip averaging, precision "auto") and, side by
side, for float32 and for a single forward pass, so the cost of each choice is visible.

    python bench/inference.py [--model PATH] [--batch-size 256] [--seconds 10]
"""

import argparse
import dataclasses
import time

import numpy as np
import torch

from emotion.predictor import Predictor


def images_per_second(predictor: Predictor, pixels: np.ndarray, seconds: float) -> float:
    predictor.predict_pixels(pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict_pixels(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded model)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rows = []
    for precision in ("auto", "fp32"):
        for flip in (True, False):
            predictor = Predictor(args.model, device="cpu", precision=precision)
            if not flip:
                predictor.checkpoint = dataclasses.replace(predictor.checkpoint, test_time_flip=False)
            rng = np.random.default_rng(0)
            size, channels = predictor.checkpoint.input_size, predictor.checkpoint.channels
            pixels = rng.integers(0, 256, (args.batch_size, size, size, channels), dtype=np.uint8)
            rate = images_per_second(predictor, pixels, args.seconds)
            rows.append((f"{predictor.precision}{' + flip' if flip else ''}", rate))
    shipped = rows[0][1]
    print(f"{'configuration':<16}{'images/s':>10}{'vs shipped':>12}")
    for name, rate in rows:
        print(f"{name:<16}{rate:>10.0f}{rate / shipped:>11.2f}x")
    print(f"shipped configuration: {shipped:.0f} images/s (target >= 600)")


if __name__ == "__main__":
    main()
