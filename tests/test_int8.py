"""int8 inside a checkpoint: `python -m jobs.quantize` stores the network quantized to int8, a
checkpoint refuses a graph made from other weights, and the Predictor runs it with precision int8,
or with auto where a timed batch shows it clearly faster, in batches of any size."""

import dataclasses

import numpy as np
import pytest
import torch

from emotion import predictor
from emotion.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint, weights_digest
from emotion.portable import OnnxNetwork, read_metadata
from emotion.predictor import Predictor
from jobs import quantize
from tests.conftest import tiny_checkpoint, with_int8_graph
from tests.services import ROOT, command_refusal, run_job

FACES = ROOT / "examples" / "faces"


def faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_int8():
    return with_int8_graph(tiny_checkpoint())


def test_quantize_writes_a_checkpoint_carrying_its_int8_graph(tmp_path):
    out = tmp_path / "int8.pt"
    args = ["--calibration", str(FACES), "--output", str(out)]
    done = run_job("quantize", *args)
    assert done.returncode == 0, done.stderr
    assert "int8, calibrated on 28 faces; float32's top class kept for" in done.stdout
    source, written = load_checkpoint(), load_checkpoint(out)
    assert read_metadata(written.int8_graph)["precision"] == "int8"
    assert written.int8_weights == weights_digest(source.state_dict)
    assert written.describe()["int8_graph_bytes"] == len(written.int8_graph) > 0
    assert written.temperature == source.temperature and written.labels == source.labels
    assert all(torch.equal(written.state_dict[k], v) for k, v in source.state_dict.items())
    assert command_refusal("quantize", *args) == f"error: --output {out} exists: pass --overwrite to replace it"


def test_quantize_refuses_bad_flags_in_one_line_and_never_overwrites_its_model(tmp_path, tiny_checkpoint_path,
                                                                              refuse):
    (tmp_path / "empty").mkdir()
    embedded = DEFAULT_CHECKPOINT.read_bytes()
    base = ["--model", str(tiny_checkpoint_path)]
    for flags, message in [
        (["--calibration", str(FACES), "--output", str(tiny_checkpoint_path)], "--output must differ from --model"),
        (["--model", "", "--calibration", str(FACES), "--output", str(DEFAULT_CHECKPOINT), "--overwrite"],
         "--output must differ from --model"),
        (["--calibration", str(tmp_path / "empty"), "--output", str(tmp_path / "x.pt")], "no image files under it"),
        (["--calibration", str(FACES), "--output", str(tmp_path / "x.pt"), "--calibration-images", "0"],
         "at least 1"),
        (["--model", str(tmp_path / "nope.pt"), "--calibration", str(FACES), "--output", str(tmp_path / "x.pt")],
         "no such checkpoint file"),
    ]:
        assert message in refuse(quantize.main, *base, *flags), flags
    assert not (tmp_path / "x.pt").exists()
    assert DEFAULT_CHECKPOINT.read_bytes() == embedded


def test_a_graph_made_from_other_weights_is_refused_on_load(tmp_path, tiny_int8):
    path = tmp_path / "stale.pt"
    save_checkpoint(dataclasses.replace(tiny_int8, state_dict=tiny_checkpoint(seed=1).state_dict), path)
    with pytest.raises(CheckpointError, match="int8 graph was quantized from other weights"):
        load_checkpoint(path)
    save_checkpoint(dataclasses.replace(tiny_int8, temperature=2.0), path)
    assert load_checkpoint(path).int8_graph == tiny_int8.int8_graph, "a new temperature keeps the graph valid"
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"int8_graph": torch.zeros(2, 3)}, path)
    with pytest.raises(CheckpointError, match="its int8_graph is not a flat uint8 tensor"):
        load_checkpoint(path)


def test_int8_runs_the_graph_with_mirroring_and_temperature(tiny_int8):
    checkpoint = dataclasses.replace(tiny_int8, temperature=1.7)
    int8 = Predictor(checkpoint, precision="int8", flip_margin=1.0)
    assert (int8.precision, int8.device.type, int8.dtype) == ("int8", "cpu", torch.float32)
    pixels = faces(40)
    normalised = torch.from_numpy((pixels.transpose(0, 3, 1, 2) / 255 - 0.5) / 0.25).float()
    graph = OnnxNetwork(checkpoint.int8_graph)
    logits = (graph(normalised) + graph(normalised.flip(-1))) / 2
    expected = torch.softmax(logits / 1.7, dim=1).numpy()
    assert np.abs(int8.predict_pixels(pixels) - expected).max() < 1e-5
    fp32 = Predictor(checkpoint, device="cpu", precision="fp32", flip_margin=1.0).predict_pixels(pixels)
    assert 0 < np.abs(int8.predict_pixels(pixels) - fp32).max() < 0.2, "int8 arithmetic, close to float32's"


def test_int8_gives_the_same_answers_in_one_batch_or_many(tiny_int8):
    int8 = Predictor(tiny_int8, precision="int8")
    pixels = faces(300, seed=3)
    whole = int8.predict_pixels(pixels)
    pieces = np.concatenate([int8.predict_pixels(pixels[i : i + 7]) for i in range(0, 300, 7)])
    assert whole.shape == (300, 7) and np.allclose(whole, pieces, atol=1e-5)


def test_int8_is_refused_without_a_graph_or_off_the_cpu(tiny_int8):
    with pytest.raises(ValueError, match="carries no int8 graph"):
        Predictor(tiny_checkpoint(), precision="int8")
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        Predictor(tiny_int8, device="cuda", precision="int8")
    assert Predictor(tiny_int8, backend="onnxruntime", precision="int8").precision == "int8"


@pytest.mark.parametrize(("int8_speedup", "backend", "chosen"), [
    (2.0, "torch", "int8"), (1.1, "torch", "fp32"), (0.5, "torch", "fp32"),
    (2.0, "onnxruntime", "int8"), (1.1, "onnxruntime", "fp32"),
])
def test_auto_takes_int8_only_where_a_timed_batch_shows_it_clearly_faster(monkeypatch, tiny_int8, int8_speedup,
                                                                         backend, chosen):
    monkeypatch.setattr(predictor, "_seconds_per_batch",
                        lambda model, batch: 1.0 / (int8_speedup if model.__dict__.get("int8") else 1.0))
    original = OnnxNetwork.__init__

    def marked(self, graph, threads=None):
        original(self, graph, threads)
        self.int8 = graph == tiny_int8.int8_graph

    monkeypatch.setattr(OnnxNetwork, "__init__", marked)
    monkeypatch.setattr(predictor, "resolve_precision", lambda precision, device: "fp32")
    auto = Predictor(tiny_int8, device="cpu", precision="auto", backend=backend)
    assert auto.precision == chosen
    pixels = faces(5)
    forced = Predictor(tiny_int8, device="cpu", precision=chosen, backend=backend)
    assert np.allclose(auto.predict_pixels(pixels), forced.predict_pixels(pixels), atol=1e-6)


def test_auto_without_an_int8_graph_never_times_one(monkeypatch):
    monkeypatch.setattr(OnnxNetwork, "__init__", lambda *args: pytest.fail("an ONNX Runtime session was made"))
    monkeypatch.setattr(predictor, "resolve_precision", lambda precision, device: "fp32")
    assert Predictor(tiny_checkpoint(), device="cpu", precision="auto").precision == "fp32"
