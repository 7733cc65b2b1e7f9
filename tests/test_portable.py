"""ONNX export and the onnxruntime backend: the graph carries the checkpoint's facts, any batch
size runs, and the probabilities match PyTorch's float32 path, mirroring and temperature included.
An int8 export is quantized, keeps the facts and mostly the answers, and refuses bad flags."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from emotion.checkpoint import load_checkpoint, new_checkpoint, save_checkpoint
from emotion.labels import LABELS
from emotion.models import build_model
from emotion.portable import OnnxNetwork, agreement, export_bytes, max_difference, quantized_bytes, read_metadata
from emotion.predictor import Predictor
from jobs import export
from jobs.export import calibration_faces
from tests.conftest import tiny_checkpoint
from tests.services import ROOT, command_refusal, run_job


def faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def default_graph() -> bytes:
    return export_bytes(load_checkpoint())


def test_the_graph_carries_what_a_consumer_needs_around_it(default_graph):
    checkpoint = load_checkpoint()
    facts = read_metadata(default_graph)
    assert facts["labels"] == list(LABELS) and facts["input_size"] == 48 and facts["channels"] == 1
    assert facts["mean"] == list(checkpoint.mean) and facts["std"] == list(checkpoint.std)
    assert facts["temperature"] == checkpoint.temperature != 1.0
    assert facts["test_time_flip"] is True and facts["arch"] == "emotion_cnn"


@pytest.mark.parametrize("batch", [1, 37])
def test_the_batch_axis_is_dynamic(default_graph, batch):
    network = OnnxNetwork(default_graph)
    assert network(torch.zeros(batch, 1, 48, 48)).shape == (batch, len(LABELS))


def test_default_model_logits_match_pytorch(default_graph):
    assert max_difference(load_checkpoint(), default_graph) < 1e-4


def test_a_torchvision_architecture_exports_and_matches():
    torch.manual_seed(0)
    model = build_model("resnet18", len(LABELS), 1).eval()
    checkpoint = new_checkpoint(model, arch="resnet18", arch_kwargs={}, labels=LABELS, input_size=48, channels=1,
                                mean=(0.5,), std=(0.25,), name="resnet")
    assert max_difference(checkpoint, export_bytes(checkpoint), batch=8) < 1e-3


def test_onnxruntime_backend_gives_the_torch_probabilities_with_mirroring_and_temperature():
    torch_fp32 = Predictor(precision="fp32")
    onnx = Predictor(backend="onnxruntime", precision="fp32")
    assert onnx.checkpoint.test_time_flip and onnx.checkpoint.temperature != 1.0
    pixels = faces(70)
    assert np.abs(onnx.predict_pixels(pixels) - torch_fp32.predict_pixels(pixels)).max() < 1e-4
    assert onnx.predict_bytes([b"not an image"])[0]["error"] == "not an image"


def test_backend_choices_are_checked():
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime"):
        Predictor(tiny_checkpoint(), backend="tensorrt")
    with pytest.raises(ValueError, match="float32 or int8 on the CPU"):
        Predictor(tiny_checkpoint(), backend="onnxruntime", precision="bf16")


def test_export_command_checks_parity_writes_and_never_replaces_silently(tmp_path, refuse):
    model = tmp_path / "tiny.pt"
    save_checkpoint(dataclasses.replace(tiny_checkpoint(), temperature=1.7), model)
    out = tmp_path / "tiny.onnx"
    args = ["--model", str(model), "--output", str(out)]
    done = run_job("export", *args)
    assert done.returncode == 0, done.stderr
    assert "max |logit difference| against PyTorch float32" in done.stdout
    assert read_metadata(out.read_bytes())["temperature"] == 1.7
    assert command_refusal("export", *args) == f"error: --output {out} exists: pass --overwrite to replace it"
    assert export.main([*args, "--overwrite"]) == 0, "in this process"
    assert refuse(export.main, "--model", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x.onnx")).startswith(
        "error:")


def test_int8_export_quantizes_the_graph_and_keeps_its_facts_and_answers(tmp_path, default_graph):
    out = tmp_path / "int8.onnx"
    done = run_job("export", "--output", str(out), "--int8", "--calibration", str(ROOT / "examples" / "faces"))
    assert done.returncode == 0, done.stderr
    assert "int8, calibrated on 28 faces" in done.stdout
    graph = out.read_bytes()
    facts = read_metadata(graph)
    assert facts["precision"] == "int8" and read_metadata(default_graph)["precision"] == "fp32"
    assert facts["labels"] == list(LABELS) and facts["temperature"] == load_checkpoint().temperature
    operators = {node.op_type for node in onnx.load_from_string(graph).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    assert len(graph) < len(default_graph) / 3
    # Mirrored, the faces are ones the calibration never saw.
    faces = calibration_faces(load_checkpoint(), str(ROOT / "examples" / "faces"), 512)
    assert agreement(default_graph, graph, faces[:, :, :, ::-1].copy()) >= 0.85


def test_calibration_draws_on_the_whole_folder(tmp_path):
    from PIL import Image

    for shade in (10, 100, 200):
        (tmp_path / str(shade)).mkdir()
        for i in range(4):
            Image.new("L", (48, 48), shade).save(tmp_path / str(shade) / f"{i}.png")
    checkpoint = tiny_checkpoint()
    faces = calibration_faces(checkpoint, str(tmp_path), 8)
    shades = {round(float(face.mean()) * checkpoint.std[0] * 255 + checkpoint.mean[0] * 255) for face in faces}
    assert len(faces) == 8 and shades == {10, 100, 200}


def test_int8_flags_and_calibration_folders_are_refused_in_one_line(tmp_path, refuse):
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "a.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    base = ["--output", str(tmp_path / "x.onnx")]
    for flags, message in [
        (["--int8"], "--int8 needs --calibration"),
        (["--calibration", str(tmp_path / "faces")], "--calibration is for --int8 only"),
        (["--int8", "--calibration", str(tmp_path / "faces"), "--calibration-images", "0"], "at least 1"),
        (["--int8", "--calibration", str(tmp_path / "faces")], "none of the 1 images read decodes"),
        (["--int8", "--calibration", str(tmp_path / "empty")], "no image files under it"),
        (["--int8", "--calibration", str(tmp_path / "nowhere")], "nowhere: not found"),
    ]:
        assert message in refuse(export.main, *base, *flags), flags
    assert not (tmp_path / "x.onnx").exists()


def always(label: int):
    """The tiny checkpoint, made to name one class for every face."""
    checkpoint = tiny_checkpoint()
    state = dict(checkpoint.state_dict)
    bias = next(key for key in reversed(state) if key.endswith("bias") and state[key].shape == (len(LABELS),))
    state[bias] = torch.full((len(LABELS),), -100.0).index_fill(0, torch.tensor([label]), 100.0)
    return dataclasses.replace(checkpoint, state_dict=state)


def test_an_int8_graph_that_changes_the_answers_is_not_written(tmp_path, monkeypatch, refuse):
    model = tmp_path / "happy.pt"
    save_checkpoint(always(LABELS.index("happy")), model)
    monkeypatch.setattr(export, "quantized_bytes", lambda graph, faces: export_bytes(always(LABELS.index("sad"))))
    out = tmp_path / "x.onnx"
    line = refuse(export.main, "--model", str(model), "--output", str(out), "--int8",
                  "--calibration", str(ROOT / "examples" / "faces"), code=1)
    assert "keeps float32's top class for 0.0% of the 28 calibration faces" in line
    assert not out.exists()


def test_int8_quantization_calibrates_and_compares_over_several_batches():
    # 150 faces are three calibration batches and 300 two agreement slices: state carried between
    # batches (ranges, counts) is exercised, not only a single batch's.
    checkpoint = tiny_checkpoint()
    graph = export_bytes(checkpoint)
    faces = np.random.default_rng(2).normal(0, 1, (300, 1, 48, 48)).astype(np.float32)
    quantized = quantized_bytes(graph, faces[:150])
    assert read_metadata(quantized)["precision"] == "int8"
    assert 0.8 <= agreement(graph, quantized, faces) <= 1.0
    assert agreement(graph, export_bytes(always(0)), faces) < 0.5
