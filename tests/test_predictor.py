import numpy as np
import torch

from emotion.predictor import Predictor, pick_device
from emotion.preprocess import decode_image, normalize
from tests.conftest import tiny_checkpoint
from tests.images import jpeg


def test_device_defaults_to_cpu_without_cuda_and_is_overridable():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_probabilities_match_a_hand_computed_forward(tiny_checkpoint_path):
    predictor = Predictor(tiny_checkpoint_path, device="cpu", precision="fp32")
    pixels = np.stack([decode_image(jpeg(seed=s), 48, 1).pixels for s in range(5)])
    probs = predictor.predict_pixels(pixels)
    assert probs.shape == (5, 7) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)

    model = tiny_checkpoint().build()
    x = torch.from_numpy(normalize(pixels, (0.5,), (0.25,)))
    with torch.inference_mode():
        expected = torch.softmax((model(x) + model(torch.flip(x, dims=[3]))) / 2, dim=1).numpy()
    assert np.allclose(probs, expected, atol=1e-5)


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
