"""Mixup and CutMix: what a mixed batch holds, the loss it is trained with, and the flag."""

import json
from dataclasses import asdict, fields

import pytest
import torch
import torch.nn.functional as F

from emotion.training.config import TrainConfig, recipe_changes
from emotion.training.mixing import Mixing, mix_batch, mixed_cross_entropy
from jobs.train import parse_args


def batch(n: int = 32) -> torch.Tensor:
    """Faces each of one value of its own, so that every pixel tells which face it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 48, 48).clone()


def test_mixup_blends_each_face_with_its_partner_by_lam():
    x = batch()
    out, partner, lam = mix_batch(x, torch.Generator().manual_seed(0), Mixing(1.0, 0.4, 0.0))
    assert sorted(partner.tolist()) == list(range(32)) and 0 < lam < 1
    assert torch.allclose(out, lam * x + (1 - lam) * x[partner])


def test_cutmix_pastes_one_rectangle_of_the_partner_whose_area_sets_lam():
    x = batch()
    for seed in range(20):
        out, partner, lam = mix_batch(x, torch.Generator().manual_seed(seed), Mixing(1.0, 0.0, 1.0))
        own, pasted = out == x, out == x[partner]
        moved = partner != torch.arange(32)
        assert (own | pasted).all()
        pasted_share = pasted[moved].float().mean().item()
        assert pasted_share == pytest.approx(1 - lam)
        # The same rectangle in every face, and a rectangle: its rows and columns span it.
        box = pasted[moved][0, 0] & ~own[moved][0, 0]
        assert (pasted[moved][:, 0] & ~own[moved][:, 0] == box).all()
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):
            assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_a_share_of_batches_is_mixed_half_by_each_method_and_the_rest_pass_untouched():
    x, generator = batch(8), torch.Generator().manual_seed(1)
    results = [mix_batch(x, generator, Mixing(0.3, 0.2, 1.0)) for _ in range(1000)]
    untouched = [out for out, _, lam in results if lam == 1.0]
    assert 0.65 < len(untouched) / 1000 < 0.75
    assert all(out is x for out in untouched)
    mixed = [out for out, _, lam in results if lam != 1.0]
    # CutMix only moves pixels, so every value is still a face's own whole number; mixup blends.
    cut = sum(bool((out == out.round()).all()) for out in mixed)
    assert 0.4 < cut / len(mixed) < 0.6


@pytest.mark.parametrize("mixing", [Mixing(1.0, 0.2, 0.0), Mixing(1.0, 0.0, 1.0)], ids=["mixup", "cutmix"])
def test_the_generator_alone_decides_the_mix(mixing):
    x = batch()
    a, b, other = (mix_batch(x, torch.Generator().manual_seed(seed), mixing) for seed in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], other[0]) and a[2] != other[2]


def test_the_loss_is_the_blend_of_both_labels_losses():
    logits, targets = torch.randn(16, 7), torch.randint(0, 7, (16,))
    partner = torch.randperm(16)
    got = mixed_cross_entropy(logits, targets, partner, 0.3, label_smoothing=0.1)
    expected = (0.3 * F.cross_entropy(logits, targets, label_smoothing=0.1)
                + 0.7 * F.cross_entropy(logits, targets[partner], label_smoothing=0.1))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(mixed_cross_entropy(logits, targets, None, 1.0), F.cross_entropy(logits, targets))


@pytest.mark.parametrize(("setting", "reason"), [
    ({"fraction": 0.5, "mixup_alpha": 0.2}, "expected a JSON object with the keys fraction, mixup_alpha, "
                                             "cutmix_alpha, not {'fraction': 0.5, 'mixup_alpha': 0.2}"),
    ({"fraction": 0, "mixup_alpha": 0.2, "cutmix_alpha": 0}, "fraction must be a number in (0, 1], not 0"),
    ({"fraction": 1, "mixup_alpha": -1, "cutmix_alpha": 0}, "mixup_alpha must be a number >= 0, not -1"),
    ({"fraction": 1, "mixup_alpha": 0, "cutmix_alpha": True}, "cutmix_alpha must be a number >= 0, not True"),
    ({"fraction": 1, "mixup_alpha": 0, "cutmix_alpha": 0},
     "mixup_alpha and cutmix_alpha are both 0: nothing would be mixed"),
])
def test_a_bad_mixing_flag_is_one_line_before_any_work(tmp_path, capsys, setting, reason):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--train", str(tmp_path), "--output", str(tmp_path / "m.pt"), "--mixing", json.dumps(setting)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m jobs.train: error: --mixing: {reason}"


def test_the_recipe_records_the_mixing_and_runs_recorded_before_it_resume_unmixed(tmp_path):
    def recipe(*flags: str) -> TrainConfig:
        args = parse_args(["--train", str(tmp_path), "--output", str(tmp_path / "m.pt"), *flags])
        return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})

    mixed = recipe("--mixing", '{"fraction": 1, "mixup_alpha": 0.2, "cutmix_alpha": 0}')
    assert mixed.mixing == {"fraction": 1.0, "mixup_alpha": 0.2, "cutmix_alpha": 0.0}
    earlier = {k: v for k, v in asdict(recipe()).items() if k != "mixing"}
    assert recipe_changes(earlier, recipe()) == []
    assert recipe_changes(earlier, mixed) == ["mixing"]
