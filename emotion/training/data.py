"""The faces a training run learns from, decoded once into memory.

Datasets of small faces fit in memory many times over, so each worker decodes its set once into
uint8 arrays, drops training copies of validation images, and weighs classes from the counts.
"""

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from emotion.folders import list_labelled_images, read_many
from emotion.labels import LABELS
from emotion.preprocess import decode_image
from emotion.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Arrays:
    """Decoded images (N x H x W x C uint8), class ids, and content hashes for de-duplication."""

    pixels: np.ndarray
    targets: np.ndarray
    digests: list[str]


def load_arrays(uri: str, size: int, channels: int, limit_per_class: int | None = None) -> Arrays:
    """Decode a labelled folder into memory, skipping unknown classes and undecodable files."""
    found = list_labelled_images(uri)
    paths, labels = found.paths, found.labels
    if limit_per_class is not None:
        taken: Counter[str] = Counter()
        chosen = []
        for i, label in enumerate(labels):
            taken[label] += 1
            if taken[label] <= limit_per_class:
                chosen.append(i)
        paths, labels = [paths[i] for i in chosen], [labels[i] for i in chosen]
    if found.unknown:
        log.warning("%s: skipping classes the model has no label for: %s", uri, sorted(found.unknown))
    pixels, targets, digests, failed = [], [], [], 0
    for start in range(0, len(paths), 2048):
        chunk = read_many(paths[start : start + 2048])
        for data, label in zip(chunk, labels[start : start + 2048], strict=True):
            decoded = decode_image(data, size, channels)
            if decoded.error is not None:
                failed += 1
                continue
            pixels.append(decoded.pixels)
            targets.append(LABELS.index(label))
            digests.append(hashlib.md5(data).hexdigest())
    if failed:
        log.warning("%s: skipped %d undecodable files", uri, failed)
    if not pixels:
        raise ValueError(f"{uri}: no decodable images in the class sub-folders")
    return Arrays(np.stack(pixels), np.asarray(targets, dtype=np.int64), digests)


def split_data(cfg: TrainConfig) -> tuple[Arrays, Arrays]:
    """Training and validation arrays, with training copies of validation images removed.

    Byte-identical files across splits (about 2% of FER2013) would otherwise leak validation
    images into training and flatter model selection. `keep_validation_copies` trains on them
    anyway, to compare with recipes measured that way.
    """
    train = load_arrays(cfg.train, cfg.input_size, cfg.channels, cfg.limit_per_class)
    if cfg.validation:
        val = load_arrays(cfg.validation, cfg.input_size, cfg.channels, cfg.limit_per_class)
    else:
        idx_train, idx_val = train_test_split(
            np.arange(len(train.targets)),
            test_size=cfg.val_fraction,
            stratify=train.targets,
            random_state=cfg.seed,
        )
        train, val = _subset(train, idx_train), _subset(train, idx_val)
    seen = set(val.digests)
    unique = np.asarray([d not in seen for d in train.digests])
    if not unique.all():
        verb = "keeping" if cfg.keep_validation_copies else "dropping"
        log.warning("%s %d training images identical to validation images", verb, (~unique).sum())
        if not cfg.keep_validation_copies:
            train = _subset(train, np.flatnonzero(unique))
    return train, val


def _subset(arrays: Arrays, index: np.ndarray) -> Arrays:
    return Arrays(arrays.pixels[index], arrays.targets[index], [arrays.digests[i] for i in index])


def class_weights(targets: np.ndarray, power: float) -> torch.Tensor:
    """Inverse-frequency weights raised to `power`, mean 1: 0 ignores imbalance, 1 fully evens it.

    A partial correction lifts rare classes (disgust is 1.5% of FER2013) without giving up the
    overall accuracy that full re-weighting costs.
    """
    counts = np.bincount(targets, minlength=len(LABELS)).astype(np.float64)
    weights = (counts.sum() / np.maximum(counts, 1)) ** power
    weights[counts == 0] = 0
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)
