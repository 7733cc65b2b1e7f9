"""Ensembles: several checkpoints joined into one file that loads, predicts, exports and
calibrates like any model, and members that cannot share one decoding are refused."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emotion.checkpoint import load_checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.portable import export_bytes, max_difference
from emotion.predictor import Predictor
from jobs.common import UsageError
from jobs.ensemble import join
from tests.conftest import tiny_checkpoint
from tests.images import labelled_faces

ROOT = Path(__file__).resolve().parent.parent


def test_the_ensemble_averages_its_members_log_probabilities():
    members = [tiny_checkpoint(seed=s, name=f"m{s}") for s in range(3)]
    ensemble = join(members)
    assert ensemble.arch == "ensemble" and ensemble.name == "m0+m1+m2"
    assert ensemble.num_params == sum(m.num_params for m in members)
    x = torch.randn(5, 1, 48, 48)
    with torch.inference_mode():
        expected = torch.stack([torch.log_softmax(m.build()(x), dim=1) for m in members]).mean(0)
        got = ensemble.build()(x)
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_ensemble_file_loads_predicts_and_exports_like_any_model(tmp_path):
    ensemble = join([tiny_checkpoint(seed=s) for s in range(2)])
    save_checkpoint(ensemble, tmp_path / "ens.pt")
    loaded = load_checkpoint(tmp_path / "ens.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (9, 48, 48, 1), dtype=np.uint8)
    probs = Predictor(loaded, device="cpu", precision="fp32").predict_pixels(pixels)
    assert probs.shape == (9, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert max_difference(loaded, export_bytes(loaded), batch=8) < 1e-4


@pytest.mark.parametrize("field", ["mean", "input_size", "labels"])
def test_members_that_cannot_share_one_decoding_are_refused_by_field(field):
    other = {"mean": (0.4,), "input_size": 64, "labels": tuple(reversed(tiny_checkpoint().labels))}[field]
    with pytest.raises(UsageError, match=f"members differ in {field}"):
        join([tiny_checkpoint(), dataclasses.replace(tiny_checkpoint(seed=1), **{field: other})])


def test_jobs_ensemble_joins_calibrates_and_never_overwrites_a_member(tmp_path):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"m{seed}.pt")
        save_checkpoint(tiny_checkpoint(seed=seed, name=f"m{seed}"), paths[-1])
    labelled_faces(tmp_path / "val", LABELS, per_class=6)
    command = [sys.executable, "-m", "jobs.ensemble", "--models", *map(str, paths)]
    clash = subprocess.run([*command, "--output", str(paths[0])], cwd=ROOT, capture_output=True, text=True)
    assert clash.returncode == 2 and "never overwritten" in clash.stderr
    done = subprocess.run([*command, "--output", str(tmp_path / "ens.pt"), "--validation", str(tmp_path / "val")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ensemble of 2 (m0+m1)" in done.stdout and "accuracy" in done.stdout and "macro-F1" in done.stdout
    ensemble = load_checkpoint(tmp_path / "ens.pt")
    assert ensemble.temperature == ensemble.metrics["calibration"]["temperature"]
