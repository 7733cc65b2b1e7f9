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
from emotion.portable import export_bytes, max_difference, read_metadata
from emotion.predictor import Predictor
from emotion.preprocess import normalize
from jobs.common import UsageError
from jobs.ensemble import join, main
from tests.conftest import splitting_margin, tiny_checkpoint
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


def test_a_cascade_asks_the_other_members_only_where_the_first_is_unsure():
    members = [tiny_checkpoint(seed=s) for s in range(3)]
    x = torch.randn(40, 1, 48, 48)
    margin = splitting_margin(members[0], x)
    cascade = join(members, cascade_margin=margin).build()
    seen = []
    cascade.members[1].register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    with torch.inference_mode():
        got = cascade(x)
        first = torch.log_softmax(members[0].build()(x), dim=1)
        everyone = torch.stack([torch.log_softmax(m.build()(x), dim=1) for m in members]).mean(0)
    top2 = first.exp().topk(2, dim=1).values
    unsure = top2[:, 0] - top2[:, 1] < margin
    assert seen == [int(unsure.sum())] and 0 < seen[0] < len(x)
    assert torch.allclose(got[unsure], everyone[unsure], atol=1e-6)
    assert torch.allclose(got[~unsure], first[~unsure], atol=1e-6)
    assert not torch.allclose(got[~unsure], everyone[~unsure], atol=1e-3)


def test_a_cascade_exports_to_a_graph_with_its_answers():
    """The graph runs every member on every face and picks per face (`max_difference`'s inputs)."""
    members = [tiny_checkpoint(seed=s) for s in range(2)]
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (64, 1, 48, 48)).astype(np.float32))
    margin = splitting_margin(members[0], x)
    cascade = join(members, cascade_margin=margin)
    graph = export_bytes(cascade)
    assert max_difference(cascade, graph, batch=64) < 1e-4
    assert read_metadata(graph)["arch_kwargs"]["cascade_margin"] == margin


def test_a_predictor_folds_every_member_of_a_cascade_and_keeps_its_answers():
    members = [tiny_checkpoint(seed=s) for s in range(2)]
    pixels = np.random.default_rng(1).integers(0, 256, (40, 48, 48, 1), dtype=np.uint8)
    x = torch.from_numpy(normalize(pixels, members[0].mean, members[0].std))
    cascade = join(members, cascade_margin=splitting_margin(members[0], x))
    predictor = Predictor(cascade, device="cpu", precision="fp32", flip_margin=0.0)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in predictor.model.modules())
    with torch.inference_mode():
        expected = cascade.build().eval()(x)
    assert torch.allclose(predictor.predict_logits(pixels), expected, atol=1e-4)
    in_bf16 = Predictor(cascade, device="cpu", precision="bf16").predict_pixels(pixels)
    assert in_bf16.shape == (40, 7) and np.allclose(in_bf16.sum(1), 1, atol=1e-2)


def test_a_cascade_needs_two_members():
    with pytest.raises(ValueError, match="a cascade needs at least two members"):
        join([tiny_checkpoint()], cascade_margin=0.1)


def test_jobs_ensemble_stores_the_cascade_margin_and_refuses_one_outside_0_1(tmp_path, capsys):
    paths = []
    for seed in range(2):
        paths.append(str(tmp_path / f"m{seed}.pt"))
        save_checkpoint(tiny_checkpoint(seed=seed), paths[-1])
    output = str(tmp_path / "cascade.pt")
    assert main(["--models", *paths, "--output", output, "--cascade-margin", "1.5"]) == 2
    assert "--cascade-margin must be in (0, 1], not 1.5" in capsys.readouterr().err
    assert not Path(output).exists()
    assert main(["--models", *paths, "--output", output, "--cascade-margin", "0.3"]) == 0
    assert load_checkpoint(output).build().cascade_margin == 0.3


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
