"""Facial emotion recognition: everything about a model, shared by the batch job, evaluation and serving."""

from emotion.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from emotion.labels import LABELS, canonical_label
from emotion.predictor import Predictor

__all__ = [
    "LABELS",
    "Checkpoint",
    "CheckpointError",
    "Predictor",
    "canonical_label",
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
