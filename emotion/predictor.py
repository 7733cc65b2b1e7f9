"""`Predictor`: one loaded model, the only thing a batch actor or a Serve replica holds."""

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

from emotion.checkpoint import Checkpoint, load_checkpoint
from emotion.flip import FLIP_MARGIN, flip_averaged_logits
from emotion.models import Ensemble
from emotion.portable import OnnxNetwork, export_bytes
from emotion.precision import resolve_precision
from emotion.preprocess import DEFAULT_MAX_PIXELS, Decoded, decode_image, normalize

BACKENDS = ("torch", "onnxruntime")
PRECISIONS = ("auto", "bf16", "fp32", "int8")
# Forward passes through PyTorch on CPU go through the network in slices of this many images, so
# the activations of a slice stay in the cache between layers (measured in docs/benchmarks.md).
CPU_MICRO_BATCH = 16

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# precision "auto" times this many faces in each precision when the CPU could run bf16, and
# keeps bf16 only when float32 takes BF16_MARGIN times as long or more.
TIMING_BATCH = 64
BF16_MARGIN = 1.2
# and, for a checkpoint that carries an int8 graph, switches to it only when the float network
# chosen takes INT8_MARGIN times as long or more on the same batch.
INT8_MARGIN = 1.2


def prediction_columns(probs: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """The prediction record of N rows of probabilities, as columns: `predicted_class`,
    `predicted_label`, `confidence` and `prob_<label>` for each label. A row of NaN (an image that
    could not be decoded) gets class -1, no label and NaN. The batch job, evaluation and the
    endpoint all build their answers here, so they cannot disagree on a field.
    """
    ok = ~np.isnan(probs).any(axis=1)
    top = np.where(ok, np.nan_to_num(probs, nan=-1).argmax(axis=1), -1)
    columns: dict[str, np.ndarray] = {
        "predicted_class": top.astype(np.int16),
        "predicted_label": np.asarray([labels[t] if t >= 0 else None for t in top], dtype=object),
        "confidence": np.where(ok, np.nan_to_num(probs, nan=-1).max(axis=1, initial=-1), np.nan).astype(np.float32),
    }
    for i, label in enumerate(labels):
        columns[f"prob_{label}"] = probs[:, i].astype(np.float32)
    return columns


def prediction_record(probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """One image's prediction record (from `prediction_columns`) as JSON-ready values, with the
    probabilities by label name."""
    columns = prediction_columns(np.asarray(probs, dtype=np.float32)[None, :], labels)
    return {
        "predicted_label": columns["predicted_label"][0],
        "predicted_class": int(columns["predicted_class"][0]),
        "confidence": float(columns["confidence"][0]),
        "probabilities": {label: float(columns[f"prob_{label}"][0]) for label in labels},
    }


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` when given, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Turns batches of images into class probabilities (N x len(labels)) with one loaded model.

    Preprocessing is taken from the checkpoint, never from the caller, so every entry point feeds
    the network exactly what it was trained on. `precision="auto"` runs bfloat16 where the device
    has native instructions for it (recent GPUs; AVX512-BF16 or AMX CPUs where a timed batch shows
    it faster than float32), at a small cost in the probabilities' precision (measured in
    docs/benchmarks.md and the model card), and on a CPU the checkpoint's int8 graph, when it
    carries one, where a timed batch shows it clearly faster than either; `precision` says which
    was chosen. `precision="int8"` runs that graph in ONNX Runtime whatever the backend.

    The loaded network is prepared for inference only: batch norms are folded into the
    convolutions before them and, in bfloat16, the weights are cast once rather than on every
    call. `model` is that prepared network; `checkpoint.build()` gives the trainable one.

    `backend="onnxruntime"` runs the same checkpoint exported to ONNX (`emotion.portable`) in
    ONNX Runtime instead, on the CPU (float32, or int8 as above); decoding, mirroring and the
    temperature are this class's either way, so the backends and precisions differ only in the
    network's arithmetic.
    """

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint | None = None,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        precision: str = "auto",
        flip_margin: float = FLIP_MARGIN,
        backend: str = "torch",
    ) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.backend = backend
        # ONNX Runtime runs on the CPU here, so a GPU in the machine does not make it the default.
        self.device = pick_device(device or ("cpu" if backend == "onnxruntime" or precision == "int8" else None))
        self.max_pixels = max_pixels
        self.flip_margin = flip_margin if self.checkpoint.test_time_flip else 0.0
        if precision == "int8":
            self._run_int8()
        elif backend == "onnxruntime":
            if self.device.type != "cpu" or precision not in ("auto", "fp32"):
                raise ValueError("the onnxruntime backend runs float32 or int8 on the CPU: device cpu, precision auto, "
                                 "fp32 or int8")
            self.precision, self.dtype = "fp32", torch.float32
            self.model = OnnxNetwork(export_bytes(self.checkpoint), threads=torch.get_num_threads())
        else:
            self.precision = resolve_precision(precision, self.device)
            self.dtype = DTYPES[self.precision]
            self.model = _inference_network(self.checkpoint.build(), self.device, self.dtype)
            if precision == "auto" and self.precision == "bf16" and self.device.type == "cpu":
                self._keep_bf16_only_if_faster()
        if precision == "auto" and self.device.type == "cpu" and self.checkpoint.int8_graph:
            self._take_int8_if_faster()

    def _run_int8(self) -> None:
        if self.device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only, not on {self.device}")
        if not self.checkpoint.int8_graph:
            raise ValueError(f"precision int8: checkpoint {self.name!r} carries no int8 graph "
                             "(python -m jobs.quantize makes one)")
        self.precision, self.dtype = "int8", torch.float32
        self.model = OnnxNetwork(self.checkpoint.int8_graph, threads=torch.get_num_threads())

    @torch.inference_mode()
    def _keep_bf16_only_if_faster(self) -> None:
        """Time one batch in bf16 and in float32 and keep float32 unless bf16 is clearly faster.

        Native bf16 instructions do not make every CPU faster at it: on some the conversions cost
        more than the arithmetic saves (docs/benchmarks.md has both kinds of host). The margin
        keeps the choice from resting on timing noise, so replicas on one host agree.
        """
        ckpt = self.checkpoint
        sample = torch.zeros(TIMING_BATCH, ckpt.channels, ckpt.input_size, ckpt.input_size, device=self.device)
        fp32 = _inference_network(ckpt.build(), self.device, torch.float32)
        bf16_seconds = _seconds_per_batch(self.model, sample.to(torch.bfloat16))
        if _seconds_per_batch(fp32, sample) < BF16_MARGIN * bf16_seconds:
            self.precision, self.dtype, self.model = "fp32", torch.float32, fp32

    @torch.inference_mode()
    def _take_int8_if_faster(self) -> None:
        """Time one batch through the checkpoint's int8 graph and through the float network chosen
        so far, and switch to int8 only when the float one takes INT8_MARGIN times as long or more.

        int8 changes about one answer in a hundred, near class boundaries, and leaves accuracy where
        it was (docs/model-card.md), so it is worth it only where it is clearly faster, as on CPUs
        whose float32 arithmetic bounds throughput (docs/benchmarks.md).
        """
        ckpt = self.checkpoint
        sample = torch.zeros(TIMING_BATCH, ckpt.channels, ckpt.input_size, ckpt.input_size)
        int8 = OnnxNetwork(ckpt.int8_graph, threads=torch.get_num_threads())
        int8_seconds = _seconds_per_batch(int8, sample)
        if _seconds_per_batch(self.model, sample.to(self.dtype)) >= INT8_MARGIN * int8_seconds:
            self.precision, self.dtype, self.model = "int8", torch.float32, int8

    @property
    def labels(self) -> tuple[str, ...]:
        return self.checkpoint.labels

    @property
    def name(self) -> str:
        return self.checkpoint.name or self.checkpoint.arch

    def decode(self, data: bytes) -> Decoded:
        """Bytes to this model's input pixels, or an error value (never an exception)."""
        ckpt = self.checkpoint
        return decode_image(data, ckpt.input_size, ckpt.channels, self.max_pixels)

    @torch.inference_mode()
    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x C uint8 pixels (from `decode`) to N x classes float32 probabilities.

        With `test_time_flip` set in the checkpoint, an image whose top two probabilities are
        within `flip_margin` also goes through the network mirrored and the logits are averaged
        (see `emotion.flip`): the accuracy of mirroring every image for less of the cost.
        The probabilities are the softmax of the logits divided by the checkpoint's `temperature`
        (fitted on validation faces, see `emotion.calibration`), so that a confidence of 0.8 is
        right about 80% of the time; the predicted class is the same at any temperature.
        """
        logits = self.predict_logits(pixels)
        return torch.softmax(logits / self.checkpoint.temperature, dim=1).numpy()

    @torch.inference_mode()
    def predict_logits(self, pixels: np.ndarray) -> torch.Tensor:
        """N x H x W x C uint8 pixels to N x classes float32 logits on the CPU, flip-averaged as in
        `predict_pixels` but before any temperature: what calibration is fitted on."""
        if len(pixels) == 0:
            return torch.zeros((0, len(self.labels)), dtype=torch.float32)
        ckpt = self.checkpoint
        batch = torch.from_numpy(normalize(pixels, ckpt.mean, ckpt.std)).to(self.device, self.dtype)
        return flip_averaged_logits(self._forward, batch, self.flip_margin).cpu()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return _micro_batched(self.model, batch)

    def predict_bytes(self, images: list[bytes]) -> list[dict[str, Any]]:
        """One result per input: label, confidence and probabilities, or the decoding error."""
        decoded = [self.decode(data) for data in images]
        good = [i for i, d in enumerate(decoded) if d.error is None]
        probs = self.predict_pixels(np.stack([decoded[i].pixels for i in good]) if good else
                                    np.zeros((0, 1, 1, 1), dtype=np.uint8))
        results: list[dict[str, Any]] = [
            {"status": "error", "error": d.error, "width": d.width, "height": d.height}
            for d in decoded
        ]
        for row, i in zip(probs, good, strict=True):
            results[i] = {"status": "ok", "error": None, **prediction_record(row, self.labels),
                          "width": decoded[i].width, "height": decoded[i].height}
        return results


def _micro_batched(model: nn.Module | OnnxNetwork, batch: torch.Tensor) -> torch.Tensor:
    """`model(batch)`, through PyTorch on the CPU in slices of CPU_MICRO_BATCH; ONNX Runtime takes
    the batch whole, its int8 kernels running faster on larger ones (docs/benchmarks.md, "int8")."""
    cut = batch.device.type == "cpu" and isinstance(model, nn.Module)
    step = CPU_MICRO_BATCH if cut else max(len(batch), 1)
    return torch.cat([model(batch[i : i + step]) for i in range(0, len(batch), step)])


def _seconds_per_batch(model: nn.Module | OnnxNetwork, batch: torch.Tensor, repeats: int = 3) -> float:
    """The fastest of `repeats` timed passes, after one untimed pass that warms caches and kernels."""
    _micro_batched(model, batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        _micro_batched(model, batch)
        timings.append(time.perf_counter() - started)
    return min(timings)


def _inference_network(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model` in eval mode on `device` and `dtype`, with conv + batch norm pairs folded.

    Folding needs a torch.fx trace; a network fx cannot trace (data-dependent control flow) runs
    unfolded, which is slower but gives the same probabilities.
    """
    return _folded(model.eval()).to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _folded(model: nn.Module) -> nn.Module:
    if isinstance(model, Ensemble):
        # Member by member: a cascade's choice of faces is control flow that fx cannot trace.
        model.members = nn.ModuleList(_folded(member) for member in model.members)
        return model
    with contextlib.suppress(torch.fx.proxy.TraceError):
        return fx_optimization.fuse(model)
    return model
