"""What wider stages would cost the default network's throughput, before any is trained.

The issue's lever "more width in the early stages" has to fit under the 600 images/s floor on
every host. This times the forward pass of the embedded model's network, built from its
checkpoint, beside the same architecture with each width list given (untrained weights: the cost
does not depend on them), in rounds that alternate between the networks so that load from
anything else falls on all of them alike, and prints images/s and the time ratio to the default.
Multiply the default's images/s from `bench/inference.py` by the inverse ratio to see where a wider
default would land.

    python bench/widths.py [--widths 40,80,160,256 ...] [--precision fp32] [--batch-size 256] [--rounds 8]
"""

import argparse
import time

import torch

from emotion.checkpoint import load_checkpoint
from emotion.models import build_model
from emotion.precision import autocast, resolve_precision


def width_list(text: str) -> tuple[int, ...]:
    """'40,80,160,256' as a tuple of positive ints, for argparse."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, not {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, not {text!r}")
    return widths


def main() -> None:
    """Print one line per width list: images/s and time relative to the default widths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=width_list, nargs="+",
                        default=[(40, 80, 160, 256), (48, 96, 128, 256), (48, 96, 192, 256)])
    parser.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    default = load_checkpoint()
    networks = {"the default": default.build()} | {
        "-".join(map(str, widths)): build_model(default.arch, len(default.labels), default.channels,
                                                **(default.arch_kwargs | {"widths": widths}))
        for widths in args.widths
    }
    for network in networks.values():
        network.eval().to(memory_format=torch.channels_last)
    batch = torch.randn(args.batch_size, default.channels, default.input_size, default.input_size)
    batch = batch.contiguous(memory_format=torch.channels_last)
    best = dict.fromkeys(networks, float("inf"))
    with torch.no_grad(), autocast(precision, device):
        for network in networks.values():
            network(batch)
        for _ in range(args.rounds):
            for name, network in networks.items():
                started = time.perf_counter()
                network(batch)
                best[name] = min(best[name], time.perf_counter() - started)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}, batches of "
          f"{args.batch_size}, best of {args.rounds} rounds, no mirroring; the default: {default.arch} "
          f"{default.arch_kwargs}")
    print(f"{'widths':<18}{'parameters':>12}{'images/s':>10}{'time vs default':>17}")
    for name, network in networks.items():
        parameters = sum(p.numel() for p in network.parameters())
        print(f"{name:<18}{parameters:>12,}{args.batch_size / best[name]:>10.0f}"
              f"{best[name] / best['the default']:>16.2f}x")


if __name__ == "__main__":
    main()
