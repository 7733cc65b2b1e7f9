"""One self-describing file per model: weights plus everything needed to use them correctly.

The batch job, the evaluator and the Serve replicas all load through `load_checkpoint` (or
`load_checkpoint_file`, which also hashes what it read), so they cannot disagree about
preprocessing or class order. Files are read with `weights_only=True`:
a checkpoint is data and must never be able to run code.
"""

import dataclasses
import hashlib
import io
import pickle
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from torch import nn

from emotion.models import build_model

FORMAT = "emotion-ray/checkpoint"
FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "emotion_cnn_fer2013.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit its architecture."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model's weights and the facts every consumer needs to preprocess for it and read it."""

    arch: str
    arch_kwargs: dict[str, Any]
    labels: tuple[str, ...]
    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    state_dict: dict[str, torch.Tensor]
    name: str = ""
    trained_on: str = ""
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    test_time_flip: bool = True
    # Logits are divided by this before the softmax (emotion.calibration); 1.0: as trained.
    temperature: float = 1.0
    num_params: int = 0
    created: str = ""
    # The network quantized to int8 as a serialised ONNX graph (emotion.portable), or empty; and
    # `weights_digest` of the weights it was quantized from, so that a graph left beside weights
    # that changed since is refused rather than run.
    int8_graph: bytes = b""
    int8_weights: str = ""

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode."""
        model = build_model(self.arch, len(self.labels), self.channels, **self.arch_kwargs)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def with_int8_graph(self, graph: bytes) -> "Checkpoint":
        """This checkpoint carrying `graph` (its network quantized to int8), tied to these weights by
        their digest: the one way to attach a graph, so no caller can forget the digest."""
        return dataclasses.replace(self, int8_graph=graph, int8_weights=weights_digest(self.state_dict))

    def describe(self) -> dict[str, Any]:
        """Everything but the weights, as plain JSON-able values (for /models and manifests)."""
        info = dataclasses.asdict(self)
        del info["state_dict"]
        info["int8_graph_bytes"] = len(info.pop("int8_graph"))
        info["labels"] = list(self.labels)
        info["mean"], info["std"] = list(self.mean), list(self.std)
        return info


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A sha256 of the weights' names, dtypes, shapes and values: equal digests, equal networks."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def new_checkpoint(model: nn.Module, **fields: Any) -> Checkpoint:
    """A Checkpoint for `model` with its parameter count and creation time filled in."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fields.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    fields.setdefault("num_params", sum(p.numel() for p in model.parameters()))
    return Checkpoint(state_dict=state, **fields)


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write `checkpoint` to a local path or an fsspec URI (s3://...)."""
    payload = dataclasses.asdict(checkpoint)
    payload["labels"] = list(checkpoint.labels)
    payload["mean"], payload["std"] = list(checkpoint.mean), list(checkpoint.std)
    payload["format"], payload["format_version"] = FORMAT, FORMAT_VERSION
    # As a tensor: pickled bytes are a call to a constructor, which weights_only loading refuses.
    payload["int8_graph"] = torch.from_numpy(np.frombuffer(checkpoint.int8_graph, dtype=np.uint8).copy())
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with fsspec.open(str(path), "wb") as f:
        f.write(buffer.getvalue())


def _read(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except (OSError, PermissionError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, or its type when it has none (KeyError: 105)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Read and validate a checkpoint; `None` means the embedded default model.

    Every failure is a CheckpointError naming the file and what is wrong with it, raised before
    any work is scheduled, so a typo in `--model` costs seconds rather than a cluster job.
    """
    where = str(DEFAULT_CHECKPOINT if path is None else path)
    return _parse(_read(where), where)


class CheckpointFile(NamedTuple):
    """A checkpoint with the sha256 and size of the very bytes it was loaded from."""

    checkpoint: Checkpoint
    sha256: str
    size: int


def load_checkpoint_file(path: str | Path | None = None) -> CheckpointFile:
    """`load_checkpoint`, for callers that record which file they used.

    Hashing the file in a second read could name a file replaced between the two reads, and a
    record of which weights a run used must name the ones it used.
    """
    where = str(DEFAULT_CHECKPOINT if path is None else path)
    data = _read(where)
    return CheckpointFile(_parse(data, where), hashlib.sha256(data).hexdigest(), len(data))


def _graph_bytes(stored: Any, where: str) -> bytes:
    if stored is None:
        return b""
    if not isinstance(stored, torch.Tensor) or stored.dtype != torch.uint8 or stored.dim() != 1:
        raise CheckpointError(f"{where}: its int8_graph is not a flat uint8 tensor")
    return stored.numpy().tobytes()


def _parse(data: bytes, where: str) -> Checkpoint:
    try:
        with warnings.catch_warnings():
            # Garbage whose second byte reads as a pickle protocol number makes torch warn about
            # that protocol before it fails; the refusal below is the one line a user should see.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what it refused: a global or a call is an object that could run code; an
        # unknown opcode ("Unsupported operand") is only bytes that are not a pickle at all.
        if "Weights only load failed" in str(exc) and "Unsupported operand" not in str(exc):
            raise CheckpointError(
                f"{where}: refused: the file holds Python objects other than tensors and plain "
                "values, and loading it could run code"
            ) from None
        raise CheckpointError(f"{where}: not a readable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:
        # Bytes that are not a checkpoint send torch's unpickler down arbitrary paths: besides
        # truncation (EOFError, RuntimeError) they raise KeyError, IndexError, ValueError,
        # zipfile errors and more, and every one of them means the same thing to the user.
        raise CheckpointError(
            f"{where}: not a readable checkpoint (truncated or corrupt: {_first_line(exc)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an emotion-ray checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {payload.get('format_version')} is not supported "
            f"(this release reads version {FORMAT_VERSION})"
        )
    names = {f.name for f in dataclasses.fields(Checkpoint)}
    try:
        checkpoint = Checkpoint(
            **{k: v for k, v in payload.items() if k in names}
            | {
                "labels": tuple(payload["labels"]),
                "mean": tuple(payload["mean"]),
                "std": tuple(payload["std"]),
                "int8_graph": _graph_bytes(payload.get("int8_graph"), where),
            }
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: checkpoint is missing a field ({exc})") from None
    if len(checkpoint.mean) != checkpoint.channels or len(checkpoint.std) != checkpoint.channels:
        raise CheckpointError(f"{where}: mean/std do not match {checkpoint.channels} channels")
    try:
        checkpoint.build()
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{where}: weights do not fit architecture {checkpoint.arch!r}: {reason}"
        ) from None
    if checkpoint.int8_graph and checkpoint.int8_weights != weights_digest(checkpoint.state_dict):
        raise CheckpointError(
            f"{where}: its int8 graph was quantized from other weights than the ones it holds; "
            "quantize it again (python -m jobs.quantize)"
        )
    return checkpoint
