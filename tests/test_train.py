"""A real Ray Train run of a few seconds: the checkpoint it writes loads and predicts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from emotion.augment import augment_faces
from emotion.checkpoint import load_checkpoint
from emotion.labels import LABELS
from emotion.predictor import Predictor
from emotion.training import class_weights
from tests.services import ROOT

FOLDERS = ["anger", "disgusted", "fearful", "happiness", "neutral", "sadness", "surprised", "contempt"]


def synthetic_faces(root, per_class: int = 12) -> None:
    """Class sub-folders named as public datasets name them; each class has its own brightness."""
    rng = np.random.default_rng(0)
    for k, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(20 + 30 * k, 8, (48, 48)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / folder / f"{i}.png")


@pytest.mark.slow
def test_ray_train_writes_a_checkpoint_that_loads_and_predicts(tmp_path):
    synthetic_faces(tmp_path / "train")
    output = tmp_path / "model.pt"
    command = [sys.executable, "-m", "jobs.train", "--train", str(tmp_path / "train"), "--output", str(output),
               "--epochs", "3", "--batch-size", "16", "--arch-kwargs", json.dumps({"widths": [8, 16], "depth": 2}),
               "--val-fraction", "0.25", "--storage", str(tmp_path / "runs"), "--name", "smoke"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, RAY_ADDRESS="local"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "skipping classes the model has no label for: ['contempt']" in log
    assert "epoch 1/3" in log and "val_macro_f1" in log and "img/s" in log
    checkpoint = load_checkpoint(output)
    assert checkpoint.name == "smoke" and checkpoint.labels == LABELS
    assert checkpoint.recipe["epochs"] == 3 and checkpoint.num_params > 0
    assert 0 <= checkpoint.metrics["validation"]["val_accuracy"] <= 1
    assert set(checkpoint.metrics["validation"]["per_class"]) >= set(LABELS)
    assert "stratified 25% split" in checkpoint.trained_on
    probs = Predictor(output, device="cpu").predict_pixels(np.zeros((2, 48, 48, 1), np.uint8))
    assert probs.shape == (2, 7) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_class_weights_lift_rare_classes():
    targets = np.asarray([0] * 90 + [1] * 10)
    half, full = class_weights(targets, 0.5), class_weights(targets, 1.0)
    assert half[1] / half[0] == pytest.approx(3.0)
    assert full[1] / full[0] == pytest.approx(9.0)
    assert torch.all(half[2:] == 0)


def test_augmentation_keeps_shape_and_varies_per_image():
    x = torch.randn(8, 1, 48, 48)
    out = augment_faces(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out[0], out[1] - (x[1] - x[0]))
    assert (out - x).abs().mean() > 0.05


def test_unwarped_faces_are_shifted_and_mirrored_without_resampling():
    """Flips and whole-pixel shifts must not blur: about 0.7 x 0.5 x 0.8 x 0.95 = 27% of faces get
    no warp, photometric change, noise or blur, and those must equal a shifted input exactly."""
    x = torch.randn(256, 1, 48, 48)
    out = augment_faces(x, torch.Generator().manual_seed(0))
    exact = 0
    for image, augmented in zip(x[:, 0], out[:, 0], strict=True):
        candidates = (
            torch.roll(source, (dy, dx), (0, 1))[8:40, 8:40]
            for source in (image, image.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
        exact += any(torch.allclose(c, augmented[8:40, 8:40], atol=1e-5) for c in candidates)
    assert 0.15 < exact / len(x) < 0.5


def test_plain_augmentation_only_shifts_and_mirrors():
    x = torch.randn(64, 1, 48, 48)
    plain = {"warp_fraction": 0, "photometric_fraction": 0, "blur_fraction": 0, "noise_fraction": 0}
    out = augment_faces(x, torch.Generator().manual_seed(0), **plain)
    for image, augmented in zip(x[:, 0], out[:, 0], strict=True):
        assert any(
            torch.allclose(torch.roll(source, (dy, dx), (0, 1))[8:40, 8:40], augmented[8:40, 8:40], atol=1e-5)
            for source in (image, image.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
