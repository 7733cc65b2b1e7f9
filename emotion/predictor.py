"""`Predictor`: one loaded model, the only thing a batch actor or a Serve replica holds."""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from emotion.checkpoint import Checkpoint, load_checkpoint
from emotion.precision import autocast, resolve_precision
from emotion.preprocess import DEFAULT_MAX_PIXELS, Decoded, decode_image, normalize


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` when given, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """Turns batches of images into class probabilities (N x len(labels)) with one loaded model.

    Preprocessing is taken from the checkpoint, never from the caller, so every entry point feeds
    the network exactly what it was trained on. `precision="auto"` runs bfloat16 where the device
    has native units for it (AMX CPUs, recent GPUs): 2-3x the throughput for probabilities that
    differ from float32 by about 1e-2.
    """

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint | None = None,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        precision: str = "auto",
    ) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        )
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.max_pixels = max_pixels
        model = self.checkpoint.build().to(self.device)
        self.model = model.to(memory_format=torch.channels_last)

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

        With `test_time_flip` set in the checkpoint, logits of the image and its mirror are
        averaged: faces are left-right symmetric in meaning, and this is worth about a point of
        accuracy for one extra forward pass.
        """
        if len(pixels) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        ckpt = self.checkpoint
        batch = torch.from_numpy(normalize(pixels, ckpt.mean, ckpt.std)).to(self.device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            logits = self.model(batch).float()
            if ckpt.test_time_flip:
                logits = (logits + self.model(torch.flip(batch, dims=[3])).float()) / 2
        return torch.softmax(logits, dim=1).cpu().numpy()

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
            top = int(row.argmax())
            results[i] = {
                "status": "ok",
                "error": None,
                "predicted_label": self.labels[top],
                "predicted_class": top,
                "confidence": float(row[top]),
                "probabilities": dict(zip(self.labels, row.tolist(), strict=True)),
                "width": decoded[i].width,
                "height": decoded[i].height,
            }
        return results
