import dataclasses

import numpy as np
import pytest
import torch

from emotion import precision, predictor
from emotion.checkpoint import save_checkpoint
from emotion.predictor import CPU_MICRO_BATCH, Predictor, pick_device, prediction_columns
from emotion.preprocess import normalize
from tests.conftest import tiny_checkpoint
from tests.images import jpeg


def test_device_defaults_to_cpu_without_cuda_and_is_overridable():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def _trained_like_checkpoint(tmp_path):
    """The tiny model with batch-norm statistics a trained model would have, so folding has work."""
    checkpoint = tiny_checkpoint()
    trained = checkpoint.build()
    torch.manual_seed(0)
    for module in trained.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.3)
    checkpoint = dataclasses.replace(checkpoint, state_dict=trained.state_dict())
    save_checkpoint(checkpoint, tmp_path / "bn.pt")
    return checkpoint, tmp_path / "bn.pt"


def _varied_pixels() -> np.ndarray:
    """Noise from near-black to bright, so the images land on visibly different outputs."""
    rng = np.random.default_rng(0)
    levels = np.linspace(0.05, 1, 2 * CPU_MICRO_BATCH + 3)[:, None, None, None]
    return (rng.integers(0, 256, (len(levels), 48, 48, 1)) * levels).astype(np.uint8)


def _plain_and_mirrored_logits(checkpoint, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trained module itself computes for the images and for their mirrors."""
    model = checkpoint.build().eval()
    x = torch.from_numpy(normalize(pixels, (0.5,), (0.25,)))
    with torch.inference_mode():
        return model(x), model(torch.flip(x, dims=[3]))


def test_probabilities_match_a_hand_computed_forward(tmp_path):
    """The Predictor folds batch norms, slices batches and mirrors only unsure images; none of that
    may change what the plain trained module computes for each image."""
    checkpoint, path = _trained_like_checkpoint(tmp_path)
    pixels = _varied_pixels()
    plain, mirrored = _plain_and_mirrored_logits(checkpoint, pixels)
    top2 = torch.softmax(plain, dim=1).topk(2, dim=1).values
    margins = np.sort((top2[:, 0] - top2[:, 1]).numpy())
    cut = float(margins[len(margins) // 2 : len(margins) // 2 + 2].mean())
    unsure = (top2[:, 0] - top2[:, 1] < cut)[:, None]
    expected = torch.softmax(torch.where(unsure, (plain + mirrored) / 2, plain), dim=1).numpy()

    predictor = Predictor(path, device="cpu", precision="fp32", flip_margin=cut)
    probs = predictor.predict_pixels(pixels)
    assert probs.shape == (len(pixels), 7) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert 0 < int(unsure.sum()) < len(pixels), "the cut must mirror some images and not others"
    assert np.abs(expected - expected.mean(axis=0)).max() > 1e-3, "inputs too alike to tell apart"
    assert np.allclose(probs, expected, atol=1e-6)
    # Alone or in a batch, an image gets the same answer.
    assert np.allclose(predictor.predict_pixels(pixels[3:4]), probs[3:4], atol=1e-6)


def test_flip_margin_bounds_mirror_nothing_or_everything(tmp_path):
    checkpoint, path = _trained_like_checkpoint(tmp_path)
    pixels = _varied_pixels()
    plain, mirrored = _plain_and_mirrored_logits(checkpoint, pixels)
    never = Predictor(path, device="cpu", precision="fp32", flip_margin=0).predict_pixels(pixels)
    always = Predictor(path, device="cpu", precision="fp32", flip_margin=1).predict_pixels(pixels)
    assert np.allclose(never, torch.softmax(plain, dim=1).numpy(), atol=1e-6)
    assert np.allclose(always, torch.softmax((plain + mirrored) / 2, dim=1).numpy(), atol=1e-6)
    unflipped = dataclasses.replace(checkpoint, test_time_flip=False)
    assert np.allclose(Predictor(unflipped, device="cpu", precision="fp32", flip_margin=1)
                       .predict_pixels(pixels), never, atol=1e-6)


def test_bytes_in_results_out_with_errors_in_place(tiny_checkpoint_path):
    predictor = Predictor(tiny_checkpoint_path, device="cpu")
    results = predictor.predict_bytes([jpeg(seed=1), b"not an image", jpeg(seed=2)])
    assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert results[1]["error"] == "not an image"
    ok = results[0]
    assert set(ok["probabilities"]) == set(predictor.labels)
    assert ok["predicted_label"] == max(ok["probabilities"], key=ok["probabilities"].get)
    assert ok["predicted_class"] == predictor.labels.index(ok["predicted_label"])
    assert (ok["width"], ok["height"]) == (48, 48)


def test_empty_batch(tiny_checkpoint_path):
    predictor = Predictor(tiny_checkpoint_path, device="cpu")
    assert predictor.predict_pixels(np.zeros((0, 48, 48, 1), np.uint8)).shape == (0, 7)
    assert predictor.predict_bytes([]) == []


def test_prediction_columns_are_the_one_record_of_a_row():
    probs = np.array([[0.1, 0.6, 0.3], [np.nan, np.nan, np.nan], [0.5, 0.2, 0.3]], dtype=np.float32)
    columns = prediction_columns(probs, ("a", "b", "c"))
    assert columns["predicted_class"].tolist() == [1, -1, 0]
    assert columns["predicted_label"].tolist() == ["b", None, "a"]
    assert columns["confidence"][[0, 2]].tolist() == pytest.approx([0.6, 0.5]) and np.isnan(columns["confidence"][1])
    assert columns["prob_c"][[0, 2]].tolist() == pytest.approx([0.3, 0.3])
    assert all(len(v) == 0 for v in prediction_columns(np.zeros((0, 3), np.float32), ("a", "b", "c")).values())


@pytest.mark.parametrize(("bf16_speedup", "chosen"), [(2.0, "bf16"), (1.1, "fp32"), (0.7, "fp32")])
def test_auto_keeps_bf16_only_where_a_timed_batch_shows_it_clearly_faster(monkeypatch, bf16_speedup, chosen):
    monkeypatch.setattr(predictor, "_seconds_per_batch",
                        lambda model, batch: 1.0 / (bf16_speedup if batch.dtype == torch.bfloat16 else 1.0))
    monkeypatch.setattr(precision, "fast_bf16", lambda device: True)
    auto = Predictor(tiny_checkpoint(), device="cpu", precision="auto")
    assert (auto.precision, auto.dtype) == (chosen, predictor.DTYPES[chosen])
    assert next(auto.model.parameters()).dtype == auto.dtype
    faces = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
    forced = Predictor(tiny_checkpoint(), device="cpu", precision=chosen)
    assert np.allclose(auto.predict_pixels(faces), forced.predict_pixels(faces))
    bf16 = Predictor(tiny_checkpoint(), device="cpu", precision="bf16")
    assert bf16.precision == "bf16", "a forced precision is not timed"


def test_auto_without_bf16_instructions_is_float32_untimed(monkeypatch):
    monkeypatch.setattr(predictor, "_seconds_per_batch", lambda model, batch: pytest.fail("timed"))
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    assert Predictor(tiny_checkpoint(), device="cpu", precision="auto").precision == "fp32"
