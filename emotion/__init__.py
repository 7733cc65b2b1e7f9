"""Facial emotion recognition: everything about a model, shared by the batch job, evaluation and serving.

The names below load on first use: importing a light submodule (`emotion.preprocess`,
`emotion.labels`) must not pay for torch, which takes seconds in every Ray worker that decodes.
"""

import importlib
import importlib.metadata
from typing import Any

_EXPORTS = {
    "LABELS": "emotion.labels",
    "canonical_label": "emotion.labels",
    "Checkpoint": "emotion.checkpoint",
    "CheckpointError": "emotion.checkpoint",
    "load_checkpoint": "emotion.checkpoint",
    "save_checkpoint": "emotion.checkpoint",
    "Predictor": "emotion.predictor",
}
__all__ = sorted(_EXPORTS)
try:
    __version__ = importlib.metadata.version("emotion-ray")
except importlib.metadata.PackageNotFoundError:  # a source tree shipped without installing (a job's working_dir)
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emotion' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
