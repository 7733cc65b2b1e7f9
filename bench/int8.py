"""What an int8 ONNX graph (`python -m jobs.export --int8`) buys against float32, and what it costs.

Exports a checkpoint to ONNX in float32 and in int8 (calibrated on FER2013 training faces, as
`jobs.export --int8 --calibration` does), then runs PublicTest through PyTorch float32 (the
Predictor's network, batch norms folded), ONNX Runtime float32 and ONNX Runtime int8 side by side,
each called as the Predictor calls its network (PyTorch in channels-last micro-batches, ONNX
Runtime whole batches):
accuracy and macro-F1 with every face mirrored too (logits averaged) and alone, the share of faces
given float32's top class, and images/s batched for the network alone (one pass per face); then
whole Predictors from decoded pixels, mirroring where unsure as shipped, the int8 one carrying
that graph as `python -m jobs.quantize` stores it and run with precision int8.

    python bench/int8.py [--model CKPT] [--calibration DIR] [--calibration-images 512] [--seconds 5]
"""

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from inference import images_per_second
from sklearn.metrics import accuracy_score, f1_score

from emotion.flip import flip_averaged_logits
from emotion.folders import list_labelled_images, read_many
from emotion.portable import OnnxNetwork, export_bytes, quantized_bytes
from emotion.predictor import Predictor, _micro_batched
from emotion.preprocess import normalize
from jobs.export import calibration_faces

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/data/fer2013"

Network = Callable[[torch.Tensor], torch.Tensor]


def logits(network: Network, faces: torch.Tensor, batch_size: int, mirrored: bool) -> torch.Tensor:
    """Logits of every face in batches, as the Predictor computes them with mirroring on every face
    or none."""
    with torch.inference_mode():
        return torch.cat([flip_averaged_logits(network, faces[i : i + batch_size], 1 if mirrored else 0)
                          for i in range(0, len(faces), batch_size)])


def main() -> None:
    """Print one table for the networks alone and one for whole Predictors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded model)")
    parser.add_argument("--calibration", default=str(DATA / "train"), help="faces to calibrate on")
    parser.add_argument("--validation", default=str(DATA / "validation"))
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")

    predictor = Predictor(args.model, device="cpu", precision="fp32")
    checkpoint = predictor.checkpoint
    graph = export_bytes(checkpoint)
    int8 = quantized_bytes(graph, calibration_faces(checkpoint, args.calibration, args.calibration_images))
    images = list_labelled_images(args.validation)
    decoded = [predictor.decode(data) for data in read_many(images.paths)]
    if any(d.error for d in decoded):
        raise SystemExit(f"undecodable faces in {args.validation}: fix or remove them")
    faces = torch.from_numpy(normalize(np.stack([d.pixels for d in decoded]), checkpoint.mean, checkpoint.std))
    truth = np.array([checkpoint.labels.index(label) for label in images.labels])
    threads = torch.get_num_threads()
    networks: list[tuple[str, Network]] = [
        ("torch fp32", partial(_micro_batched, predictor.model)),
        ("onnxruntime fp32", partial(_micro_batched, OnnxNetwork(graph, threads=threads))),
        ("onnxruntime int8", partial(_micro_batched, OnnxNetwork(int8, threads=threads))),
    ]
    print(f"{len(faces)} faces from {args.validation}; int8 calibrated on {args.calibration_images} "
          f"from {args.calibration}; graphs {len(graph) / 1e6:.1f} MB and {len(int8) / 1e6:.1f} MB")
    print(f"{'network':<20}{'mirrored':>16}{'alone':>16}{'same as fp32':>14}{'images/s':>10}{'vs torch':>10}")
    reference, rows = None, []
    for name, network in networks:
        alone = logits(network, faces, args.batch_size, mirrored=False)
        both = logits(network, faces, args.batch_size, mirrored=True)
        reference = alone.argmax(1) if reference is None else reference
        speed = images_per_second(torch.inference_mode()(partial(flip_averaged_logits, network, margin=0)),
                                  faces, args.batch_size, args.seconds)
        rows.append(speed)
        cells = [f"{accuracy_score(truth, x.argmax(1)):.1%} / {f1_score(truth, x.argmax(1), average='macro'):.3f}"
                 for x in (both, alone)]
        same = float((alone.argmax(1) == reference).float().mean())
        print(f"{name:<20}{cells[0]:>16}{cells[1]:>16}{same:>14.1%}{speed:>10.0f}{speed / rows[0]:>9.2f}x", flush=True)

    # Whole Predictors from decoded pixels, mirroring where unsure as shipped.
    pixels = np.stack([d.pixels for d in decoded])
    quantized = checkpoint.with_int8_graph(int8)
    predictors = [("torch fp32", predictor),
                  ("onnxruntime fp32", Predictor(checkpoint, device="cpu", backend="onnxruntime", precision="fp32")),
                  ("int8", Predictor(quantized, device="cpu", precision="int8"))]
    print(f"{'Predictor, as shipped':<24}{'accuracy / F1':>16}{'images/s':>10}{'vs torch':>10}")
    rates = []
    for name, whole in predictors:
        predicted = np.concatenate([whole.predict_pixels(pixels[i : i + args.batch_size]).argmax(1)
                                    for i in range(0, len(pixels), args.batch_size)])
        rates.append(images_per_second(whole.predict_pixels, pixels, args.batch_size, args.seconds))
        cell = f"{accuracy_score(truth, predicted):.1%} / {f1_score(truth, predicted, average='macro'):.3f}"
        print(f"{name:<24}{cell:>16}{rates[-1]:>10.0f}{rates[-1] / rates[0]:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
