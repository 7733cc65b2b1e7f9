"""A checkpoint as an ONNX graph, and that graph run by ONNX Runtime.

The graph holds the network alone (pixels normalised as the checkpoint says, in; logits out), with
a dynamic batch axis. Everything around it stays where it is for the PyTorch path: decoding and
normalisation before it, test-time mirroring and the temperature after it (`emotion.predictor`),
so both backends give the same probabilities by construction, and a reader in another language
finds in the graph's metadata what it needs to do the same (labels, input size, channels,
mean/std, temperature, whether to mirror, precision).

A graph can also be quantized (`quantized_bytes`): int8 weights (7 bits used) and uint8
activations whose ranges are calibrated on faces, for CPUs where float32 arithmetic is the
bottleneck. The metadata says which (`precision`: "fp32" or "int8").

onnx and onnxscript, which export and quantize, are an optional extra (`pip install
emotion-ray[onnx]`); onnxruntime, which runs graphs, is a dependency, since checkpoints may carry
an int8 graph. All three are imported only here, when a graph is exported or run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emotion.checkpoint import Checkpoint

# The lowest opset whose operators the exporter emits for every architecture we build; ONNX
# Runtime supports it everywhere.
OPSET = 18
INPUT, OUTPUT = "pixels", "logits"


def metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """The facts a consumer needs around the graph, as ONNX metadata props (string values; lists
    and numbers as JSON)."""
    facts = {
        "labels": list(checkpoint.labels),
        "input_size": checkpoint.input_size,
        "channels": checkpoint.channels,
        "mean": list(checkpoint.mean),
        "std": list(checkpoint.std),
        "temperature": checkpoint.temperature,
        "test_time_flip": checkpoint.test_time_flip,
        "arch": checkpoint.arch,
        "arch_kwargs": checkpoint.arch_kwargs,
        "name": checkpoint.name,
        "precision": "fp32",
    }
    return {key: json.dumps(value) for key, value in facts.items()}


def export_bytes(checkpoint: Checkpoint, opset: int = OPSET) -> bytes:
    """The checkpoint's network as a serialised ONNX model (float32, dynamic batch axis), its
    metadata props filled from the checkpoint."""
    import onnx

    model = checkpoint.build().float().eval()
    example = torch.zeros(2, checkpoint.channels, checkpoint.input_size, checkpoint.input_size)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        program.save(str(path))
        graph = onnx.load(str(path))
    for key, value in metadata(checkpoint).items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def max_difference(checkpoint: Checkpoint, graph: bytes, batch: int = 64, seed: int = 0) -> float:
    """The largest absolute difference between the logits of the PyTorch network (float32) and
    of `graph` under ONNX Runtime, on a batch of random normalised inputs."""
    size, channels = checkpoint.input_size, checkpoint.channels
    x = np.random.default_rng(seed).normal(0, 1, (batch, channels, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = checkpoint.build().float().eval()(torch.from_numpy(x)).numpy()
    got = OnnxNetwork(graph)(torch.from_numpy(x)).numpy()
    return float(np.abs(expected - got).max())


def quantized_bytes(graph: bytes, faces: np.ndarray) -> bytes:
    """`graph` (from `export_bytes`) with int8 weights and activations in ONNX's QDQ form, the
    activations' ranges calibrated on `faces`: normalised float32 N x C x H x W, as the graph takes
    them, framed as the faces it will be given. Its metadata props are the source graph's, with
    `precision` "int8".

    Weights keep 7 bits (`reduce_range`): on CPUs without VNNI instructions ONNX Runtime's int8
    kernels sum pairs of products in 16 bits, which full 8-bit weights can overflow, changing
    answers; 7-bit weights cannot (docs/benchmarks.md, "int8", measures both).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT: faces[i : i + 64]} for i in range(0, len(faces), 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / name for name in ("model.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(graph)
        quant_pre_process(str(source), str(prepared))
        quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantized = onnx.load(str(target))
    props = {prop.key: prop.value for prop in onnx.load_from_string(graph).metadata_props}
    props["precision"] = json.dumps("int8")
    del quantized.metadata_props[:]
    for key, value in props.items():
        quantized.metadata_props.add(key=key, value=value)
    return quantized.SerializeToString()


def agreement(reference: bytes, graph: bytes, faces: np.ndarray) -> float:
    """The share of `faces` (normalised, as the graphs take them) given the same top class by
    `graph` as by `reference` under ONNX Runtime, in slices so that memory stays flat."""
    first, second = OnnxNetwork(reference), OnnxNetwork(graph)
    same = 0
    for start in range(0, len(faces), 256):
        batch = torch.from_numpy(faces[start : start + 256])
        same += int((first(batch).argmax(1) == second(batch).argmax(1)).sum())
    return same / max(len(faces), 1)


def read_metadata(graph: bytes) -> dict[str, Any]:
    """The metadata props of a serialised ONNX model, decoded from JSON."""
    import onnx

    return {prop.key: json.loads(prop.value) for prop in onnx.load_from_string(graph).metadata_props}


class OnnxNetwork:
    """A serialised ONNX graph behind the same call as a PyTorch network: a float32 N x C x H x W
    tensor in, float32 logits out on the CPU. `threads` bounds ONNX Runtime's intra-op pool, as
    torch's thread count does for the PyTorch backend (None: ONNX Runtime's default)."""

    def __init__(self, graph: bytes, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT], {INPUT: pixels})
        return torch.from_numpy(logits)
