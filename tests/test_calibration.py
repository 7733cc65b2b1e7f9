"""Temperature scaling: the fit recovers a known temperature, the Predictor applies it without
changing a prediction, and jobs.calibrate writes a new calibrated checkpoint."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emotion.calibration import calibrate, calibration_error, fit_temperature
from emotion.checkpoint import load_checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.predictor import Predictor
from tests.conftest import tiny_checkpoint
from tests.images import labelled_faces

ROOT = Path(__file__).resolve().parent.parent


def sampled(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Class ids drawn from softmax(`logits`): labels for which these logits are calibrated."""
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    rng = np.random.default_rng(seed)
    return np.asarray([rng.choice(len(p), p=p / p.sum()) for p in probs])


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_the_fit_undoes_a_known_over_or_under_confidence(scale):
    logits = np.random.default_rng(1).normal(0, 2, (4000, 7))
    targets = sampled(logits)
    fitted = fit_temperature(logits * scale, targets)
    assert fitted == pytest.approx(scale, rel=0.1)
    assert calibration_error(logits * scale, targets, fitted) <= calibration_error(logits * scale, targets, 1.0) + 1e-9


def test_no_examples_is_refused():
    with pytest.raises(ValueError, match="no examples"):
        fit_temperature(np.zeros((0, 7)), np.zeros(0, dtype=int))


def test_the_predictor_divides_logits_by_the_temperature_and_keeps_every_prediction():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 48, 1), dtype=np.uint8)
    # float32 for both: "auto" times bf16 against float32 per Predictor and, on a loaded host, two
    # Predictors can choose differently, which moves probabilities by more than the tolerance.
    plain = Predictor(tiny_checkpoint(), device="cpu", precision="fp32")
    hot = Predictor(dataclasses.replace(tiny_checkpoint(), temperature=2.5), device="cpu", precision="fp32")
    logits = plain.predict_logits(pixels)
    assert np.allclose(plain.predict_pixels(pixels), torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    assert np.allclose(hot.predict_pixels(pixels), torch.softmax(logits / 2.5, dim=1).numpy(), atol=1e-6)
    assert (hot.predict_pixels(pixels).argmax(1) == plain.predict_pixels(pixels).argmax(1)).all()
    assert hot.predict_pixels(pixels).max(1).mean() < plain.predict_pixels(pixels).max(1).mean()


def test_calibrate_fits_the_predictors_own_logits_and_records_the_fit():
    predictor = Predictor(tiny_checkpoint(), device="cpu")
    pixels = np.random.default_rng(2).integers(0, 256, (300, 48, 48, 1), dtype=np.uint8)
    logits = predictor.predict_logits(pixels).numpy().astype(np.float64)
    # Labels drawn from logits five times sharper than the model's: it is under-confident.
    targets = sampled(logits * 5)
    calibrated = calibrate(predictor, pixels, targets, batch_size=64)
    fit = calibrated.metrics["calibration"]
    assert calibrated.temperature == fit["temperature"] == pytest.approx(fit_temperature(logits, targets))
    assert calibrated.temperature < 0.5 and fit["faces"] == 300
    assert fit["ece"] < fit["ece_uncalibrated"]
    assert calibrated.state_dict is predictor.checkpoint.state_dict


def test_jobs_calibrate_writes_a_new_checkpoint_and_never_its_input(tmp_path):
    labelled_faces(tmp_path / "val", LABELS, per_class=6)
    model = tmp_path / "model.pt"
    save_checkpoint(tiny_checkpoint(), model)
    before = model.read_bytes()
    command = [sys.executable, "-m", "jobs.calibrate", "--model", str(model), "--validation", str(tmp_path / "val")]
    same = subprocess.run([*command, "--output", str(model)], cwd=ROOT, capture_output=True, text=True)
    assert same.returncode == 2 and same.stderr.strip().count("\n") == 0 and "--output must differ" in same.stderr
    done = subprocess.run([*command, "--output", str(tmp_path / "cal.pt")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fitted on 42 faces" in done.stdout
    calibrated = load_checkpoint(tmp_path / "cal.pt")
    assert calibrated.temperature == calibrated.metrics["calibration"]["temperature"] != 1.0
    assert model.read_bytes() == before
