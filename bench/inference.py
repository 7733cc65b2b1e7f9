"""CPU inference throughput of a checkpoint, through `emotion.Predictor`, batched and one image
at a time.

Prints images/s for the Predictor as shipped (torch, precision "auto", mirroring only the images
the first pass is unsure of, labelled with the precision "auto" chose here) and, side by side,
for mirroring every image, for no mirroring, for bf16, float32 and int8 forced (int8 when the
checkpoint carries its graph), and for the ONNX Runtime backend in float32, so the cost of each
choice is visible.
Real faces, not noise: how many images get the second pass depends on what the model sees.

    python bench/inference.py [--faces DIR] [--model PATH] [--batch-size 256] [--seconds 10]
"""

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emotion.folders import list_labelled_images, read_many
from emotion.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
SHARED_FACES = ROOT.parent / "shared" / "data" / "fer2013" / "validation"
BUNDLED_FACES = ROOT / "examples" / "faces"


def decoded_faces(predictor: Predictor, folder: str) -> np.ndarray:
    """Every decodable image under the class sub-folders of `folder`, at the model's input size."""
    decoded = [predictor.decode(data) for data in read_many(list_labelled_images(folder).paths)]
    return np.stack([d.pixels for d in decoded if d.error is None])


def images_per_second(predict: Callable[[Any], object], faces: np.ndarray | torch.Tensor, batch_size: int,
                      seconds: float) -> float:
    """Faces per second through `predict` (a Predictor's `predict_pixels`, or a network) called on
    whole batches of `faces` for about `seconds`, after one untimed call that warms it up."""
    batches = [faces[i : i + batch_size] for i in range(0, len(faces) - batch_size + 1, batch_size)]
    predict(batches[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            predict(batch)
            done += len(batch)
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", default=str(SHARED_FACES if SHARED_FACES.is_dir() else BUNDLED_FACES),
                        help="labelled face folder (default: FER2013 PublicTest if present, else the bundled samples)")
    parser.add_argument("--model", help="checkpoint (default: the embedded model)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    shipped = Predictor(args.model, device="cpu")
    faces = decoded_faces(shipped, args.faces)
    batch_size = min(args.batch_size, len(faces))
    configurations = [
        ("shipped", shipped),
        ("mirror every image", Predictor(args.model, device="cpu", flip_margin=1)),
        ("no mirroring", Predictor(args.model, device="cpu", flip_margin=0)),
        ("bf16, shipped", Predictor(args.model, device="cpu", precision="bf16")),
        ("bf16, no mirroring", Predictor(args.model, device="cpu", precision="bf16", flip_margin=0)),
        ("fp32, shipped", Predictor(args.model, device="cpu", precision="fp32")),
        ("fp32, no mirroring", Predictor(args.model, device="cpu", precision="fp32", flip_margin=0)),
    ]
    if shipped.checkpoint.int8_graph:
        configurations += [
            ("int8, shipped", Predictor(args.model, device="cpu", precision="int8")),
            ("int8, no mirroring", Predictor(args.model, device="cpu", precision="int8", flip_margin=0)),
        ]
    else:
        print("the checkpoint carries no int8 graph (python -m jobs.quantize): its rows are left out")
    if importlib.util.find_spec("onnx"):
        configurations += [
            ("onnxruntime, shipped", Predictor(args.model, device="cpu", backend="onnxruntime", precision="fp32")),
            ("onnxruntime, no mirroring", Predictor(args.model, device="cpu", backend="onnxruntime",
                                                    precision="fp32", flip_margin=0)),
        ]
    else:
        print("onnx not installed (pip install -e '.[onnx]'): the float32 onnxruntime rows are left out")
    # The mirroring decision reads the first pass's softmax before any temperature.
    first_pass = np.sort(torch.softmax(configurations[2][1].predict_logits(faces), dim=1).numpy(), axis=1)
    mirrored = float(np.mean(first_pass[:, -1] - first_pass[:, -2] < shipped.flip_margin))
    print(f"{len(faces)} faces from {args.faces}, batches of {batch_size}; "
          f"{mirrored:.0%} get the mirrored pass (margin {shipped.flip_margin})")
    rows = []
    for name, predictor in configurations:
        # The first rows run precision "auto": they show what it chose on this host.
        label = f"{name} ({predictor.precision})" if not name.startswith(("bf16", "fp32", "int8", "onnx")) else name
        batched = images_per_second(predictor.predict_pixels, faces, batch_size, args.seconds)
        single = images_per_second(predictor.predict_pixels, faces, 1, args.seconds / 2)
        rows.append((label, batched, single))
    print(f"{'configuration':<28}{'batched/s':>10}{'vs shipped':>12}{'single/s':>10}{'vs shipped':>12}")
    for name, batched, single in rows:
        print(f"{name:<28}{batched:>10.0f}{batched / rows[0][1]:>11.2f}x{single:>10.0f}{single / rows[0][2]:>11.2f}x")
    print(f"shipped configuration: {rows[0][1]:.0f} images/s batched (target >= 600)")


if __name__ == "__main__":
    main()
